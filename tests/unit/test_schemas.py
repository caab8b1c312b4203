"""Stage output: fixed shard names, manifest written last, validation on read."""

from __future__ import annotations

import json
import time

import pyarrow as pa
import pytest

from speed_ray.io.schemas import EXAMPLES, MANIFEST, cast_rows, read_manifest, read_stage, write_stage


def rows(n, start=0):
    return [
        {"id": str(i), "query": f"q{i}", "positive": f"p{i}", "num_input_tokens": i}
        for i in range(start, start + n)
    ]


def test_write_then_read(tmp_path):
    out = tmp_path / "examples"
    tables = [cast_rows(rows(3), EXAMPLES), cast_rows(rows(2, 3), EXAMPLES)]
    manifest = write_stage(out, iter(tables), EXAMPLES, {"note": "x"}, time.time())
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, "shard_00000.parquet", "shard_00001.parquet"]
    assert manifest["num_rows"] == 5 and manifest["note"] == "x"
    assert json.loads((out / MANIFEST).read_text()) == manifest == read_manifest(out)
    table = read_stage(out, EXAMPLES)
    assert table["id"].to_pylist() == ["0", "1", "2", "3", "4"]
    assert table.schema == EXAMPLES


def test_a_failed_write_leaves_no_stage(tmp_path):
    out = tmp_path / "examples"

    def broken():
        yield cast_rows(rows(1), EXAMPLES)
        raise RuntimeError("engine died")

    with pytest.raises(RuntimeError):
        write_stage(out, broken(), EXAMPLES, {}, time.time())
    assert not out.exists() and read_manifest(out) is None
    with pytest.raises(FileNotFoundError, match="has not finished"):
        read_stage(out, EXAMPLES)


def test_extra_and_missing_columns(tmp_path):
    with pytest.raises(ValueError, match="columns not in the schema"):
        cast_rows([{"id": "1", "oops": 2}], EXAMPLES)
    with pytest.raises(ValueError, match="missing columns"):
        write_stage(tmp_path / "x", [pa.table({"id": ["1"]})], EXAMPLES, {}, time.time())
