"""eval: nDCG@10 (and the rest of mteb's retrieval scores) on the configured BEIR folder, for the
untouched base model and the trained one, through mteb with a task defined offline.

Consumes ``<run>/embed/model``; produces ``<run>/eval/results/`` (mteb's layout) and
``<run>/eval/_manifest.json`` with the scores per model.
"""

from __future__ import annotations

import time
from pathlib import Path

from speed_ray.config import SpeedRayConfig
from speed_ray.pipeline.common import log, step
from speed_ray.schemas import write_json_atomic


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "eval"
    return step(out, "eval", lambda: _evaluate(cfg, out))


def _evaluate(cfg: SpeedRayConfig, out: Path) -> dict:
    from sentence_transformers import SentenceTransformer

    from speed_ray.data import verify_checksums
    from speed_ray.embedding import build_model, set_prompts
    from speed_ray.evaluation import evaluate, retrieval_task
    from speed_ray.models import resolve_model

    ec, ev = cfg.embed, cfg.eval
    trained_dir = cfg.run_dir / "embed" / "model"
    if not (trained_dir / "_manifest.json").is_file():
        raise FileNotFoundError(f"{trained_dir}: no trained model; run `speed-ray embed` first")
    started = time.time()
    checked = verify_checksums(Path(ev.retrieval_dir))
    log(
        f"eval: {ev.retrieval_dir}: "
        + (f"{len(checked)} files match SHA256SUMS" if checked else "no SHA256SUMS")
    )
    task = retrieval_task(ev.task_name, Path(ev.retrieval_dir))
    models = {
        "base": lambda: build_model(resolve_model(ec.model), ec.pooling, ev.max_seq_length),
        "trained": lambda: SentenceTransformer(str(trained_dir), device="cpu"),
    }
    scores = {}
    for label, load in models.items():
        t0 = time.time()
        model = load()
        model.max_seq_length = ev.max_seq_length
        set_prompts(model, ev.query_instruction, ec.pooling)
        s = evaluate(model, label, task, out, ev.batch_size)
        scores[label] = {
            "ndcg_at_10": s["ndcg_at_10"],
            "recall_at_10": s["recall_at_10"],
            "seconds": round(time.time() - t0, 1),
        }
        log(f"eval: {label} nDCG@10 = {s['ndcg_at_10']:.4f} ({time.time() - t0:.0f}s)")
    manifest = {
        "task": ev.task_name,
        "retrieval_dir": ev.retrieval_dir,
        "scores": scores,
        "duration_s": round(time.time() - started, 2),
    }
    write_json_atomic(out / "_manifest.json", manifest)
    return manifest
