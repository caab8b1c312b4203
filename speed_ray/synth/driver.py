"""synth: topics -> tasks -> k samples per example prompt -> judge -> drafts -> revision -> MinHash
dedup, with every model call in an autoscaling Ray Data actor pool.

Produces under ``<run>/synth/``, one folder per step, each finished by a ``_manifest.json``:
- ``tasks/``: one task per topic for its task type (mix from config); STS takes the topic (TASKS);
- ``generations/``: ``samples_per_prompt`` samples per example prompt, parsed or with an ``error``;
- ``judgments/``: best and worst sample per prompt from ``synth.judge`` (JUDGMENTS; only with a judge);
- ``pairs/``: preference pairs for DPO, from the judge or, without one, a rule-based score;
- ``drafts/``: one example per prompt: the judge's best sample, else the first valid one;
- ``revisions/``: each draft rewritten once by ``synth.reviser`` (only with a reviser);
- ``examples/``: the final rows (revision where it parsed, else the draft), near duplicates removed,
  with their instruction, task type, topic and provenance (EXAMPLES);
- ``train/``: the same rows as the embedding training set in sentence-transformers' columns, exactly
  ``anchor`` (``Instruct: {instruction}\nQuery: {query}``), ``positive`` and ``negative`` (TRIPLETS):
  ``datasets.load_dataset("parquet", ...)`` loads it and ``SentenceTransformerTrainer`` trains on it.

The model-calling steps write fixed shards as they complete (``speed_ray.io.shards``): a killed run keeps
them, and the rerun only sends the missing shards' rows to the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.config import SpeedRayConfig
from speed_ray.engines.config import EngineConfig
from speed_ray.io.fingerprint import output_hash, path_hash, run_model_inputs
from speed_ray.io.models import resolve_model
from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    JUDGMENTS,
    PREFERENCE_PAIRS,
    TASKS,
    TRIPLETS,
    read_stage,
    write_stage,
)
from speed_ray.io.settings import ConfigError
from speed_ray.io.shards import ShardedWriter, lay_out, with_shard
from speed_ray.io.steps import log, pending, remove, step
from speed_ray.synth import speed

logger = logging.getLogger(__name__)

# What each step's output depends on (``speed_ray.io.fingerprint``): config keys, as dotted prefixes,
# besides the outputs of the steps it reads and its engine's section (named where the step runs).
SAMPLING = ("synth.sampling.temperature", "synth.sampling.top_p")
KEYS = {
    "tasks": (
        "run.seed",
        "synth.taxonomy",
        "synth.num_topics",
        "synth.mix",
        "synth.sampling.max_field_chars",
        "synth.sampling.brainstorm_max_tokens",
        *SAMPLING,
    ),
    "generations": (
        "run.seed",
        "synth.examples_per_task",
        "synth.sampling.max_field_chars",
        "synth.sampling.max_tokens",
        "synth.sampling.samples_per_prompt",
        *SAMPLING,
    ),
    "judgments": ("run.seed", "synth.sampling.max_field_chars", "synth.sampling.judge_max_tokens"),
    "pairs": (),
    "drafts": (),
    "revisions": (
        "run.seed",
        "synth.sampling.max_field_chars",
        "synth.sampling.revise_max_tokens",
        *SAMPLING,
    ),
    "examples": ("run.seed", "synth.dedup"),
    "train": (),  # the examples alone
}


def fingerprint(
    cfg: SpeedRayConfig, name: str, inputs: dict[str, Any], engine: str | None = None
) -> dict[str, Any]:
    """Step ``name``'s fingerprint: its ``KEYS``, the section of the engine it calls (``synth.judge``),
    the output hashes of the step manifests in ``inputs``, and the models of this run it generates with."""
    hashes = {f"synth/{k}": output_hash(m) for k, m in inputs.items()}
    tax = cfg.synth.taxonomy
    if name == "tasks" and tax.path is not None and not tax.topics:
        hashes["synth.taxonomy.path"] = path_hash(tax.path)  # the file's topics
    if engine is not None:
        spec = engine_at(cfg, engine).model
        hashes |= run_model_inputs([spec], cfg.run_dir)
    return cfg.fingerprint((*KEYS[name], *([engine] if engine else [])), hashes)


def engine_at(cfg: SpeedRayConfig, key: str) -> EngineConfig:
    """The engine at dotted ``key`` (``synth.judge``)."""
    section, name = key.split(".")
    eng = getattr(getattr(cfg, section), name)
    assert eng is not None, key
    return eng


def run(cfg: SpeedRayConfig) -> dict:
    sc, out = cfg.synth, cfg.run_dir / "synth"
    seed, max_chars, sampling = cfg.run.seed, sc.sampling.max_field_chars, sc.sampling
    try:
        topics = speed.load_topics(sc.taxonomy.path, sc.taxonomy.topics, sc.num_topics, seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger.info(f"synth: {len(topics)} topics, mix {sc.mix}, generator {sc.engine.kind}:{sc.engine.model}")
    for eng in (sc.engine, sc.brainstormer, sc.judge, sc.reviser):
        if eng is not None and eng.model.startswith("run:"):
            resolve_model(
                eng.model, cfg.run_dir
            )  # fails now, not after the first steps, if align has not run
    manifests: dict[str, Any] = {}

    def tasks() -> dict:
        rows = speed.task_requests(topics, sc.mix, seed, max_chars)
        params = sampling_params(sampling.brainstorm_max_tokens, sampling.temperature, sampling.top_p, 1)
        return generate_step(
            cfg,
            sc.brainstormer or sc.engine,
            out / "tasks",
            TASKS,
            rows,
            params,
            speed.parse_tasks,
            ready=speed.is_sts,
            ready_parse=speed.sts_tasks,
        )

    def generations() -> dict:
        task_rows = read_stage(out / "tasks", TASKS).to_pylist()
        rows = speed.example_requests(task_rows, seed, max_chars, sc.examples_per_task)
        params = sampling_params(
            sampling.max_tokens, sampling.temperature, sampling.top_p, sampling.samples_per_prompt
        )
        return generate_step(
            cfg, sc.engine, out / "generations", GENERATIONS, rows, params, speed.parse_generations
        )

    brainstormer = "synth.brainstormer" if sc.brainstormer is not None else "synth.engine"
    manifests["tasks"] = step(
        out / "tasks", "synth/tasks", tasks, fingerprint(cfg, "tasks", {}, brainstormer)
    )
    manifests["generations"] = step(
        out / "generations",
        "synth/generations",
        generations,
        fingerprint(cfg, "generations", {"tasks": manifests["tasks"]}, "synth.engine"),
    )
    groups = speed.group_samples(read_stage(out / "generations", GENERATIONS))

    judgments = None
    if sc.judge is not None:
        judge = sc.judge

        def judge_step() -> dict:
            rows = speed.judge_requests(groups, seed, max_chars)
            params = sampling_params(sampling.judge_max_tokens, 0.0, 1.0, 1)  # SPEED App. B: judge at T=0
            return generate_step(
                cfg, judge, out / "judgments", JUDGMENTS, rows, params, speed.parse_judgments
            )

        manifests["judgments"] = step(
            out / "judgments",
            "synth/judgments",
            judge_step,
            fingerprint(cfg, "judgments", {"generations": manifests["generations"]}, "synth.judge"),
        )
        judgments = read_stage(out / "judgments", JUDGMENTS)
    else:
        _no_longer_configured(out / "judgments", "synth/judgments", "synth.judge")

    def pairs() -> dict:
        started = time.time()
        table, dropped = speed.preference_pairs(groups, judgments)
        judged = sum(r.startswith("judge: ") for r in table["reason"].to_pylist())
        extra = {"judged": judged, "rule_scored": table.num_rows - judged, "dropped": dropped}
        return write_stage(out / "pairs", [table], PREFERENCE_PAIRS, extra, started)

    def drafts() -> dict:
        started = time.time()
        table = speed.pick_drafts(groups, judgments)
        return write_stage(out / "drafts", [table], GENERATIONS, {"prompts": len(groups)}, started)

    picked: dict[str, Any] = {k: manifests[k] for k in ("generations", "judgments") if k in manifests}
    manifests["pairs"] = step(out / "pairs", "synth/pairs", pairs, fingerprint(cfg, "pairs", picked))
    manifests["drafts"] = step(out / "drafts", "synth/drafts", drafts, fingerprint(cfg, "drafts", picked))

    revisions = None
    if sc.reviser is not None:
        reviser = sc.reviser

        def revise_step() -> dict:
            rows = speed.revise_requests(read_stage(out / "drafts", GENERATIONS).to_pylist(), seed, max_chars)
            params = sampling_params(sampling.revise_max_tokens, sampling.temperature, sampling.top_p, 1)
            return generate_step(
                cfg, reviser, out / "revisions", GENERATIONS, rows, params, speed.parse_revisions
            )

        manifests["revisions"] = step(
            out / "revisions",
            "synth/revisions",
            revise_step,
            fingerprint(cfg, "revisions", {"drafts": manifests["drafts"]}, "synth.reviser"),
        )
        revisions = read_stage(out / "revisions", GENERATIONS)
    else:
        _no_longer_configured(out / "revisions", "synth/revisions", "synth.reviser")

    manifests["examples"] = step(
        out / "examples",
        "synth/examples",
        lambda: examples_step(cfg, out, revisions),
        fingerprint(cfg, "examples", {k: manifests[k] for k in ("drafts", "revisions") if k in manifests}),
    )
    manifests["train"] = step(
        out / "train",
        "synth/train",
        lambda: training_set_step(out),
        fingerprint(cfg, "train", {"examples": manifests["examples"]}),
    )
    return manifests


def _no_longer_configured(out_dir: Path, name: str, key: str) -> None:
    """An optional step's folder from a run that had it configured: stale, so removed."""
    if out_dir.exists():
        log(f"{name}: stale: {key} is null now; removed {out_dir}")
    for path in (out_dir, pending(out_dir)):
        remove(path)


