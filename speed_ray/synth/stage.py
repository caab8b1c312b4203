"""The Ray Data side of synthesis: every model call of synth and align goes through here.

``GenerateStage`` is built once per actor (loads the engine) and called per batch. It checks its
input columns, sends one request per row, and returns one output row per sample with the raw text and
token counts; every input column is carried through so outputs never depend on row order.
``engine_pool`` streams request files through an autoscaling pool of them, and ``generate_step``
writes the parsed outputs as resumable shards (``speed_ray.io.shards``) with their accounting.

The steps after generation run shard by shard on the workers too (``shard_map``: a Ray Data map over
shard numbers, each task reading its shard of the steps before): ``derive_step`` for the steps
without a model (pairs, drafts, examples, the training set) and ``generate_derived`` for the
requests of the judge and the reviser. The driver handles shard numbers, counts and manifests only.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.config import SpeedRayConfig
from speed_ray.engines import Request, Sampling, build_generator
from speed_ray.engines.config import EngineConfig
from speed_ray.engines.watch import watch_descendants
from speed_ray.io.models import resolve_model
from speed_ray.io.schemas import finished_manifest
from speed_ray.io.secrets import Secret, export
from speed_ray.io.settings import ConfigError
from speed_ray.io.shards import (
    DONE,
    Layout,
    ShardedWriter,
    finish_derived,
    finished_shards,
    lay_out,
    requests_plan,
    start_requests,
    with_shard,
    write_derived,
    write_requests,
)

logger = logging.getLogger(__name__)


class GenerateStage:
    REQUIRED_COLUMNS = {
        "id": "stable row id",
        "messages": "the chat, as a JSON list of {role, content}",
        "json_schema": "JSON schema for structured output, or '' for free text",
        "seed": "per-row sampling seed",
    }
    OUTPUT_COLUMNS = {
        "sample": "sample index within the row (0..n-1)",
        "raw": "generated text",
        "generator": "engine model name",
        "num_input_tokens": "prompt tokens",
        "num_output_tokens": "generated tokens",
        "engine_error": "why the engine gave no text for this sample (null when it did)",
    }

    def __init__(
        self,
        engine: EngineConfig | None,
        sampling: dict[str, Any],
        generator: Any = None,
        model: str = "",
        seed: int = 0,
        secrets: dict[str, Secret] | None = None,
    ) -> None:
        """``engine`` and ``model`` (resolved) build the engine; ``generator``: one to use instead;
        ``secrets``: the API key and hub token the engine reads from the environment (handed by the
        driver, so the actor's node needs none of them)."""
        export(secrets)
        if generator is None:
            assert engine is not None
            if engine.kind == "vllm":  # vLLM's engine processes must not outlive this actor
                watch_descendants()
            generator = build_generator(engine, model, seed)
        self.engine = generator
        self.sampling = Sampling(**sampling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in self.REQUIRED_COLUMNS if c not in batch.column_names]
        if missing:
            need = ", ".join(f"{c} ({self.REQUIRED_COLUMNS[c]})" for c in missing)
            raise ValueError(f"GenerateStage: input batch lacks the columns {need}")
        rows = batch.to_pylist()
        requests = [
            Request(
                json.loads(r["messages"]),
                int(r["seed"]),
                json.loads(r["json_schema"]) if r["json_schema"] else None,
            )
            for r in rows
        ]
        outputs = self.engine.generate(requests, self.sampling)
        out = []
        for row, completions in zip(rows, outputs, strict=True):
            for k, c in enumerate(completions):
                out.append(
                    {
                        **row,
                        "sample": k,
                        "raw": c.text,
                        "generator": self.engine.name,
                        "num_input_tokens": c.num_input_tokens,
                        "num_output_tokens": c.num_output_tokens,
                        "engine_error": c.error,
                    }
                )
        return pa.Table.from_pylist(out)


def sampling_params(max_tokens: int, temperature: float, top_p: float, n: int) -> dict[str, Any]:
    return {"max_tokens": max_tokens, "temperature": temperature, "top_p": top_p, "n": n}


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
    return _generate(cfg, eng, out_dir, schema, layout, sampling, parse, started, ready_parse, generator)


def generate_derived(
    cfg: SpeedRayConfig,
    eng: EngineConfig,
    out_dir: Path,
    schema: pa.Schema,
    reads: list[tuple[Path, pa.Schema]],
    requests: Callable[..., list[dict[str, Any]]],
    kwargs: dict[str, Any],
    sampling: dict[str, Any],
    parse: Callable[[pa.Table], pa.Table],
    generator: Any = None,
) -> dict:
    """A generation step over the output of earlier steps (the judge, the reviser): ``requests`` turns
    shard ``s`` of ``reads`` into the requests of shard ``s``, on the workers (``shard_map``), which
    write them as the step's request files; then as ``generate_step``. The driver sees only counts."""
    started = time.time()
    num_shards = shard_count(reads)
    done = start_requests(out_dir)
    fn_kwargs = {"out_dir": out_dir, "reads": reads, "fn": requests, "kwargs": kwargs, "done": done}
    made = {
        r["shard"]: (r["rows"], r["ids_sha256"])
        for r in shard_map(cfg, range(num_shards), _requests_batch, fn_kwargs, f"{out_dir.name} requests")
    }
    sizes = [made[s][0] for s in range(num_shards)]
    layout = requests_plan(out_dir, sizes, [made[s][1] for s in range(num_shards)], done)
    return _generate(cfg, eng, out_dir, schema, layout, sampling, parse, started, generator=generator)


def _generate(
    cfg: SpeedRayConfig,
    eng: EngineConfig,
    out_dir: Path,
    schema: pa.Schema,
    layout: Layout,
    sampling: dict[str, Any],
    parse: Callable[[pa.Table], pa.Table],
    started: float,
    ready_parse: Callable[[list[dict[str, Any]]], pa.Table] | None = None,
    generator: Any = None,
) -> dict:
    """The laid-out requests through the engine pool into shards, then the manifest."""
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


def derive_step(
    cfg: SpeedRayConfig,
    out_dir: Path,
    schema: pa.Schema,
    reads: list[tuple[Path, pa.Schema]],
    fn: Callable[..., tuple[pa.Table, dict[str, Any]]],
    kwargs: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    started: float | None = None,
) -> dict:
    """A step made shard by shard from the steps it ``reads``, without a model: each pending shard
    ``s`` is ``fn`` over shard ``s`` of every step read, made and written on a worker
    (``speed_ray.io.shards.write_derived``). Shards finished by an earlier, killed run are kept; the
    driver handles only shard numbers, row counts and the manifest. ``started``: when the step began,
    if before this call."""
    started = started or time.time()
    num_shards = shard_count(reads)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / DONE).mkdir(exist_ok=True)
    todo = [s for s in range(num_shards) if s not in finished_shards(out_dir)]
    if len(todo) < num_shards:
        logger.info(
            f"{out_dir.name}: resuming, {num_shards - len(todo)} of {num_shards} shards already written"
        )
    fn_kwargs = {"out_dir": out_dir, "reads": reads, "fn": fn, "schema": schema, "kwargs": kwargs or {}}
    written = sum(r["rows"] for r in shard_map(cfg, todo, _derive_batch, fn_kwargs, out_dir.name))
    return finish_derived(out_dir, schema, num_shards, extra or {}, started, written)


