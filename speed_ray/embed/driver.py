"""embed: contrastive training (InfoNCE, in-batch + hard negatives) under Ray Train.

Consumes ``<run>/synth/train`` (the synthetic training set), a user's pairs file (both read by
``speed_ray.io.data.read_pairs``) or an unlabelled corpus (``embed.data``); produces
``<run>/embed/model/``, a folder that ``sentence_transformers.SentenceTransformer(path)`` loads
(pooling, normalisation and query prompt saved) with sentence-transformers' own model card
(README.md: base model, training set, hyperparameters and losses; the eval stage adds its scores),
``_manifest.json`` and ``metrics.jsonl`` (one line per step).
"""

from __future__ import annotations

import json
import logging
import textwrap
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.embed.config import embed_finetune
from speed_ray.io.fingerprint import output_hash, path_hash
from speed_ray.io.models import resolve_model
from speed_ray.io.schemas import finished_manifest, read_manifest, write_json_atomic
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import log, step

# What the model depends on (``speed_ray.io.fingerprint`` leaves out what only places or paces the
# training): every embed setting, the seed, and the training data (``fingerprint``).
KEYS = ("run.seed", "embed")

logger = logging.getLogger(__name__)


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "embed" / "model"
    # A stale model goes with its curve, snapshots and Ray Train's checkpoints (a rerun resumes from them).
    state = (
        cfg.run_dir / "embed" / "metrics.jsonl",
        cfg.run_dir / "embed" / "snapshots",
        cfg.run_dir / "ray" / "embed",
    )
    return step(out, "embed", lambda: _train(cfg), fingerprint(cfg), state)


def fingerprint(cfg: SpeedRayConfig) -> dict:
    """The embed step's fingerprint: ``KEYS`` and the data it trains on (synth/train's output, or
    the pairs or corpus file's content)."""
    d = cfg.embed.data
    if d.source == "synth":
        train = (Path(d.path).resolve() if d.path else cfg.run_dir) / "synth" / "train"
        data = {"synth/train": output_hash(read_manifest(train))}
    else:
        data = {"embed.data.path": path_hash(d.path)}
    return cfg.fingerprint(KEYS, data)


def training_data(cfg: SpeedRayConfig):
    """(data, info): what the trainer draws its batches from (``train.embed.Rows`` or
    ``CorpusPairs``), from ``embed.data.source``, and what was made of the input."""
    from speed_ray.embed.model import split_query
    from speed_ray.embed.pairs import build_pairs
    from speed_ray.embed.train import CorpusPairs, Rows
    from speed_ray.io.data import locate, nested_sample, read_corpus, read_pairs

    d = cfg.embed.data
    if d.source in ("synth", "pairs"):
        if d.source == "synth":
            path = (Path(d.path).resolve() if d.path else cfg.run_dir) / "synth" / "train"
            finished_manifest(path)  # a step that has not finished is never read
        else:
            path = locate(str(d.path))
        # An anchor in SPEED/E5 form carries its instruction: the trainer applies it as it applies
        # every instruction (decoders see it, encoders the bare query: ``embedding.format_query``).
        rows = [
            dict(zip(("instruction", "query"), split_query(r["anchor"]), strict=True))
            | {"positive": r["positive"], "negatives": r["negatives"]}
            for r in read_pairs(path)
        ]
        kept = nested_sample(rows, d.max_rows, cfg.run.seed)
        if d.source == "synth":
            log(f"embed: {len(kept)} of {len(rows)} synthetic rows from {path}")
        where = str(path) if d.source == "synth" else d.path
        return Rows(kept), {"source": d.source, "path": where, "rows_available": len(rows)}
    rule = d.crop_rule()
    docs = read_corpus(locate(str(d.path)))
    held_out = 0
    if d.holdout_fraction:
        from speed_ray.io.data import holdout_ids

        test = holdout_ids([doc["id"] for doc in docs], d.holdout_fraction, d.holdout_seed)
        docs = [doc for doc in docs if doc["id"] not in test]
        held_out = len(test)
        logger.info(f"embed: {held_out} documents held out ({d.holdout_fraction:.0%}, seed {d.holdout_seed})")
    pairs, skipped = build_pairs(docs, d.pair_mode, rule, seed=cfg.run.seed)
    reasons = Counter(s["reason"] for s in skipped)
    logger.info(
        f"embed: {len(docs)} documents -> {len(pairs)} {d.pair_mode} pairs per epoch (drawn anew each "
        f"epoch); {len(skipped)} documents too short for a pair: {dict(reasons)}"
    )
    info = {
        "source": "corpus",
        "path": d.path,
        "pair_mode": d.pair_mode,
        "documents": len(docs),
        "pairs": len(pairs),
        "skipped": dict(reasons),
        "skipped_ids": [s["id"] for s in skipped][:100],
        "held_out": held_out,
    }
    return CorpusPairs(docs, d.pair_mode, rule, cfg.run.seed, size=len(pairs)), info


