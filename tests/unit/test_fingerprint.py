"""Step fingerprints: the pure functions on hand-made dicts, and ``step`` redoing a stale step (its old
output removed first) while a killed step with unchanged settings keeps its finished shards."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest

from speed_ray.config import load_config
from speed_ray.io.fingerprint import diff, fingerprint, flatten, output_hash, select
from speed_ray.io.schemas import read_manifest, read_stage
from speed_ray.io.shards import ShardedWriter, lay_out
from speed_ray.io.steps import pending, step
from tests.unit.test_shards import IDS, INPUTS, SCHEMA, outputs, table

CONFIG = {
    "run": {"name": "a", "seed": 0},
    "embed": {
        "learning_rate": 2e-05,
        "resources": {"workers": 2, "cpus_per_worker": 1.0},
        "max_failures": 2,
        "lora_target_modules": ["all-linear"],
        "data": {"source": "synth", "path": None},
    },
    "synth": {"mix": {}, "judge": None},
}


def test_flatten_gives_dotted_keys_lists_and_none_as_values():
    assert flatten(CONFIG) == {
        "run.name": "a",
        "run.seed": 0,
        "embed.learning_rate": 2e-05,
        "embed.resources.workers": 2,
        "embed.resources.cpus_per_worker": 1.0,
        "embed.max_failures": 2,
        "embed.lora_target_modules": ["all-linear"],
        "embed.data.source": "synth",
        "embed.data.path": None,
        "synth.judge": None,  # an empty mapping gives no key
    }


def test_select_takes_prefixes_less_exclusions():
    flat = flatten(CONFIG)
    got = select(flat, ["run.seed", "embed"], ["embed.resources.cpus_per_worker", "embed.max_failures"])
    assert got == {
        "run.seed": 0,
        "embed.learning_rate": 2e-05,
        "embed.resources.workers": 2,
        "embed.lora_target_modules": ["all-linear"],
        "embed.data.source": "synth",
        "embed.data.path": None,
    }
    # a prefix is a whole key part: embed.data does not take embed.data_x; * matches any part
    assert select({"embed.data_x": 1, "embed.data.path": 2}, ["embed.data"]) == {"embed.data.path": 2}
    assert select(flat, ["embed"], ["*.workers", "embed.data", "embed.l*"]) == {
        "embed.resources.cpus_per_worker": 1.0,
        "embed.max_failures": 2,
    }


def test_fingerprint_hashes_config_and_inputs_and_survives_a_json_round_trip():
    a = fingerprint({"embed.learning_rate": 2e-05}, {"synth/examples": "ab" * 32})
    assert a["config"] == {"embed.learning_rate": 2e-05} and a["inputs"] == {"synth/examples": "ab" * 32}
    assert len(a["sha256"]) == 64
    assert json.loads(json.dumps(a)) == a  # what a manifest gives back compares equal
    assert fingerprint({"embed.learning_rate": 2e-05}, {"synth/examples": "ab" * 32}) == a
    assert fingerprint({"embed.learning_rate": 1e-04}, {"synth/examples": "ab" * 32})["sha256"] != a["sha256"]
    assert fingerprint({"embed.learning_rate": 2e-05}, {"synth/examples": "cd" * 32})["sha256"] != a["sha256"]
    assert fingerprint({"x": (1, 2)}) == fingerprint({"x": [1, 2]})


def test_diff_names_each_changed_key_with_old_and_new_values():
    old = fingerprint(
        {"embed.learning_rate": 2e-05, "embed.model": "tiny-bert", "embed.dropout": None, "gone": 1},
        {"synth/examples": "0123456789abcdef" * 4},
    )
    new = fingerprint(
        {"embed.learning_rate": 0.0001, "embed.model": "tiny-bert", "embed.dropout": 0.1, "added": [1, "b"]},
        {"synth/examples": "fedcba9876543210" * 4},
    )
    assert diff(old, new) == [
        'added (absent) -> [1, "b"]',
        "embed.dropout null -> 0.1",
        "embed.learning_rate 2e-05 -> 0.0001",
        "gone 1 -> (absent)",
        "input synth/examples 0123456789ab -> fedcba987654",
    ]
    assert diff(new, new) == []
    assert diff({"config": {"k": ""}}, {"config": {"k": "x" * 100}}) == [f'k "" -> {"x" * 77}...']


def test_output_hash_follows_the_files_or_else_the_whole_manifest():
    files = {"files": [{"name": "shard_00000.parquet", "num_rows": 2, "sha256": "aa"}], "finished_at": "t1"}
    # redone to the same bytes: the same output, whenever it finished and whatever its fingerprint
    assert output_hash(files) == output_hash(files | {"finished_at": "t2", "fingerprint": {"sha256": "x"}})
    assert output_hash(files) != output_hash({"files": [{"name": "shard_00000.parquet", "sha256": "bb"}]})
    model = {"steps": 3, "duration_s": 1.5}  # a trained model lists no checksums: every field counts
    assert output_hash(model) == output_hash(model | {"fingerprint": {"sha256": "x"}})
    assert output_hash(model) != output_hash(model | {"duration_s": 1.6})
    assert output_hash(None) is None


def test_keys_that_change_no_output_make_no_step_stale(tmp_path):
    base = [f"run.output_dir={tmp_path}"]
    ref = load_config(None, base).fingerprint(["run", "embed", "synth"])
    harmless = [
        "run.name=other",
        "run.num_cpus=2",
        "embed.resources.cpus_per_worker=0.5",
        "embed.max_failures=0",
        "embed.save_steps=5",
        "embed.chunk_size=2",
        "synth.engine.batch_size=8",
        "synth.engine.max_actors=3",
        "synth.shard_rows=16",
    ]
    for change in harmless:
        cfg = load_config(None, [*base, change])
        assert cfg.fingerprint(["run", "embed", "synth"])["sha256"] == ref["sha256"], change
    for change in ("embed.resources.workers=1", "synth.engine.model=tiny-llama", "run.seed=3"):
        cfg = load_config(None, [*base, change])
        assert cfg.fingerprint(["run", "embed", "synth"])["sha256"] != ref["sha256"], change


def test_embed_and_eval_declare_what_they_depend_on(tmp_path):
    from speed_ray.embed import driver as embed
    from speed_ray.eval import driver as evaluate

    cfg = load_config(None, [f"run.output_dir={tmp_path}", "embed.learning_rate=1e-4"])
    fp = embed.fingerprint(cfg)
    assert fp["config"]["embed.learning_rate"] == 1e-4 and fp["config"]["run.seed"] == 0
    assert "embed.max_failures" not in fp["config"] and "eval.seed" not in fp["config"]
    assert fp["inputs"] == {"synth/train": None}  # synth has not run

    specs = [evaluate.TaskSpec("T", "retrieval", lambda: None, lambda: [])]
    models = [("base", "base"), ("trained", "trained"), ("bm25", "bm25")]
    units = evaluate.unit_fingerprints(cfg, specs, models)
    assert set(units) == {("base", "T"), ("trained", "T"), ("bm25", "T")}
    assert units[("base", "T")]["config"]["embed.model"] == "all-minilm-l6-v2"
    assert "embed.learning_rate" not in units[("base", "T")]["config"]  # the base is not trained
    assert units[("trained", "T")]["inputs"]["embed"] is None
    # "scores": a record made before per-query scores were kept is scored again, not shown without se
    assert units[("bm25", "T")]["config"] == {
        "model": "bm25",
        "task": "T",
        "scores": "per-item",
        **{
            k: v
            for k, v in flatten(cfg).items()
            if k.startswith("eval.retrieval.") and "instruction" not in k
        },
        "eval.seed": 42,
    }


# ----------------------------------------------------------------------------------------------
# step()


def whole_step(out, rows, log):
    from speed_ray.io.schemas import write_stage

    def build():
        log.append(rows)
        return write_stage(out, [table(outputs(rows)).drop_columns(["shard"])], SCHEMA, {}, 0.0)

    return build


def test_a_stale_step_is_logged_removed_and_redone(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="speed_ray")
    out = tmp_path / "drafts"
    builds: list = []
    fp1 = fingerprint({"synth.dedup.threshold": 0.8})
    first = step(out, "synth/drafts", whole_step(out, IDS, builds), fp1)
    assert read_manifest(out)["fingerprint"] == fp1 == first["fingerprint"]
    assert not pending(out).exists()
    step(out, "synth/drafts", whole_step(out, IDS, builds), fp1)
    assert len(builds) == 1 and "synth/drafts: already finished, skipped" in caplog.text

    (out / "left-over.txt").write_text("from the old settings")
    fp2 = fingerprint({"synth.dedup.threshold": 0.9})
    step(out, "synth/drafts", whole_step(out, IDS[:3], builds), fp2)
    err = caplog.text
    assert "synth/drafts: stale: synth.dedup.threshold 0.8 -> 0.9; redoing it and the steps after it" in err
    assert len(builds) == 2 and not (out / "left-over.txt").exists()
    assert read_manifest(out)["fingerprint"] == fp2 and read_stage(out, SCHEMA).num_rows == 6


def test_state_beside_a_stale_step_goes_with_it(tmp_path):
    out, checkpoints = tmp_path / "embed" / "model", tmp_path / "ray" / "embed"

    def build():
        out.mkdir(parents=True, exist_ok=True)
        (out / "_manifest.json").write_text("{}")
        return {}

    step(out, "embed", build, fingerprint({"embed.learning_rate": 2e-05}), [checkpoints])
    checkpoints.mkdir(parents=True)
    (checkpoints / "checkpoint_000001").write_text("old")
    step(out, "embed", build, fingerprint({"embed.learning_rate": 2e-05}), [checkpoints])
    assert checkpoints.exists()  # unchanged: kept
    step(out, "embed", build, fingerprint({"embed.learning_rate": 1e-04}), [checkpoints])
    assert not checkpoints.exists()


def generation_build(out, asked, stop_after=None):
    """A generation step over INPUTS in shards of 3; ``stop_after``: die after that many shards."""

    def build():
        layout = lay_out(out, INPUTS, 3)
        ids = [r["id"] for f in layout.request_files for r in pq.read_table(f).to_pylist()]
        asked.append(ids)
        w = ShardedWriter(out, SCHEMA, layout, outputs_per_id=2)
        for i in range(0, len(ids), 3):
            if stop_after is not None and i // 3 >= stop_after:
                raise KeyboardInterrupt("killed")
            w.add(table(outputs(ids[i : i + 3])))
        return w.finish({}, started=0.0)

    return build


def test_a_killed_step_resumes_with_the_same_settings_and_starts_over_with_others(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="speed_ray")
    out, asked = tmp_path / "generations", []
    fp = fingerprint({"synth.sampling.temperature": 1.0})
    with pytest.raises(KeyboardInterrupt):
        step(out, "synth/generations", generation_build(out, asked, stop_after=1), fp)
    assert read_manifest(out) is None and json.loads(pending(out).read_text()) == fp
    kept = (out / "shard_00000.parquet").read_bytes()
    step(out, "synth/generations", generation_build(out, asked), fp)  # unchanged: resumes
    assert asked[1] == IDS[3:] and (out / "shard_00000.parquet").read_bytes() == kept
    assert read_manifest(out)["fingerprint"] == fp and not pending(out).exists()

    # killed again under other settings: the rerun starts over, no shard of the old settings kept
    other = fingerprint({"synth.sampling.temperature": 0.5})
    with pytest.raises(KeyboardInterrupt):
        step(out, "synth/generations", generation_build(out, asked, stop_after=1), other)
    caplog.clear()
    step(
        out,
        "synth/generations",
        generation_build(out, asked),
        fingerprint({"synth.sampling.temperature": 0.7}),
    )
    err = caplog.text
    assert (
        "synth/generations: an unfinished earlier run had other settings: "
        "synth.sampling.temperature 0.5 -> 0.7; starting over" in err
    )
    assert asked[-1] == IDS and read_stage(out, SCHEMA).num_rows == 2 * len(IDS)


def test_a_manifest_from_before_fingerprints_is_kept(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="speed_ray")
    out, builds = tmp_path / "drafts", []
    step(out, "synth/drafts", whole_step(out, IDS, builds))  # no fingerprint recorded
    step(out, "synth/drafts", whole_step(out, IDS, builds), fingerprint({"k": 1}))
    assert len(builds) == 1
    assert "synth/drafts: finished before speed-ray recorded fingerprints; kept as it is" in caplog.text
