"""Object storage through pyarrow's filesystems (``s3://bucket/prefix``, ``gs://bucket/prefix``,
``hdfs://``, ``file://``), both ways.

Out: each finished stage folder is copied to ``run.upload_to``, the way Ray Train syncs to
``storage_path``; the run itself works on a local or shared path (``run.output_dir``).
In: a data file named by URI (``embed.data.path: s3://bucket/pairs.parquet``) is read as a stream
(``RemoteFile``).

Credentials and endpoints come from the environment (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY,
AWS_ENDPOINT_URL, AWS_REGION, GOOGLE_APPLICATION_CREDENTIALS, instance roles), never from the URI
or a config, so nothing secret is saved with the run.
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING
from urllib.parse import urlparse

if TYPE_CHECKING:
    from pyarrow import NativeFile
    from pyarrow.fs import FileInfo

SCHEMES = ("s3", "gs", "gcs", "hdfs", "abfs", "abfss", "file")


def is_uri(spec: str) -> bool:
    """``spec`` names something through a URI scheme (``s3://...``), not a local path."""
    return "://" in spec


def check_uri(uri: str, key: str = "run.upload_to") -> None:
    """Refuse what pyarrow cannot reach, and credentials written into the URI."""
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


class RemoteFile:
    """A data file on object storage, named by its URI: the few things the data readers ask of a
    ``Path`` (name, suffix, exists, is_file, is_dir), and streams to read it. ``str()`` is the URI, so
    error messages name it as the user wrote it. Nothing is contacted until a method asks (the config
    checks the URI itself: ``speed_ray.io.settings.locate_input``)."""

    def __init__(self, uri: str) -> None:
        parts = urlparse(uri)
        self.uri, self.bucket, self.key = uri, parts.netloc, parts.path.lstrip("/")
        self.name = PurePosixPath(parts.path).name
        self.suffix = PurePosixPath(self.name).suffix

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"RemoteFile({self.uri!r})"

    def info(self) -> FileInfo:
        """pyarrow's ``FileInfo`` (type, size, mtime); an unreachable store or refused credentials
        raise ``OSError`` naming the URI."""
        filesystem, path = _filesystem(self.uri)
        try:
            return filesystem.get_file_info(path)
        except OSError as e:
            raise OSError(f"{self.uri}: cannot read ({e})") from None

    def exists(self) -> bool:
        return self._type() != "NotFound"

    def is_file(self) -> bool:
        return self._type() == "File"

    def is_dir(self) -> bool:
        return self._type() == "Directory"

    def _type(self) -> str:
        return self.info().type.name

    def open_stream(self, decompress: bool = True) -> NativeFile:
        """A binary stream of the file's bytes, decompressed on the fly when its name ends in ``.gz``
        (unless not ``decompress``)."""
        filesystem, path = _filesystem(self.uri)
        compression = "gzip" if decompress and self.suffix == ".gz" else None
        return filesystem.open_input_stream(path, compression=compression, buffer_size=1 << 20)

    def open_random(self) -> NativeFile:
        """The file for random access (a parquet file's footer first, then its row groups)."""
        filesystem, path = _filesystem(self.uri)
        return filesystem.open_input_file(path)