def num_negatives(data, wanted: int) -> int:
    """Hard negatives per query: ``embed.hard_negatives``, or fewer if no row has that many."""
    rows = getattr(data, "rows", [])
    return min(wanted, max((len(r["negatives"]) for r in rows), default=0))


def loop_config(cfg: SpeedRayConfig, negatives: int) -> dict[str, Any]:
    """What every worker needs besides the data (plain values: Ray pickles it to each worker)."""
    ec = cfg.embed
    settings = {k: v for k, v in asdict(ec).items() if k not in ("data", "resources", "max_failures")}
    return settings | {
        "model": resolve_model(ec.model),
        "finetune": embed_finetune(ec),
        "num_negatives": negatives,
        "cpus_per_worker": ec.resources.cpus_per_worker,
        "seed": cfg.run.seed,
        "snapshot_dir": str(cfg.run_dir / "embed" / "snapshots"),
    }


def _train(cfg: SpeedRayConfig) -> dict:
    import ray

    from speed_ray.embed.train import train_loop
    from speed_ray.ray_utils import init_ray, train

    ec, res = cfg.embed, cfg.embed.resources
    started = time.time()
    data, data_info = training_data(cfg)
    need = res.workers * ec.batch_size
    if len(data) < need:
        raise ConfigError(
            f"embed: {len(data)} training rows from {ec.data.source}, expected at least one global batch: "
            f"embed.resources.workers x embed.batch_size = {need}"
        )
    negatives = num_negatives(data, ec.hard_negatives)
    config = loop_config(cfg, negatives)
    config["model_card"] = card_info(cfg, data_info, len(data), negatives)
    init_ray(cfg)
    config["data"] = ray.put(data)  # the object store carries the rows to every node's workers
    out = cfg.run_dir / "embed" / "model"
    metrics = train(cfg, "embed", train_loop, config, res, None, out, ec.max_failures)
    history = metrics["history"]
    (cfg.run_dir / "embed" / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    manifest = {
        "base_model": ec.model,
        "pooling": ec.pooling,
        "train_last_blocks": ec.train_last_blocks,
        "finetune": config["finetune"],
        "trainable_params": metrics["trainable_params"],
        "workers": res.workers,
        "global_batch": res.workers * ec.batch_size,
        "hard_negatives": negatives,
        "train_rows": len(data),
        "epochs": round(metrics["steps"] * need / len(data), 3),
        "data": data_info,
        "steps": metrics["steps"],
        "resumed_from_step": metrics["resumed_from_step"],
        "history": history,
        "probe": metrics["probe"],
        "model_card": config["model_card"],
        "duration_s": round(time.time() - started, 2),
    }
    write_json_atomic(out / "_manifest.json", manifest)
    logger.info(f"embed: losses {[round(h['loss'], 4) for h in history]}")
    return manifest


def card_info(cfg: SpeedRayConfig, data: dict[str, Any], rows: int, negatives: int) -> dict[str, Any]:
    """What the model card says besides the model itself (plain values, for the workers and the
    manifest; ``embedding.model_card_data`` turns them into sentence-transformers' card data)."""
    ec, res = cfg.embed, cfg.embed.resources
    path = Path(str(data["path"]))
    if data["source"] == "synth":
        name = f"{path.parents[1].name}/synth/train"  # <run>/synth/train
    elif data["source"] == "pairs":
        name = path.name
    else:
        name = f"{path.name} ({data['pair_mode']} pairs)"
    columns = ["anchor", "positive"] + (["negative"] if data["source"] == "synth" or negatives else [])
    loss = {
        "temperature": ec.temperature,
        "symmetric": ec.symmetric,
        "hard_negatives": negatives,
        "negatives": f"in-batch, gathered across {res.workers} worker(s), and hard",
    }
    hyperparameters = {
        k: getattr(ec, k)
        for k in (
            "pooling",
            "train_last_blocks",
            "steps",
            "batch_size",
            "learning_rate",
            "lr_schedule",
            "warmup_steps",
            "weight_decay",
            "max_grad_norm",
            "temperature",
            "symmetric",
            "max_seq_length",
            "dropout",
            "precision",
            "deepspeed_stage",
        )
    }
    return {
        "model_name": f"{cfg.run.name}: speed-ray embedding model based on {ec.model}",
        "base_model": ec.model,
        "tags": ["speed-ray"],
        "dataset": {"name": name, "size": rows, "columns": columns},
        "loss": {
            "fullname": "speed_ray.embed.losses.info_nce",
            "config_code": textwrap.indent(f"```json\n{json.dumps(loss, indent=4)}\n```", "  "),
        },
        "hyperparameters": hyperparameters
        | {
            "finetune": embed_finetune(ec),
            "workers": res.workers,
            "global_batch": res.workers * ec.batch_size,
            "hard_negatives": negatives,
            "seed": cfg.run.seed,
        },
    }
