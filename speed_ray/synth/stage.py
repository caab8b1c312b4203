"""The Ray Data side of synthesis: every model call of synth and align goes through here.

``GenerateStage`` is built once per actor (loads the engine) and called per batch. It checks its
input columns, sends one request per row, and returns one output row per sample with the raw text and
token counts; every input column is carried through so outputs never depend on row order.
``engine_pool`` streams request files through an autoscaling pool of them, and ``generate_step``
writes the parsed outputs as resumable shards (``speed_ray.io.shards``) with their accounting.
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
from speed_ray.io.models import resolve_model
from speed_ray.io.settings import ConfigError
from speed_ray.io.shards import ShardedWriter, lay_out, with_shard

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
    ) -> None:
        """``engine`` and ``model`` (resolved) build the engine; ``generator``: one to use instead."""
        if generator is None:
            assert engine is not None
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
    from speed_ray.ray_utils import init_ray, require_resources

    model = engine_model(cfg, eng, check=generator is None)
    # [1] Ray: start or join the cluster, and fail fast if the pool could never be placed.
    init_ray(cfg)
    gpus = eng.num_gpus * eng.tensor_parallel_size
    require_resources(f"{eng.kind} engine {eng.model}", eng.num_cpus, gpus)
    stage = dict(engine=eng, model=model, seed=cfg.run.seed, sampling=sampling, generator=generator)
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
        compute=ray.data.ActorPoolStrategy(min_size=eng.min_actors, max_size=eng.max_actors),
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
