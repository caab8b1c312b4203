"""A finished step whose files were damaged afterwards (a bad disk, a partial copy): the rerun sees
that a checksum no longer matches its manifest and does the step again, remaking only the damaged
shard of a generation step."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest

from speed_ray.io.schemas import read_stage, write_stage
from speed_ray.io.shards import ShardedWriter, lay_out
from speed_ray.io.steps import step
from tests.conftest import rows_figures
from tests.unit.test_shards import IDS, INPUTS, SCHEMA, outputs, table

pytestmark = pytest.mark.faults


def pairs(table) -> list[tuple[str, int]]:
    return list(zip(table["id"].to_pylist(), table["sample"].to_pylist(), strict=True))


def test_a_damaged_shard_of_a_finished_generation_step_is_made_again_alone(tmp_path, fault_record):
    out = tmp_path / "generations"
    asked: list[list[str]] = []

    def build() -> dict:
        layout = lay_out(out, INPUTS, 3)
        ids = [r["id"] for f in layout.request_files for r in pq.read_table(f).to_pylist()]
        asked.append(ids)
        w = ShardedWriter(out, SCHEMA, layout, outputs_per_id=2)
        w.add(table(outputs(ids)))
        return w.finish({}, started=0.0)

    first = step(out, "synth/generations", build)
    assert step(out, "synth/generations", build) == first and len(asked) == 1  # sound: skipped
    path = out / "shard_00001.parquet"
    good = path.read_bytes()
    path.write_bytes(good[:-10])  # truncated after the step finished
    again = step(out, "synth/generations", build)
    assert asked == [IDS, ["r3", "r4", "r5"]]  # only the damaged shard's rows went to the engine
    assert path.read_bytes() == good and again["files"] == first["files"]
    got = read_stage(out, SCHEMA)
    figures = rows_figures([(i, k) for i in IDS for k in range(2)], pairs(got))
    fault_record("a finished step's shard truncated", rows_sent_again=len(asked[1]), **figures)
    assert got["id"].to_pylist() == [i for i in IDS for _ in range(2)]


def test_a_missing_file_of_a_finished_whole_stage_step_redoes_the_step(tmp_path, fault_record):
    out = tmp_path / "drafts"
    rows = table(outputs(IDS)).drop_columns(["shard"])
    builds = []

    def build() -> dict:
        builds.append(1)
        return write_stage(out, [rows.slice(0, 6), rows.slice(6)], SCHEMA, {}, 0.0)

    first = step(out, "synth/drafts", build)
    (out / "shard_00001.parquet").unlink()
    again = step(out, "synth/drafts", build)
    assert len(builds) == 2 and again["files"] == first["files"]
    got = read_stage(out, SCHEMA)
    figures = rows_figures(pairs(rows), pairs(got))
    fault_record("a finished step's shard deleted", **figures)
    assert got.equals(rows)
