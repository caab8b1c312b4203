"""ShardedWriter: shards written as they complete, in any arrival order, and a rerun that keeps them."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from speed_ray.schemas import MANIFEST, read_stage
from speed_ray.shards import PLAN, ShardedWriter

SCHEMA = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample", pa.int64()),
        pa.field("error", pa.string()),
        pa.field("generator", pa.string()),
        pa.field("num_input_tokens", pa.int64()),
        pa.field("num_output_tokens", pa.int64()),
    ]
)
IDS = [f"r{i}" for i in range(7)]  # shards of 3: [r0 r1 r2] [r3 r4 r5] [r6]


def outputs(ids, n=2):
    return [
        {"id": i, "sample": k, "error": "bad" if i == "r4" and k == 1 else None, "generator": "g"}
        | {"num_input_tokens": 10 if k == 0 else 0, "num_output_tokens": 5}
        for i in ids
        for k in range(n)
    ]


def table(rows):
    return pa.Table.from_pylist(rows, schema=SCHEMA)


def test_shards_are_written_when_complete_whatever_the_order(tmp_path):
    w = ShardedWriter(tmp_path / "step", SCHEMA, IDS, shard_rows=3, outputs_per_id=2)
    assert w.pending_ids() == set(IDS)
    rows = outputs(IDS)
    w.add(table(rows[12:] + rows[:3]))  # r6 (shard 2) complete; shard 0 half there
    assert sorted(p.name for p in (tmp_path / "step").glob("shard_*")) == ["shard_00002.parquet"]
    w.add(table(rows[3:12] + rows[3:5]))  # the rest, with a retried batch's duplicate of r1
    manifest = w.finish({"engine": "fake"}, started=0.0, prices=(2.0, 10.0))
    assert manifest["num_rows"] == 14 and [f["num_rows"] for f in manifest["files"]] == [6, 6, 2]
    acc = manifest["accounting"]
    assert (acc["calls"], acc["input_tokens"], acc["output_tokens"], acc["errors"]) == (7, 70, 70, 1)
    assert acc["cost_usd"] == pytest.approx((70 * 2.0 + 70 * 10.0) / 1e6, abs=1e-4)
    got = read_stage(tmp_path / "step", SCHEMA)
    assert list(zip(got["id"].to_pylist(), got["sample"].to_pylist(), strict=True)) == [
        (i, k) for i in IDS for k in range(2)
    ]


def test_a_rerun_keeps_finished_shards_and_asks_only_for_the_rest(tmp_path):
    out = tmp_path / "step"
    w = ShardedWriter(out, SCHEMA, IDS, shard_rows=3, outputs_per_id=2)
    w.add(table(outputs(["r3", "r4", "r5", "r0"])))  # then the "driver dies": no finish()
    kept = (out / "shard_00001.parquet").read_bytes()
    assert not (out / MANIFEST).exists()

    again = ShardedWriter(out, SCHEMA, IDS, shard_rows=3, outputs_per_id=2)
    assert again.pending_ids() == {"r0", "r1", "r2", "r6"}
    again.add(table(outputs(["r0", "r1", "r2", "r6"])))
    manifest = again.finish({}, started=0.0)
    assert (out / "shard_00001.parquet").read_bytes() == kept
    assert manifest["num_rows"] == 14 and manifest["accounting"]["calls"] == 7
    assert sorted(set(read_stage(out, SCHEMA)["id"].to_pylist())) == IDS


def test_a_rerun_with_other_inputs_is_refused(tmp_path):
    out = tmp_path / "step"
    ShardedWriter(out, SCHEMA, IDS, shard_rows=3, outputs_per_id=2)
    assert json.loads((out / PLAN).read_text())["num_input_rows"] == 7
    with pytest.raises(ValueError, match=r"other inputs \(7 rows in shards of 3, now 6 in shards of 3\)"):
        ShardedWriter(out, SCHEMA, IDS[:6], shard_rows=3, outputs_per_id=2)


def test_missing_outputs_fail_loudly_and_unknown_ids_are_rejected(tmp_path):
    w = ShardedWriter(tmp_path / "step", SCHEMA, IDS, shard_rows=3, outputs_per_id=2)
    with pytest.raises(ValueError, match="unexpected row id 'zz'"):
        w.add(table(outputs(["zz"])))
    w.add(table(outputs(IDS[:6])))
    with pytest.raises(RuntimeError, match=r"no output for some rows of shards \[2\]"):
        w.finish({}, started=0.0)
    assert not (tmp_path / "step" / MANIFEST).exists()


def test_input_blocks_hold_at_most_a_batch_and_never_straddle_shards():
    from speed_ray.pipeline.synth import input_blocks

    rows = [{"id": f"r{i}"} for i in range(10)]
    shard_of = {f"r{i}": i // 4 for i in range(10)}  # shards [0-3] [4-7] [8-9]
    blocks = [[int(r["id"][1:]) for r in b] for b in input_blocks(rows, 3, shard_of)]
    assert blocks == [[0, 1, 2], [3], [4, 5, 6], [7], [8, 9]]
    assert [[int(r["id"][1:]) for r in b] for b in input_blocks(rows, 4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9],
    ]