def sampling_params(max_tokens: int, temperature: float, top_p: float, n: int) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "n": n}


def examples_step(cfg: SpeedRayConfig, out: Path, revisions: pa.Table | None) -> dict:
    """Final rows (revised where possible), then MinHash LSH near-duplicate removal on Ray Data."""
    started = time.time()
    rows = speed.final_rows(read_stage(out / "drafts", GENERATIONS), revisions)
    extra: dict[str, Any] = {"drafts": rows.num_rows}
    if revisions is not None:
        extra["revised"] = rows.num_rows - sum(r == "examples" for r in rows["round"].to_pylist())
    dd = cfg.synth.dedup
    if dd.enabled and rows.num_rows > 1:
        import ray

        from speed_ray.ray_utils import init_ray
        from speed_ray.synth.dedup import dedup

        init_ray(cfg)
        kept, stats, _ = dedup(
            ray.data.from_arrow(rows),
            ["query", "positive"],
            threshold=dd.threshold,
            num_perm=dd.num_perm,
            shingle_size=dd.shingle_size,
            seed=cfg.run.seed,
            # Shuffle partitions grow with the data (Ray's default of 200 is slow on a laptop).
            num_partitions=min(200, max(2, rows.num_rows // 5000)),
        )
        table = pa.concat_tables([t for t in kept.iter_batches(batch_format="pyarrow", batch_size=None)])
        rows = table.sort_by("id") if table.num_rows else EXAMPLES.empty_table()
        extra["dedup"] = stats
        logger.info(f"synth/examples: MinHash dedup removed {stats['removed']} of {stats['input_rows']} rows")
    return write_stage(out / "examples", [rows], EXAMPLES, extra, started)


def training_set_step(out: Path) -> dict:
    """``examples/`` as the embedding training set: the three text columns and nothing else, since
    sentence-transformers embeds every column of its training dataset."""
    started = time.time()
    table = speed.training_triplets(read_stage(out / "examples", EXAMPLES))
    return write_stage(out / "train", [table], TRIPLETS, {"examples": table.num_rows}, started)


def generate_step(
    cfg: SpeedRayConfig,
    eng: EngineConfig,
    out_dir: Path,
    schema: pa.Schema,
    rows: Iterable[dict[str, Any]],
    sampling: dict[str, Any],
    parse: Callable[[pa.Table], pa.Table],
    ready: Callable[[dict[str, Any]], bool] | None = None,
    ready_parse: Callable[[list[dict[str, Any]]], pa.Table] | None = None,
    generator: Any = None,
) -> dict:
    """Run ``rows`` (streamed, in order) through the engine pool into resumable shards. Rows for which
    ``ready`` holds need no model call: ``ready_parse`` turns them into outputs. ``generator``: an
    engine object to use instead of building one from ``eng`` (tests and benchmarks)."""
    started = time.time()
    layout = lay_out(out_dir, rows, cfg.synth.shard_rows, ready)
    writer = ShardedWriter(out_dir, schema, layout, sampling["n"])
    if layout.done:
        logger.info(
            f"{out_dir.name}: resuming, {len(layout.done)} of {len(layout.sizes)} shards already written"
        )
    if layout.ready and ready_parse is not None:
        inputs = pa.Table.from_pylist(layout.ready)
        writer.add(with_shard(ready_parse(layout.ready), inputs))
    for table in engine_pool(cfg, eng, layout.request_files, sampling, parse, generator):
        writer.add(table)
    prices = (eng.price_per_million_input_tokens, eng.price_per_million_output_tokens)
    extra = {"engine": eng.kind, "model": eng.model, "sampling": sampling, "rows_in": sum(layout.sizes)}
    return writer.finish(extra, started, prices)


def engine_kwargs(eng: EngineConfig, seed: int, run_dir: Path | None = None) -> dict[str, Any]:
    """Constructor arguments of the engine class for ``eng.kind`` (no secret: only the variable name)."""
    if eng.kind == "openai":
        return {
            "kind": "openai",
            "model": eng.model,
            "base_url": eng.base_url,
            "api_key_env": eng.api_key_env,
            "timeout_s": eng.timeout_s,
            "max_retries": eng.max_retries,
            "max_concurrency": eng.max_concurrency,
            "requests_per_second": eng.requests_per_second,
            "seed": seed,
        }
    common = {
        "kind": eng.kind,
        "model": resolve_model(eng.model, run_dir),
        "max_model_len": eng.max_model_len,
    }
    if eng.kind == "transformers":
        return common | {"dtype": eng.dtype, "seed": seed}
    return common | {
        "dtype": eng.dtype,
        "kv_cache_gib": eng.kv_cache_gib,
        "enforce_eager": eng.enforce_eager,
        "tensor_parallel_size": eng.tensor_parallel_size,
        "seed": seed,
    }


def engine_pool(
    cfg: SpeedRayConfig,
    eng: EngineConfig,
    request_files: list[str],
    sampling: dict[str, Any],
    parse: Callable[[pa.Table], pa.Table],
    generator: Any = None,
) -> Iterator[pa.Table]:
    """Stream the rows of ``request_files`` (Parquet, read on the workers) through an autoscaling engine
    actor pool and ``parse``; yields parsed blocks, each row with its input's ``shard``."""
    if not request_files:
        return
    import ray

    from speed_ray.ray_utils import init_ray, require_resources
    from speed_ray.synth.stage import GenerateStage

    kwargs = engine_kwargs(eng, cfg.run.seed, cfg.run_dir)
    if eng.kind == "openai" and generator is None:
        # An unreachable teacher fails here, with its URL, before any pool is built.
        from speed_ray.engines.openai_http import EngineUnreachable, OpenAIGenerator

        try:
            OpenAIGenerator(**{k: v for k, v in kwargs.items() if k != "kind"}).check_reachable()
        except EngineUnreachable as e:
            raise ConfigError(f"{eng.kind} engine {eng.model}: {e}") from None
    # [1] Ray: start or join the cluster, and fail fast if the pool could never be placed.
    init_ray(cfg)
    gpus = eng.num_gpus * eng.tensor_parallel_size
    require_resources(f"{eng.kind} engine {eng.model}", eng.num_cpus, gpus)
    # [2] Ray Data reads the request files on the workers (the driver never holds the inputs) and
    # cuts them, streaming, into blocks of one batch: a block goes to one actor, so small blocks let
    # every actor of the pool work (the reader would hand a whole shard, or several, to one).
    ds: Any = ray.data.read_parquet(request_files).repartition(target_num_rows_per_block=eng.batch_size)
    # Outputs in input order: shards complete one after another, so the driver buffers about one
    # shard's outputs at a time, however many rows stream through.
    ds.context.execution_options.preserve_order = True
    # [3] The autoscaling engine pool, then parsing as plain tasks.
    ds = ds.map_batches(
        GenerateStage,
        fn_constructor_kwargs={"engine": kwargs, "sampling": sampling, "generator": generator},
        batch_size=eng.batch_size,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=eng.min_actors, max_size=eng.max_actors),
        num_cpus=eng.num_cpus,
        num_gpus=gpus,
    )
    ds = ds.map_batches(
        parse_keeping_shard,
        fn_kwargs={"parse": parse},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
    )
    # [4] Stream results back; the caller writes each shard as soon as it is complete.
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def parse_keeping_shard(batch: pa.Table, parse: Callable[[pa.Table], pa.Table]) -> pa.Table:
    return with_shard(parse(batch), batch)
