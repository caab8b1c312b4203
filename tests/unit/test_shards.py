"""Shards: inputs laid out on disk, outputs written as each shard completes (in any arrival order),
and a rerun that keeps the finished shards whose checksum still holds and redoes the rest."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from speed_ray.io.schemas import MANIFEST, read_stage
from speed_ray.io.shards import (
    DONE,
    PLAN,
    REQUESTS,
    Layout,
    ShardedWriter,
    add_counts,
    finish_derived,
    finished_shards,
    lay_out,
    requests_plan,
    with_shard,
    write_derived,
    write_requests,
)

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
INPUTS = [{"id": i, "n": int(i[1:]), "kind": "sts" if i == "r1" else "call"} for i in IDS]


def outputs(ids, n=2):
    return [
        {"id": i, "shard": int(i[1:]) // 3, "sample": k, "error": "bad" if i == "r4" and k == 1 else None}
        | {"generator": "g", "num_input_tokens": 10 if k == 0 else 0, "num_output_tokens": 5}
        for i in ids
        for k in range(n)
    ]


def table(rows):
    return pa.Table.from_pylist(rows, schema=SCHEMA.append(pa.field("shard", pa.int64())))


def requested(layout):
    return [r for f in layout.request_files for r in pq.read_table(f).to_pylist()]


def test_lay_out_writes_the_call_rows_with_their_shard_and_keeps_ready_rows_in_memory(tmp_path):
    layout = lay_out(tmp_path / "step", iter(INPUTS), 3, ready=lambda r: r["kind"] == "sts")
    assert layout.sizes == [3, 3, 1] and layout.done == set()
    assert [p.split("/")[-1] for p in layout.request_files] == [
        "shard_00000.parquet",  # r0 r2 (r1 is ready)
        "shard_00001.parquet",
        "shard_00002.parquet",
    ]
    assert [(r["id"], r["shard"]) for r in requested(layout)] == [
        ("r0", 0), ("r2", 0), ("r3", 1), ("r4", 1), ("r5", 1), ("r6", 2)
    ]  # fmt: skip
    assert layout.ready == [{"id": "r1", "n": 1, "kind": "sts", "shard": 0}]
    assert json.loads((tmp_path / "step" / PLAN).read_text())["num_input_rows"] == 7


def test_shards_are_written_when_complete_whatever_the_order(tmp_path):
    w = ShardedWriter(tmp_path / "step", SCHEMA, lay_out(tmp_path / "step", INPUTS, 3), outputs_per_id=2)
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
    assert not (tmp_path / "step" / REQUESTS).exists()
    assert sorted(p.name for p in (tmp_path / "step" / DONE).iterdir()) == [
        f"shard_0000{i}.json" for i in range(3)
    ]


@pytest.mark.faults
def test_a_rerun_keeps_finished_shards_and_asks_only_for_the_rest(tmp_path):
    out = tmp_path / "step"
    w = ShardedWriter(out, SCHEMA, lay_out(out, INPUTS, 3), outputs_per_id=2)
    w.add(table(outputs(["r3", "r4", "r5", "r0"])))  # then the "driver dies": no finish()
    kept = (out / "shard_00001.parquet").read_bytes()
    assert not (out / MANIFEST).exists()

    layout = lay_out(out, INPUTS, 3)
    assert layout.done == {1}
    assert [r["id"] for r in requested(layout)] == ["r0", "r1", "r2", "r6"]
    again = ShardedWriter(out, SCHEMA, layout, outputs_per_id=2)
    again.add(table(outputs(["r0", "r1", "r2", "r6"])))
    manifest = again.finish({}, started=0.0)
    assert (out / "shard_00001.parquet").read_bytes() == kept
    assert manifest["num_rows"] == 14 and manifest["accounting"]["calls"] == 7
    assert read_stage(out, SCHEMA)["id"].to_pylist() == [i for i in IDS for _ in range(2)]


@pytest.mark.faults
@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "no record"])
def test_a_damaged_shard_is_detected_by_its_checksum_and_generated_again(tmp_path, damage):
    out = tmp_path / "step"
    w = ShardedWriter(out, SCHEMA, lay_out(out, INPUTS, 3), outputs_per_id=2)
    w.add(table(outputs(IDS[:6])))  # shards 0 and 1 written; the run dies before shard 2
    path = out / "shard_00001.parquet"
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    else:  # killed between the shard's rename and its record
        (out / DONE / "shard_00001.json").unlink()

    layout = lay_out(out, INPUTS, 3)
    assert layout.done == {0} and not path.exists()
    assert [r["id"] for r in requested(layout)] == ["r3", "r4", "r5", "r6"]
    again = ShardedWriter(out, SCHEMA, layout, outputs_per_id=2)
    again.add(table(outputs(IDS[3:])))
    again.finish({}, started=0.0)
    assert path.read_bytes() == data  # the same outputs give the same file
    assert read_stage(out, SCHEMA)["id"].to_pylist() == [i for i in IDS for _ in range(2)]


def test_a_rerun_with_other_inputs_is_refused(tmp_path):
    out = tmp_path / "step"
    lay_out(out, INPUTS, 3)
    with pytest.raises(ValueError, match=r"other inputs \(7 rows in 3 shards, now 6 in 2\)"):
        lay_out(out, INPUTS[:6], 3)


def test_a_repeated_input_id_is_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match=r"input row id 'r1' appears twice \(shard 0\)"):
        lay_out(tmp_path / "step", [*INPUTS[:2], INPUTS[1]], 3)


def test_missing_outputs_fail_loudly_and_outputs_for_other_shards_are_rejected(tmp_path):
    w = ShardedWriter(tmp_path / "step", SCHEMA, lay_out(tmp_path / "step", INPUTS, 3), outputs_per_id=2)
    with pytest.raises(ValueError, match="output 'zz' for shard 9, which is not pending"):
        w.add(table([outputs(["r0"])[0] | {"id": "zz", "shard": 9}]))
    w.add(table(outputs(IDS[:6])))
    with pytest.raises(ValueError, match="output 'r0' for shard 0, which is not pending"):
        w.add(table(outputs(["r0"])))
    with pytest.raises(RuntimeError, match=r"no output for some rows of shards \[2\]"):
        w.finish({}, started=0.0)
    assert not (tmp_path / "step" / MANIFEST).exists()


def test_with_shard_follows_the_ids_not_the_order():
    inputs = pa.Table.from_pylist([{"id": "a", "shard": 4}, {"id": "b", "shard": 5}])
    outputs_ = pa.Table.from_pylist([{"id": "b", "x": 1}, {"id": "a", "x": 2}, {"id": "b", "x": 3}])
    assert with_shard(outputs_, inputs)["shard"].to_pylist() == [5, 4, 5]
    assert with_shard(outputs_, inputs.drop_columns(["shard"])) is outputs_


# ---- Steps derived shard by shard (what the synth steps after generation run on the workers) ----


def finished(out, tables):
    """A finished generation step with one shard per table (shard numbers as in the list)."""
    layout = lay_out(out, [{"id": r["id"]} for t in tables for r in t], max(len(t) for t in tables))
    w = ShardedWriter(out, SCHEMA, layout, outputs_per_id=1)
    for s, rows in enumerate(tables):
        w.add(table([r | {"shard": s} for r in rows]))
    return w.finish({}, started=0.0)


def gen(i, err=None):
    return {
        "id": i,
        "sample": 0,
        "error": err,
        "generator": "g",
        "num_input_tokens": 1,
        "num_output_tokens": 1,
    }


def keep_valid(rows, fallback=True):
    ok = rows.filter(pc.is_null(rows["error"]))
    return ok, {
        "rows_in": rows.num_rows,
        "dropped": {"error": rows.num_rows - ok.num_rows},
    } if fallback else {}


def test_a_derived_shard_comes_from_the_same_shard_of_its_input_with_its_counts(tmp_path):
    src, out = tmp_path / "gens", tmp_path / "kept"
    finished(src, [[gen("a"), gen("b", "bad")], [gen("c", "bad"), gen("d", "bad")]])
    (out / DONE).mkdir(parents=True)  # as derive_step leaves it
    rows = [write_derived(out, s, [(src, SCHEMA)], keep_valid, SCHEMA, {}) for s in (1, 0)]  # any order
    assert rows == [0, 1]
    manifest = finish_derived(out, SCHEMA, 2, {"note": "x"}, started=0.0, written=1)
    assert [f["num_rows"] for f in manifest["files"]] == [1, 0]
    assert manifest["rows_in"] == 4 and manifest["dropped"] == {"error": 3} and manifest["note"] == "x"
    assert "counts" not in manifest["files"][0]  # summed into the manifest, not listed per file
    assert read_stage(out, SCHEMA)["id"].to_pylist() == ["a"]
    assert finished_shards(out) == {0, 1}


def test_counts_add_key_by_key_and_reasons_by_reason():
    a = {"rows_in": 3, "dropped": {"tie": 1}}
    b = {"rows_in": 2, "dropped": {"tie": 2, "no verdict": 1}, "judged": 4}
    assert add_counts(add_counts({}, a), b) == {
        "rows_in": 5,
        "dropped": {"tie": 3, "no verdict": 1},
        "judged": 4,
    }


def test_requests_written_per_shard_give_the_plan_and_skip_finished_shards(tmp_path):
    src, out = tmp_path / "drafts", tmp_path / "revisions"
    finished(src, [[gen("a"), gen("b")], [gen("c", "bad"), gen("e", "bad")], [gen("d"), gen("f")]])
    (out / REQUESTS).mkdir(parents=True)

    def revise(rows):
        return [{"id": "rev-" + r["id"], "seed": 1} for r in rows.to_pylist() if r["error"] is None]

    made = [write_requests(out, s, [(src, SCHEMA)], revise, {}, done={2}) for s in range(3)]
    assert [n for n, _ in made] == [2, 0, 2]
    layout = requests_plan(out, [n for n, _ in made], [h for _, h in made], done={2})
    assert layout.sizes == [2, 0, 2] and [p.split("/")[-1] for p in layout.request_files] == [
        "shard_00000.parquet"
    ]
    assert [(r["id"], r["shard"]) for r in requested(layout)] == [("rev-a", 0), ("rev-b", 0)]
    assert json.loads((out / PLAN).read_text())["num_input_rows"] == 4
    with pytest.raises(ValueError, match=r"other inputs \(4 rows in 3 shards, now 2 in 3\)"):
        requests_plan(out, [2, 0, 0], [h for _, h in made], done=set())


def test_a_shard_with_no_input_row_is_written_empty_at_once(tmp_path):
    out = tmp_path / "judgments"
    layout = Layout(sizes=[1, 0], done=set())
    out.mkdir()
    w = ShardedWriter(out, SCHEMA, layout, outputs_per_id=1)
    assert pq.read_metadata(out / "shard_00001.parquet").num_rows == 0
    w.add(table([gen("a") | {"shard": 0}]))
    assert [f["num_rows"] for f in w.finish({}, started=0.0)["files"]] == [1, 0]