def shard_count(reads: list[tuple[Path, pa.Schema]]) -> int:
    """The number of shards of the steps read, which must agree (each was derived from the first)."""
    counts = {str(d): len(finished_manifest(d)["files"]) for d, _ in reads}
    if len(set(counts.values())) != 1:
        raise ValueError(f"steps read shard by shard have different numbers of shards: {counts}")
    return next(iter(counts.values()))


def shard_map(
    cfg: SpeedRayConfig, shards: Iterable[int], fn: Callable, fn_kwargs: dict[str, Any], name: str
) -> list[dict[str, Any]]:
    """``fn`` over each shard number on Ray Data workers, one shard per batch; the rows ``fn`` returns
    (a few numbers per shard) come back to the driver."""
    shards = list(shards)
    if not shards:
        return []
    import ray

    from speed_ray.ray_utils import init_ray

    init_ray(cfg)
    ds: Any = ray.data.from_items([{"shard": s} for s in shards])
    ds = ds.map_batches(
        fn, fn_kwargs=fn_kwargs, batch_size=1, batch_format="pyarrow", num_cpus=SHARD_MAP_CPUS
    )
    logger.info(f"{name}: {len(shards)} shards on the workers")
    return [r for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]


SHARD_MAP_CPUS = 1.0
"""CPUs per shard task: the transforms are plain Python, one core each."""


