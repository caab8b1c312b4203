"""GenerateStage with a fake engine: called directly, then inside a Ray Data actor pool."""

from __future__ import annotations

import pyarrow as pa
import pytest

from speed_ray.io.schemas import GENERATIONS
from speed_ray.synth import speed
from speed_ray.synth.stage import GenerateStage
from tests.fakes import FakeGenerator

SAMPLING = {"max_tokens": 32, "n": 2}


def example_rows():
    mix = {"classification": 1, "sts": 1, "retrieval": 1, "text_matching": 1}
    tasks = speed.task_requests([f"A/B{i}" for i in range(8)], mix, 0, 100)
    for t in tasks:  # pretend the brainstorm produced one task each
        t.update(task=t.get("task") or f"Task about {t['topic']}", error=None)
    return list(speed.example_requests(tasks, seed=0, max_chars=100))


def test_stage_called_directly():
    rows = example_rows()
    stage = GenerateStage(engine=None, sampling=SAMPLING, generator=FakeGenerator())
    out = stage(pa.Table.from_pylist(rows))
    assert out.num_rows == 2 * len(rows)  # one row per sample
    assert set(GenerateStage.OUTPUT_COLUMNS) <= set(out.column_names)
    gens = speed.parse_generations(out)
    errors = gens["error"].to_pylist()
    assert errors[0::2] == [None] * len(rows)  # sample 0 is canned JSON
    assert all(e.startswith("invalid JSON") for e in errors[1::2])  # sample 1 is "not json"
    assert speed.pick_drafts(speed.group_samples(gens)).num_rows == len(rows)


def test_stage_rejects_missing_columns():
    stage = GenerateStage(engine=None, sampling=SAMPLING, generator=FakeGenerator())
    with pytest.raises(
        ValueError, match=r"lacks the columns json_schema \(JSON schema.*\), seed \(per-row sampling seed\)"
    ):
        stage(pa.table({"id": ["1"], "messages": ["[]"]}))


def test_stage_in_a_ray_data_actor_pool(ray_session):
    ray = ray_session
    rows = example_rows()
    ds = ray.data.from_items(rows).repartition(4)
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={"engine": {}, "sampling": SAMPLING, "generator": FakeGenerator()},
        batch_size=3,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=1),
        num_cpus=0.5,
    ).map_batches(speed.parse_generations, batch_format="pyarrow", batch_size=None, num_cpus=0.25)
    table = pa.concat_tables(list(ds.iter_batches(batch_format="pyarrow", batch_size=None)))
    assert table.schema == GENERATIONS
    # every (id, sample) exactly once, none lost, none duplicated
    got = sorted(zip(table["id"].to_pylist(), table["sample"].to_pylist(), strict=True))
    assert got == sorted((r["id"], k) for r in rows for k in range(2))
    by_id = {r["id"]: r for r in table.to_pylist() if r["sample"] == 0}
    for r in rows:  # the canned text carries the row's own seed: outputs follow ids, not order
        assert str(r["seed"]) in by_id[r["id"]]["query"]


def test_a_gpu_pool_on_a_cluster_without_gpus_fails_at_once(ray_session, model_cache, tmp_path):
    """Ray would wait forever for a GPU actor it cannot place; the pool refuses before it is built."""
    import time

    from speed_ray.config import load_config
    from speed_ray.io.models import resolve_model
    from speed_ray.io.settings import ConfigError
    from speed_ray.io.shards import lay_out
    from speed_ray.synth.stage import engine_pool
    from tests.conftest import DEBIAN

    overrides = ["run.ray_address=auto", "synth.engine.model=tiny-llama", "synth.engine.num_gpus=1"]
    cfg = load_config(None, [*overrides, f"eval.retrieval.path={DEBIAN / 'retrieval'}"])
    resolve_model("tiny-llama")  # built on first use: not part of the time to fail
    started = time.time()
    with pytest.raises(
        ConfigError,
        match=r"vllm engine tiny-llama: needs 1 x \(0\.5 CPU, 1 GPU\), but the Ray cluster has 2 CPU, 0 GPU at most",
    ):
        files = lay_out(tmp_path / "generations", example_rows(), 256).request_files
        list(engine_pool(cfg, cfg.synth.engine, files, SAMPLING, speed.parse_generations))
    assert time.time() - started < 30
