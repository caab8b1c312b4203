"""embed: contrastive training (InfoNCE, in-batch + hard negatives) under Ray Train.

Consumes ``<run>/synth/examples``, a user's pairs file or an unlabelled corpus (``embed.data``); produces ``<run>/embed/model/``, a folder that
``sentence_transformers.SentenceTransformer(path)`` loads (pooling, normalisation and query prompt
saved), with ``_manifest.json`` and ``metrics.jsonl`` (one line per step).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.config import ConfigError, SpeedRayConfig
from speed_ray.models import resolve_model
from speed_ray.pipeline.common import log, step
from speed_ray.schemas import EXAMPLES, TRIPLETS, cast_rows, read_stage, write_json_atomic


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "embed" / "model"
    return step(out, "embed", lambda: _train(cfg))


def training_rows(cfg: SpeedRayConfig) -> tuple[pa.Table, dict[str, Any]]:
    """The TRIPLETS the trainer consumes, from ``embed.data.source``, and what was made of the input."""
    from speed_ray.data import read_corpus, read_pairs
    from speed_ray.pairs import CropRule, build_pairs

    d = cfg.embed.data
    if d.source == "synth":
        table = read_stage(cfg.run_dir / "synth" / "examples", EXAMPLES).select(TRIPLETS.names).cast(TRIPLETS)
        return table, {"source": "synth"}
    if d.source == "pairs":
        rows = [
            {"query": r["anchor"], "positive": r["positive"], "negative": r["negative"]}
            for r in read_pairs(Path(str(d.path)))
        ]
        return cast_rows(rows, TRIPLETS), {"source": "pairs", "path": d.path}
    rule = CropRule(d.crop_min_chars, d.crop_max_chars, d.sentences_per_crop)
    docs = read_corpus(Path(str(d.path)))
    pairs, skipped = build_pairs(docs, d.pair_mode, rule, seed=cfg.run.seed)
    reasons = Counter(s["reason"] for s in skipped)
    log(
        f"embed: {len(docs)} documents -> {len(pairs)} {d.pair_mode} pairs; skipped {len(skipped)}: {dict(reasons)}"
    )
    rows = [{"query": p["anchor"], "positive": p["positive"]} for p in pairs]
    info = {
        "source": "corpus",
        "path": d.path,
        "pair_mode": d.pair_mode,
        "documents": len(docs),
        "pairs": len(pairs),
        "skipped": dict(reasons),
    }
    return cast_rows(rows, TRIPLETS), info


def _train(cfg: SpeedRayConfig) -> dict:
    from speed_ray.ray_utils import train
    from speed_ray.train.embed import train_loop

    ec, res = cfg.embed, cfg.embed.resources
    started = time.time()
    examples, data_info = training_rows(cfg)
    need = res.workers * ec.batch_size
    if examples.num_rows < need:
        raise ConfigError(
            f"embed: {examples.num_rows} training rows from {ec.data.source}, expected at least "
            f"embed.resources.workers x embed.batch_size = {need}"
        )
    loop_config = {
        "model": resolve_model(ec.model),
        "pooling": ec.pooling,
        "max_seq_length": ec.max_seq_length,
        "batch_size": ec.batch_size,
        "steps": ec.steps,
        "learning_rate": ec.learning_rate,
        "warmup_steps": ec.warmup_steps,
        "train_last_blocks": ec.train_last_blocks,
        "temperature": ec.temperature,
        "chunk_size": ec.chunk_size,
        "query_instruction": ec.query_instruction,
        "cpus_per_worker": res.cpus_per_worker,
        "seed": cfg.run.seed,
    }
    out = cfg.run_dir / "embed" / "model"
    metrics = train(cfg, "embed", train_loop, loop_config, res, examples, out)
    history = metrics["history"]
    (cfg.run_dir / "embed" / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    manifest = {
        "base_model": ec.model,
        "pooling": ec.pooling,
        "workers": res.workers,
        "global_batch": res.workers * ec.batch_size,
        "train_rows": examples.num_rows,
        "data": data_info,
        "steps": metrics["steps"],
        "history": history,
        "probe": metrics["probe"],
        "duration_s": round(time.time() - started, 2),
    }
    write_json_atomic(out / "_manifest.json", manifest)
    log(f"embed: losses {[round(h['loss'], 4) for h in history]}")
    return manifest