def _derive_batch(batch: pa.Table, out_dir: Path, **kw: Any) -> pa.Table:
    rows = [write_derived(out_dir, s, **kw) for s in batch["shard"].to_pylist()]
    return pa.table({"shard": batch["shard"], "rows": pa.array(rows, pa.int64())})


def _requests_batch(batch: pa.Table, out_dir: Path, **kw: Any) -> pa.Table:
    made = [write_requests(out_dir, s, **kw) for s in batch["shard"].to_pylist()]
    return pa.table(
        {
            "shard": batch["shard"],
            "rows": pa.array([n for n, _ in made], pa.int64()),
            "ids_sha256": pa.array([h for _, h in made], pa.string()),
        }
    )


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
    from speed_ray.ray_utils import init_ray, require_resources, run_secrets

    model = engine_model(cfg, eng, check=generator is None)
    # [1] Ray: start or join the cluster, and wait (up to run.resource_wait_s) for room for the pool.
    init_ray(cfg)
    gpus = eng.num_gpus * eng.tensor_parallel_size
    require_resources(cfg, f"{eng.kind} engine {eng.model}", eng.num_cpus, gpus, count=eng.min_actors)
    stage = dict(
        engine=eng,
        model=model,
        seed=cfg.run.seed,
        sampling=sampling,
        generator=generator,
        secrets=run_secrets(cfg),
    )
    ds = _pool(request_files, eng, stage, parse)
    # [4] Stream results back; the caller writes each shard as soon as it is complete.
    yield from ds.iter_batches(batch_format="pyarrow", batch_size=None)


def _pool(request_files: list[str], eng: EngineConfig, stage: dict[str, Any], parse: Callable) -> Any:
    """The dataset: request files -> blocks of one batch -> the engine actor pool -> parsing."""
    import ray

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
        fn_constructor_kwargs=stage,
        batch_size=eng.batch_size,
        batch_format="pyarrow",
        # One batch in flight per actor: a batch waits in the pool's queue, not behind another on a
        # busy actor, so a new actor takes the next one; and outputs come back in order from the start
        # (with two in flight, the measured first output came back one batch late).
        compute=ray.data.ActorPoolStrategy(
            min_size=eng.min_actors, max_size=eng.max_actors, max_tasks_in_flight_per_actor=1
        ),
        num_cpus=eng.num_cpus,
        num_gpus=eng.num_gpus * eng.tensor_parallel_size,
    )
    ds = ds.map_batches(
        parse_keeping_shard,
        fn_kwargs={"parse": parse},
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=0.25,
    )
    return ds


def engine_model(cfg: SpeedRayConfig, eng: EngineConfig, check: bool = True) -> str:
    """The model the engine loads: a local folder (or this run's model), or for ``openai`` the
    server's model name, with the server checked (with ``check``) so that an unreachable teacher
    fails here, with its URL, before any pool is built."""
    if eng.kind != "openai":
        return resolve_model(eng.model, cfg.run_dir)
    if check:
        from speed_ray.engines.openai_http import EngineUnreachable, OpenAIGenerator

        try:
            OpenAIGenerator.from_config(eng, eng.model, cfg.run.seed).check_reachable()
        except EngineUnreachable as e:
            raise ConfigError(f"{eng.kind} engine {eng.model}: {e}") from None
    return eng.model


def parse_keeping_shard(batch: pa.Table, parse: Callable[[pa.Table], pa.Table]) -> pa.Table:
    return with_shard(parse(batch), batch)
