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
    from speed_ray.io.data import Source

# What the model depends on (``speed_ray.io.fingerprint`` leaves out what only places or paces the
# training): every embed setting, the seed, and the training data (``fingerprint``).
KEYS = ("run.seed", "embed")

logger = logging.getLogger(__name__)


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "embed" / "model"
    # A stale model goes with its curve, snapshots, training data and Ray Train's checkpoints (a rerun
    # resumes from them).
    state = (
        cfg.run_dir / "embed" / "metrics.jsonl",
        cfg.run_dir / "embed" / "data",
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
    for key in ("crops", "exclude"):
        if getattr(d, key) is not None:
            data[f"embed.data.{key}"] = path_hash(getattr(d, key))
    return cfg.fingerprint(KEYS, data)


def training_data(cfg: SpeedRayConfig, folder: Path | None = None):
    """(data, info): the rows the trainer draws its batches from (``embed.data.source``, and the crop
    pairs of ``embed.data.crops``), written to ``folder`` (``<run>/embed/data``) as
    ``speed_ray.embed.data.TrainingData``, and what was made of the input. The input is read a row at
    a time."""
    from speed_ray.embed.data import mix

    d, folder = cfg.embed.data, folder or cfg.run_dir / "embed" / "data"
    if d.source == "corpus":
        return corpus_data(cfg, str(d.path), folder)
    if d.crops is None:
        return row_data(cfg, folder)
    rows, info = row_data(cfg, folder / "rows")
    crops, made = corpus_data(cfg, d.crops, folder / "crops")
    log(f"embed: {len(crops)} crop pairs and {len(rows)} rows, {d.crops_order} (embed.data.crops_order)")
    return mix(crops, rows, d.crops_order), info | {
        "rows": len(rows),
        "crops": made,
        "crops_order": d.crops_order,
    }


def row_data(cfg: SpeedRayConfig, folder: Path):
    """(data, info) of a synth run's training set or a user's pairs file (``embed.data.max_rows`` of
    them, a nested sample)."""
    from speed_ray.embed.data import write_rows
    from speed_ray.io.data import iter_pairs, locate_input

    d = cfg.embed.data
    path: Source
    if d.source == "synth":
        path = (Path(d.path).resolve() if d.path else cfg.run_dir) / "synth" / "train"
        total = finished_manifest(path)["num_rows"]  # a step that has not finished is never read
    else:
        path = locate_input(str(d.path))
        total = sum(1 for _ in iter_pairs(path)) if d.max_rows else 0  # counted only to sample from
    data = write_rows(folder, iter_pairs(path), total, d.max_rows, cfg.run.seed)
    if d.source == "synth":
        log(f"embed: {len(data)} of {total} synthetic rows from {path}")
    where = str(path) if d.source == "synth" else d.path
    return data, {"source": d.source, "path": where, "rows_available": total or len(data)}


def corpus_data(cfg: SpeedRayConfig, spec: str, folder: Path):
    """(data, info) of the unlabelled corpus ``spec`` (``embed.data.path`` or ``embed.data.crops``):
    its documents but the held-out and excluded ones, cropped into new pairs each epoch on the workers."""
    from speed_ray.embed.data import write_docs
    from speed_ray.io.data import document_ids, iter_corpus, locate_input

    d, rule, path = cfg.embed.data, cfg.embed.data.crop_rule(), locate_input(spec)
    held_out = held_out_ids(path, d)
    excluded = document_ids(locate_input(d.exclude)) if d.exclude else set()
    data, made = write_docs(folder, iter_corpus(path), held_out, d.pair_mode, rule, cfg.run.seed, excluded)
    logger.info(
        f"embed: {made['documents']} documents -> {made['pairs']} {d.pair_mode} pairs per epoch (drawn anew "
        f"each epoch); {sum(made['skipped'].values())} documents too short for a pair: {made['skipped']}; "
        f"{made['excluded']} excluded ({d.exclude})"
    )
    return data, {"source": "corpus", "path": spec, "pair_mode": d.pair_mode, "exclude": d.exclude} | made


def held_out_ids(path: Source, d: EmbedDataConfig) -> set[str]:
    """The ids of the documents held out (``embed.data.holdout_fraction``): only the ids are held."""
    from speed_ray.io.data import holdout_ids, iter_corpus

    if not d.holdout_fraction:
        return set()
    test = holdout_ids([doc["id"] for doc in iter_corpus(path)], d.holdout_fraction, d.holdout_seed)
    logger.info(f"embed: {len(test)} documents held out ({d.holdout_fraction:.0%}, seed {d.holdout_seed})")
    return test


def train_settings(
    cfg: SpeedRayConfig, negatives: int, model_card: dict[str, Any] | None, data: Any = None
) -> EmbedTrainSettings:
    """What every worker gets (Ray pickles it to each): the ``embed`` section, the model resolved to a
    local folder, ``data`` (``speed_ray.embed.data.TrainingData``: where its shards are) and the
    exported model's ``model_card``."""
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
    negatives = min(ec.hard_negatives, data.max_negatives)
    card = card_info(cfg, data_info, len(data), negatives)
    init_ray(cfg)
    # each worker reads its share of the shards in <run>/embed/data (shared storage on a cluster)
    settings = train_settings(cfg, negatives, card, data)
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
    crops = data.get("crops")
    if crops:
        also = f" + {Path(crops['path']).name} ({crops['pair_mode']} pairs, {data['crops_order']})"
        return dataset_name(data | {"crops": None}) + also
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
