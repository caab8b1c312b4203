"""Uploads through pyarrow's filesystems (file:// here; s3:// and gs:// take the same calls)."""

from __future__ import annotations

import pytest

from speed_ray.config import load_config
from speed_ray.io.settings import ConfigError
from speed_ray.io.storage import check_writable, upload
from tests.conftest import DEBIAN


def test_a_folder_is_copied_whole_and_a_rerun_replaces_it(tmp_path):
    src = tmp_path / "run" / "synth"
    (src / "tasks").mkdir(parents=True)
    (src / "tasks" / "shard_00000.parquet").write_bytes(b"\x00parquet" * 100)
    (src / "tasks" / "_manifest.json").write_text('{"num_rows": 3}')
    uri = f"file://{tmp_path}/bucket/prefix/run/synth"
    check_writable(f"file://{tmp_path}/bucket/prefix/run")
    upload(src, uri)
    (src / "tasks" / "_manifest.json").write_text('{"num_rows": 4}')
    upload(src, uri)
    dest = tmp_path / "bucket/prefix/run/synth/tasks"
    assert sorted(p.name for p in dest.iterdir()) == ["_manifest.json", "shard_00000.parquet"]
    assert (dest / "shard_00000.parquet").read_bytes() == b"\x00parquet" * 100
    assert (dest / "_manifest.json").read_text() == '{"num_rows": 4}'


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("bucket/prefix", "expected a URI with one of the schemes s3, gs"),
        ("ftp://host/x", "expected a URI with one of the schemes"),
        ("s3://AKIAXXXX:secret@bucket/prefix", "credentials or options in the URI are not allowed"),
        (
            "s3://bucket/prefix?access_key=AKIA&secret_key=s",
            "credentials or options in the URI are not allowed",
        ),
    ],
)
def test_bad_upload_uris_are_refused_when_the_config_loads(uri, why):
    with pytest.raises(ConfigError, match=f"run.upload_to: {why}"):
        load_config(None, [f"run.upload_to={uri}", f"eval.retrieval.path={DEBIAN / 'retrieval'}"])
