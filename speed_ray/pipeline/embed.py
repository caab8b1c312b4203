"""embed: contrastive training (InfoNCE, in-batch + hard negatives) under Ray Train.

Consumes ``<run>/synth/examples``; produces ``<run>/embed/model/``, a folder that
``sentence_transformers.SentenceTransformer(path)`` loads (pooling, normalisation and query prompt
saved), with ``_manifest.json`` and ``metrics.jsonl`` (one line per step).
"""

from __future__ import annotations

import json
import time

from speed_ray.config import ConfigError, SpeedRayConfig
from speed_ray.models import resolve_model
from speed_ray.pipeline.common import log, step
from speed_ray.schemas import EXAMPLES, read_stage, write_json_atomic


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "embed" / "model"
    return step(out, "embed", lambda: _train(cfg))


def _train(cfg: SpeedRayConfig) -> dict:
    from speed_ray.ray_utils import train
    from speed_ray.train.embed import train_loop

    ec, res = cfg.embed, cfg.embed.resources
    started = time.time()
    examples = read_stage(cfg.run_dir / "synth" / "examples", EXAMPLES)
    need = res.workers * ec.batch_size
    if examples.num_rows < need:
        raise ConfigError(
            f"embed: {examples.num_rows} training rows from synth, expected at least "
            f"embed.resources.workers x embed.batch_size = {need}"
        )
    loop_config = {
        "model": resolve_model(ec.model),
        "pooling": ec.pooling,
        "max_seq_length": ec.max_seq_length,
        "batch_size": ec.batch_size,
        "steps": ec.steps,
        "learning_rate": ec.learning_rate,
        "temperature": ec.temperature,
        "chunk_size": ec.chunk_size,
        "query_instruction": ec.query_instruction,
        "cpus_per_worker": res.cpus_per_worker,
        "seed": cfg.run.seed,
    }
    out = cfg.run_dir / "embed" / "model"
    data = examples.select(["instruction", "query", "positive", "negative"])
    metrics = train(cfg, "embed", train_loop, loop_config, res, data, out)
    history = metrics["history"]
    (cfg.run_dir / "embed" / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    manifest = {
        "base_model": ec.model,
        "pooling": ec.pooling,
        "workers": res.workers,
        "global_batch": res.workers * ec.batch_size,
        "train_rows": examples.num_rows,
        "steps": metrics["steps"],
        "history": history,
        "duration_s": round(time.time() - started, 2),
    }
    write_json_atomic(out / "_manifest.json", manifest)
    log(f"embed: losses {[round(h['loss'], 4) for h in history]}")
    return manifest
