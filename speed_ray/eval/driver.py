"""eval: every model of ``eval.models`` on every configured task, through mteb, offline.

Tasks (``task_specs``): retrieval on a BEIR folder (nDCG@10), kNN classification and clustering on a
labelled JSONL, and standard mteb tasks by name. Models (``models``): the untouched base, this run's
trained model, any other model (``label=spec`` names it), and the TF-IDF and BM25 baselines. With
``eval.layers`` every layer of each model is also scored on the kNN task.

Produces ``<run>/eval/results/`` (mteb's layout: ``results/speed-ray__<label>/<revision>/<Task>.json``,
the revision being the model's content hash), ``<run>/eval/_manifest.json`` with the scores per model
and task (retrieval and kNN ones with their standard errors, ``<metric>_se``, and per-item scores,
``per_item``: {metric: {query or row id: score}}), every model's paired difference from ``base``
(``differences``), and ``<run>/eval/layers.png`` with the layer analysis.

Each (model, task) is scored once per fingerprint (``records``): a rerun reuses every record whose
fingerprint holds, so adding a model scores that model alone, and a retrained model is scored again
while the base is not. This run's trained model gets its scores in its model card:
``<run>/embed/model/README.md`` is regenerated with them whenever it is scored.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.eval.experiments import MAIN_SCORES, differences
from speed_ray.eval.models import BASELINES, can_score, card_with_scores, load_model, parse_model
from speed_ray.eval.records import LAYERS, drop_unasked, kept, record, result_files, unit_fingerprints
from speed_ray.eval.task_specs import TaskSpec, task_specs
from speed_ray.io.fingerprint import fingerprint
from speed_ray.io.schemas import write_json_atomic
from speed_ray.io.steps import log, step


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "eval"
    specs = task_specs(cfg)
    models = [parse_model(m) for m in cfg.eval.models]
    units = unit_fingerprints(cfg, specs, models)
    whole = fingerprint({}, {f"{label}/{task}": fp["sha256"] for (label, task), fp in units.items()})
    return step(out, "eval", lambda: _evaluate(cfg, out, specs, models, units), whole, clean=False)


def _evaluate(
    cfg: SpeedRayConfig,
    out: Path,
    specs: list[TaskSpec],
    models: list[tuple[str, str]],
    units: dict[tuple[str, str], dict[str, Any]],
) -> dict:
    """Score every model in turn, each in a Ray task, then write the manifest and the layer plot."""
    started = time.time()
    log(f"eval: {len(models)} models x {len(specs)} tasks: {', '.join(s.name for s in specs)}")
    drop_unasked(out, set(units))
    scores: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, float]] = {}
    scored_on: dict[str, dict[str, Any]] = {}
    for label, spec in models:
        task_fps = {task: fp for (lb, task), fp in units.items() if lb == label}
        model_scores, where = _evaluate_model(cfg, out, specs, label, spec, task_fps)
        layers |= {label: model_scores.pop(LAYERS)} if LAYERS in model_scores else {}
        scores[label] = model_scores
        scored_on |= {label: where} if where else {}
    manifest = {
        "tasks": {s.name: s.kind for s in specs},
        "models": dict(models),
        "scores": scores,
        "differences": differences({"tasks": {s.name: s.kind for s in specs}, "scores": scores}),
        "layers": layers,
        "scored_on": scored_on,
        "duration_s": round(time.time() - started, 2),
    }
    if layers:
        from speed_ray.eval.layers import plot_layers

        plot_layers(layers, next(s.name for s in specs if s.kind == "knn"), out / "layers.png")
    write_json_atomic(out / "_manifest.json", manifest)
    return manifest


def _evaluate_model(
    cfg: SpeedRayConfig,
    out: Path,
    specs: list[TaskSpec],
    label: str,
    spec: str,
    task_fps: dict[str, dict[str, Any]],
) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """(scores per task, the layer scores under ``LAYERS`` when asked for; where it was scored, or None
    when every score was kept) of one model; ``task_fps`` is {task: fingerprint}. A kept record gives
    its scores; the rest are scored in one Ray task with ``eval.resources``, where the model loads."""
    from speed_ray.ray_utils import run_task

    t0 = time.time()
    recs = {task: kept(out, label, task, fp) for task, fp in task_fps.items()}  # None: to score
    todo = {task: task_fps[task] for task, rec in recs.items() if rec is None}
    for ts in specs:
        if not can_score(spec, ts):
            log(f"eval: {label}: {ts.name}: skipped ({spec} scores no {ts.kind} task)")
    scores = {task: rec["scores"] for task, rec in recs.items() if rec is not None}
    where = None
    if todo:
        res = cfg.eval.resources
        args = (cfg, out, specs, label, spec, todo, scores)
        new, where = run_task(cfg, f"eval-{label}", score_model, *args, cpus=res.cpus, gpus=res.gpus)
        scores |= new
    log(f"eval: {label} done in {time.time() - t0:.0f}s" + ("" if todo else " (every score kept)"))
    return {t: scores[t] for t in task_fps}, where


def score_model(
    cfg: SpeedRayConfig,
    out: Path,
    specs: list[TaskSpec],
    label: str,
    spec: str,
    todo: dict[str, dict[str, Any]],
    known: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, Any]]:
    """On a Ray worker: (the scores of the tasks in ``todo``, each recorded with its fingerprint; where
    they were made: host, process and device). ``specs`` come with their data, read and checked once
    by the driver. The model loads here, on the worker's GPU if its task has one. This run's trained
    model gets a model card with every score (``known`` and the new)."""
    import os
    import socket

    import torch

    from speed_ray.eval.tasks import as_mteb_model
    from speed_ray.io.models import cache_dir

    device = "cuda" if torch.cuda.is_available() else "cpu"  # Ray hides the GPUs a task did not ask for
    st = None if spec in BASELINES else load_model(spec, cfg).to(device)
    cache_root = cache_dir() / "embeddings" if cfg.eval.cache else None
    encoder = None if st is None else as_mteb_model(st, label, cache_root)
    scores = {
        ts.name: _score(cfg, out, label, spec, ts, encoder, todo[ts.name]) for ts in specs if ts.name in todo
    }
    if spec == "trained" and st is not None:
        card_with_scores(
            cfg, st, _card_results(specs, {t: v for t, v in (known | scores).items() if t != LAYERS})
        )
    if LAYERS in todo:
        assert st is not None
        scores[LAYERS] = _score_layers(cfg, out, label, st, specs, todo[LAYERS])
    where = {"host": socket.gethostname(), "pid": os.getpid(), "device": device}
    return scores, where


def _score(
    cfg: SpeedRayConfig,
    out: Path,
    label: str,
    spec: str,
    ts: TaskSpec,
    encoder: Any,
    fp: dict[str, Any],
) -> dict[str, Any]:
    """Score one model on one task through mteb, and record the score with its fingerprint ``fp``."""
    t1 = time.time()
    before = result_files(out)
    model = _task_model(spec, ts, encoder)
    task = ts.build()
    s = _mteb_scores(model, task, ts.name, out, cfg.eval.batch_size)
    s["seconds"] = round(time.time() - t1, 1)
    record(out, label, ts.name, fp, s, before)
    log(f"eval: {label}: {ts.name}: {task.metadata.main_score} {s['main_score']:.4f} ({s['seconds']:.0f}s)")
    return s


def _task_model(spec: str, ts: TaskSpec, encoder: Any) -> Any:
    """What mteb scores: a baseline made for the task, or the model's encoder."""
    from speed_ray.eval.tasks import bm25_model, tfidf_encoder

    if spec == "bm25":
        return bm25_model()
    if spec == "tfidf":
        assert ts.texts is not None
        return tfidf_encoder(ts.texts())
    return encoder


