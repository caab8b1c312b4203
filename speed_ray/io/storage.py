"""Run outputs to object storage: each finished stage folder is copied to ``run.upload_to``
(``s3://bucket/prefix``, ``gs://bucket/prefix``, ``hdfs://``, ``file://``) through pyarrow's
filesystems, the way Ray Train syncs to ``storage_path``. The run itself works on a local or shared
path (``run.output_dir``); credentials come from the environment (AWS_*, GOOGLE_APPLICATION_CREDENTIALS,
instance roles), never from the URI or a config.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


def check_uri(uri: str, key: str = "run.upload_to") -> None:
    """Refuse what pyarrow cannot write to, and credentials written into the URI."""
    parts = urlparse(uri)
    if parts.scheme not in SCHEMES:
        raise ValueError(f"{key}: expected a URI with one of the schemes {', '.join(SCHEMES)}, got {uri!r}")
    if parts.username or parts.password or parts.query:
        raise ValueError(
            f"{key}: credentials or options in the URI are not allowed (they would be saved with the "
            "config); give them through the environment or the instance's role"
        )


def _filesystem(uri: str):
    from pyarrow import fs

    return fs.FileSystem.from_uri(uri)


def check_writable(uri: str) -> None:
    """Create the destination folder now, so missing credentials fail before any expensive work."""
    filesystem, path = _filesystem(uri)
    filesystem.create_dir(path, recursive=True)


def upload(local: Path, uri: str) -> None:
    """Copy ``local`` (a file or a folder, recursively) to ``uri``, replacing what is there."""
    from pyarrow import fs

    filesystem, path = _filesystem(uri)
    if local.is_dir():
        filesystem.create_dir(path, recursive=True)
    fs.copy_files(str(local), path, source_filesystem=fs.LocalFileSystem(), destination_filesystem=filesystem)
