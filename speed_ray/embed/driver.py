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
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed_ray.config import SpeedRayConfig
from speed_ray.embed.config import EmbedDataConfig, embed_finetune
from speed_ray.io.fingerprint import output_hash, path_hash
from speed_ray.io.models import resolve_model
from speed_ray.io.schemas import finished_manifest, read_manifest, write_json_atomic
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import log, step

if TYPE_CHECKING:
    from speed_ray.embed.train import EmbedTrainSettings

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
    """(data, info): what the trainer draws its batches from (``embed.batches.Rows`` or
    ``CorpusPairs``), from ``embed.data.source``, and what was made of the input."""
    if cfg.embed.data.source in ("synth", "pairs"):
        return row_data(cfg)
    return corpus_data(cfg)


def row_data(cfg: SpeedRayConfig):
    """(Rows, info) of a synth run's training set or a user's pairs file (``embed.data.max_rows`` of
    them, a nested sample)."""
    from speed_ray.embed.batches import Rows
    from speed_ray.io.data import locate, nested_sample, read_pairs
    from speed_ray.io.schemas import split_query

    d = cfg.embed.data
    if d.source == "synth":
        path = (Path(d.path).resolve() if d.path else cfg.run_dir) / "synth" / "train"
        finished_manifest(path)  # a step that has not finished is never read
    else:
        path = locate(str(d.path))
    # An anchor in SPEED/E5 form carries its instruction: the trainer applies it as it applies
    # every instruction (decoders see it, encoders the bare query: ``embed.model.format_query``).
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


def corpus_data(cfg: SpeedRayConfig):
    """(CorpusPairs, info) of an unlabelled corpus: its documents but the held-out ones, cropped into
    new pairs each epoch."""
    from speed_ray.embed.batches import CorpusPairs
    from speed_ray.embed.pairs import build_pairs
    from speed_ray.io.data import locate, read_corpus

    d, rule = cfg.embed.data, cfg.embed.data.crop_rule()
    docs, held_out = held_out_docs(read_corpus(locate(str(d.path))), d)
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


def held_out_docs(docs: list[dict[str, Any]], d: EmbedDataConfig) -> tuple[list[dict[str, Any]], int]:
    """(the documents to train on, how many were held out: ``embed.data.holdout_fraction``)."""
    from speed_ray.io.data import holdout_ids

    if not d.holdout_fraction:
        return docs, 0
    test = holdout_ids([doc["id"] for doc in docs], d.holdout_fraction, d.holdout_seed)
    logger.info(f"embed: {len(test)} documents held out ({d.holdout_fraction:.0%}, seed {d.holdout_seed})")
    return [doc for doc in docs if doc["id"] not in test], len(test)


def num_negatives(data, wanted: int) -> int:
    """Hard negatives per query: ``embed.hard_negatives``, or fewer if no row has that many."""
    rows = getattr(data, "rows", [])
    return min(wanted, max((len(r["negatives"]) for r in rows), default=0))


def train_settings(
    cfg: SpeedRayConfig, negatives: int, model_card: dict[str, Any] | None, data: Any = None
) -> EmbedTrainSettings:
    """What every worker gets (Ray pickles it to each): the ``embed`` section, the model resolved to a
    local folder, ``data`` (the training data's ObjectRef) and the exported model's ``model_card``."""
    from speed_ray.embed.train import EmbedTrainSettings

    return EmbedTrainSettings(
        embed=cfg.embed,
        model_path=resolve_model(cfg.embed.model),
        num_negatives=negatives,
        seed=cfg.run.seed,
        snapshot_dir=str(cfg.run_dir / "embed" / "snapshots"),
        model_card=model_card,
        data=data,
    )


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
    card = card_info(cfg, data_info, len(data), negatives)
    init_ray(cfg)
    # the object store carries the rows to every node's workers
    settings = train_settings(cfg, negatives, card, ray.put(data))
    out = cfg.run_dir / "embed" / "model"
    metrics = train(cfg, "embed", train_loop, settings, res, None, out, ec.max_failures)
    history = metrics["history"]
    (cfg.run_dir / "embed" / "metrics.jsonl").write_text("".join(json.dumps(h) + "\n" for h in history))
    manifest = train_manifest(settings, metrics, len(data), data_info)
    manifest["duration_s"] = round(time.time() - started, 2)
    write_json_atomic(out / "_manifest.json", manifest)
    logger.info(f"embed: losses {[round(h['loss'], 4) for h in history]}")
    return manifest


def train_manifest(
    s: EmbedTrainSettings, metrics: dict[str, Any], rows: int, data_info: dict[str, Any]
) -> dict[str, Any]:
    """The trained model's ``_manifest.json``: what it was trained from and how, and the run's metrics."""
    ec, workers = s.embed, s.embed.resources.workers
    return {
        "base_model": ec.model,
        "pooling": ec.pooling,
        "train_last_blocks": ec.train_last_blocks,
        "finetune": s.finetune,
        "trainable_params": metrics["trainable_params"],
        "workers": workers,
        "global_batch": workers * ec.batch_size,
        "hard_negatives": s.num_negatives,
        "train_rows": rows,
        "epochs": round(metrics["steps"] * workers * ec.batch_size / rows, 3),
        "data": data_info,
        "steps": metrics["steps"],
        "resumed_from_step": metrics["resumed_from_step"],
        "history": metrics["history"],
        "probe": metrics["probe"],
        "model_card": s.model_card,
    }


# The training settings the model card lists, as configured (``embed.*``).
CARD_HYPERPARAMETERS = (
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


def dataset_name(data: dict[str, Any]) -> str:
    """The training set's name on the model card (``data``: ``training_data``'s info)."""
    path = Path(str(data["path"]))
    if data["source"] == "synth":
        return f"{path.parents[1].name}/synth/train"  # <run>/synth/train
    if data["source"] == "pairs":
        return path.name
    return f"{path.name} ({data['pair_mode']} pairs)"


def card_info(cfg: SpeedRayConfig, data: dict[str, Any], rows: int, negatives: int) -> dict[str, Any]:
    """What the model card says besides the model itself (plain values, for the workers and the
    manifest; ``embed.model.model_card_data`` turns them into sentence-transformers' card data)."""
    ec, res = cfg.embed, cfg.embed.resources
    columns = ["anchor", "positive"] + (["negative"] if data["source"] == "synth" or negatives else [])
    loss = {
        "temperature": ec.temperature,
        "symmetric": ec.symmetric,
        "hard_negatives": negatives,
        "negatives": f"in-batch, gathered across {res.workers} worker(s), and hard",
    }
    return {
        "model_name": f"{cfg.run.name}: speed-ray embedding model based on {ec.model}",
        "base_model": ec.model,
        "tags": ["speed-ray"],
        "dataset": {"name": dataset_name(data), "size": rows, "columns": columns},
        "loss": {
            "fullname": "speed_ray.embed.losses.info_nce",
            "config_code": textwrap.indent(f"```json\n{json.dumps(loss, indent=4)}\n```", "  "),
        },
        "hyperparameters": {k: getattr(ec, k) for k in CARD_HYPERPARAMETERS}
        | {
            "finetune": embed_finetune(ec),
            "workers": res.workers,
            "global_batch": res.workers * ec.batch_size,
            "hard_negatives": negatives,
            "seed": cfg.run.seed,
        },
    }