def _mteb_scores(model: Any, task: Any, name: str, out: Path, batch_size: int) -> dict[str, Any]:
    """mteb's scores; a dataset that is neither cached nor reachable says how to get it."""
    from speed_ray.eval.tasks import evaluate

    try:
        return evaluate(model, task, out, batch_size)
    except ConnectionError as e:  # datasets, offline, without the task in its cache
        raise FileNotFoundError(
            f"eval.mteb_tasks: {name}: its dataset is not in the local Hugging Face cache "
            f"and the hub cannot be reached ({e}); run where there is network with "
            "HF_DATASETS_OFFLINE=0, or copy a cache that holds it to HF_HOME"
        ) from e


def _card_results(specs: list[TaskSpec], scores: dict[str, Any]) -> dict[str, tuple[str, str, dict]]:
    """{task: (kind, main score name, scores)} for the trained model's card."""
    kinds = {t: next(ts.kind for ts in specs if ts.name == t) for t in scores}
    return {t: (k, MAIN_SCORES.get(k, "main_score"), scores[t]) for t, k in kinds.items()}


def _score_layers(
    cfg: SpeedRayConfig, out: Path, label: str, st: Any, specs: list[TaskSpec], fp: dict[str, Any]
) -> dict[str, float]:
    """Score every layer of the model on the kNN task, and record the scores."""
    from speed_ray.eval.layers import layer_scores

    assert st is not None
    knn = next(ts for ts in specs if ts.kind == "knn")
    assert knn.texts is not None
    before = result_files(out)
    layers = layer_scores(st, knn.build, knn.texts(), out, cfg.eval.batch_size)
    record(out, label, LAYERS, fp, layers, before)
    log(f"eval: {label}: layers: " + ", ".join(f"{k} {v:.3f}" for k, v in layers.items()))
    return layers
