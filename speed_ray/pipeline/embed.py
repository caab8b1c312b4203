"""embed: contrastive training (InfoNCE, in-batch + hard negatives) under Ray Train.

Consumes ``<run>/synth/examples``, a user's pairs file or an unlabelled corpus (``embed.data``); produces ``<run>/embed/model/``, a folder that
``sentence_transformers.SentenceTransformer(path)`` loads (pooling, normalisation and query prompt
saved), with ``_manifest.json`` and ``metrics.jsonl`` (one line per step).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Any

from speed_ray.config import ConfigError, SpeedRayConfig, embed_finetune
from speed_ray.fingerprint import of_config, output_hash, path_hash
from speed_ray.models import resolve_model
from speed_ray.pipeline.common import log, step
from speed_ray.schemas import EXAMPLES, read_manifest, read_stage, write_json_atomic

# What the model depends on (``speed_ray.fingerprint`` leaves out what only places or paces the
# training): every embed setting, the seed, and the training data (``fingerprint``).
KEYS = ("run.seed", "embed")


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
    """The embed step's fingerprint: ``KEYS`` and the data it trains on (synth/examples' output, or
    the pairs or corpus file's content)."""
    d = cfg.embed.data
    if d.source == "synth":
        examples = (Path(d.path).resolve() if d.path else cfg.run_dir) / "synth" / "examples"
        data = {"synth/examples": output_hash(read_manifest(examples))}
    else:
        data = {"embed.data.path": path_hash(d.path)}
    return of_config(cfg, KEYS, data)


def training_data(cfg: SpeedRayConfig):
    """(data, info): what the trainer draws its batches from (``train.embed.Rows`` or
    ``CorpusPairs``), from ``embed.data.source``, and what was made of the input."""
    from speed_ray.data import locate, nested_sample, read_corpus, read_pairs
    from speed_ray.pairs import CropRule, build_pairs
    from speed_ray.train.embed import CorpusPairs, Rows

    d = cfg.embed.data
    if d.source == "synth":
        examples = (Path(d.path).resolve() if d.path else cfg.run_dir) / "synth" / "examples"
        table = read_stage(examples, EXAMPLES)
        rows = [
            {
                "instruction": r["instruction"],
                "query": r["query"],
                "positive": r["positive"],
                "negatives": [r["negative"]] if r["negative"] else [],
            }
            for r in table.select(["instruction", "query", "positive", "negative"]).to_pylist()
        ]
        kept = nested_sample(rows, d.max_rows, cfg.run.seed)
        log(f"embed: {len(kept)} of {len(rows)} synthetic rows from {examples}")
        return Rows(kept), {"source": "synth", "path": str(examples), "rows_available": len(rows)}
    if d.source == "pairs":
        rows = [
            {
                "instruction": None,
                "query": r["anchor"],
                "positive": r["positive"],
                "negatives": r["negatives"],
            }
            for r in read_pairs(locate(str(d.path)))
        ]
        kept = nested_sample(rows, d.max_rows, cfg.run.seed)
        return Rows(kept), {"source": "pairs", "path": d.path, "rows_available": len(rows)}
    rule = CropRule(d.crop_min_chars, d.crop_max_chars, d.sentences_per_crop, d.min_crops)
    docs = read_corpus(locate(str(d.path)))
    held_out = 0
    if d.holdout_fraction:
        from speed_ray.evaluation import holdout_ids

        test = holdout_ids([doc["id"] for doc in docs], d.holdout_fraction, d.holdout_seed)
        docs = [doc for doc in docs if doc["id"] not in test]
        held_out = len(test)
        log(f"embed: {held_out} documents held out ({d.holdout_fraction:.0%}, seed {d.holdout_seed})")
    pairs, skipped = build_pairs(docs, d.pair_mode, rule, seed=cfg.run.seed)
    reasons = Counter(s["reason"] for s in skipped)
    log(
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

    from speed_ray.ray_utils import init_ray, train
    from speed_ray.train.embed import train_loop

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
        "duration_s": round(time.time() - started, 2),
    }
    (out / "README.md").write_text(model_card(cfg, manifest))
    write_json_atomic(out / "_manifest.json", manifest)
    log(f"embed: losses {[round(h['loss'], 4) for h in history]}")
    return manifest


def model_card(cfg: SpeedRayConfig, m: dict[str, Any]) -> str:
    """The exported folder's README: what it is, how it was trained, how to use it."""
    ec = cfg.embed
    first, last = m["history"][0], m["history"][-1]
    usage_query = 'model.encode(["how do I resize images?"], prompt_name="query")'
    return "\n".join(
        [
            "---",
            "library_name: sentence-transformers",
            "pipeline_tag: sentence-similarity",
            "tags: [sentence-transformers, speed-ray]",
            "---",
            "",
            f"# {cfg.run.name}: embedding model",
            "",
            f"Fine-tuned from `{m['base_model']}` by speed-ray's contrastive trainer (InfoNCE over in-batch "
            f"and hard negatives, gathered across {m['workers']} worker(s)).",
            "",
            "| setting | value |",
            "|---|---|",
            f"| data | {m['data']['source']} ({m['train_rows']} rows{', ' + m['data']['pair_mode'] if 'pair_mode' in m['data'] else ''}) |",
            f"| pooling | {m['pooling']}, L2-normalised |",
            f"| fine-tuning | {m['finetune']}{f', last {ec.train_last_blocks} blocks' if ec.train_last_blocks else ''}, "
            f"{m['trainable_params']:,} trainable parameters |",
            f"| steps, global batch, epochs | {m['steps']}, {m['global_batch']}, {m['epochs']} |",
            f"| hard negatives per query | {m['hard_negatives']} |",
            f"| temperature | {ec.temperature}{' (symmetric)' if ec.symmetric else ''} |",
            f"| learning rate | {ec.learning_rate}, {ec.lr_schedule}, {ec.warmup_steps} warm-up steps, weight decay {ec.weight_decay} |",
            f"| max sequence length | {ec.max_seq_length} |",
            f"| loss, first and last step | {first['loss']:.4f} -> {last['loss']:.4f} |",
            f"| in-batch accuracy, first and last step | {first['accuracy']:.3f} -> {last['accuracy']:.3f} |",
            "",
            "## Use",
            "",
            "```python",
            "from sentence_transformers import SentenceTransformer",
            "",
            "model = SentenceTransformer(PATH)",
            f"queries = {usage_query}  # the saved query prompt",
            'docs = model.encode(["a tool to convert and resize images"])',
            "scores = queries @ docs.T  # cosine: embeddings are normalised",
            "```",
            "",
            f"Query prompt: `{json.dumps(m['probe'].get('query_prompt', ''))[1:-1]}`; documents get none.",
            "",
        ]
    )
