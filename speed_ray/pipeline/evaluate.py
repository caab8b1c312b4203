"""eval: every model of ``eval.models`` on every configured task, through mteb, offline.

Tasks: retrieval on a BEIR folder (nDCG@10), kNN classification and clustering on a labelled JSONL,
and standard mteb tasks by name. Models: the untouched base, this run's trained model, any other
model (``label=spec`` names it), and the TF-IDF and BM25 baselines. With ``eval.layers`` every
layer of each model is also scored on the kNN task.

Produces ``<run>/eval/results/`` (mteb's layout: ``results/speed-ray__<label>/<revision>/<Task>.json``,
the revision being the model's content hash), ``<run>/eval/_manifest.json`` with the scores per model
and task, and ``<run>/eval/layers.png`` with the layer analysis. This run's trained model gets its
scores in its model card: ``<run>/embed/model/README.md`` is regenerated with them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.pipeline.common import log, step
from speed_ray.schemas import write_json_atomic

BASELINES = ("tfidf", "bm25")


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "eval"
    return step(out, "eval", lambda: _evaluate(cfg, out))


@dataclass
class TaskSpec:
    """A task to build afresh for every model (mteb tasks keep random state between runs)."""

    name: str
    kind: str  # retrieval | knn | clustering | mteb
    build: Callable[[], Any]
    texts: Callable[[], list[str]] | None  # what TF-IDF is fit on (None: no TF-IDF)


def task_specs(cfg: SpeedRayConfig) -> list[TaskSpec]:
    """The configured tasks, data read and checked now (before any model loads)."""
    from speed_ray.data import read_beir, verify_checksums
    from speed_ray.evaluation import (
        clustering_task,
        holdout_ids,
        knn_task,
        named_tasks,
        read_labelled,
        retrieval_task,
        sample_rows,
    )

    ev = cfg.eval
    specs: list[TaskSpec] = []
    if ev.retrieval.path is not None:
        folder = Path(ev.retrieval.path)
        _checked(folder, verify_checksums)
        corpus = read_beir(folder)[0]
        r = ev.retrieval
        specs.append(
            TaskSpec(
                r.name,
                "retrieval",
                lambda: retrieval_task(r.name, folder, r.max_queries, ev.seed, r.max_docs),
                lambda: [(d["title"] + " " + d["text"]).strip() for d in corpus],
            )
        )
    for kind, tc in (("knn", ev.knn), ("clustering", ev.clustering)):
        if tc.path is None:
            continue
        path = Path(tc.path)
        _checked(path.parent, verify_checksums)
        all_rows = read_labelled(path, tc.text_field, tc.label_field)
        rows = sample_rows(all_rows, tc.max_docs, ev.seed)
        name = tc.name or path.stem.title().replace("_", "").replace("-", "") + (
            "KNN" if kind == "knn" else "Clustering"
        )
        if kind == "knn":
            test = (
                holdout_ids([r["id"] for r in all_rows], tc.test_fraction, ev.seed)
                if tc.split == "holdout"
                else None
            )
            build = _bind(knn_task, name, rows, tc.k, test, ev.seed)
        else:
            build = _bind(clustering_task, name, rows, ev.seed)
        specs.append(TaskSpec(name, kind, build, _bind(lambda rs: [r["text"] for r in rs], rows)))
    for task in named_tasks(ev.mteb_tasks):
        specs.append(TaskSpec(task.metadata.name, "mteb", _bind(lambda t: t, task), None))
    return specs


def _bind(fn: Callable, *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def _checked(folder: Path, verify: Callable[[Path], list[str]]) -> None:
    checked = verify(folder)
    if checked:
        log(f"eval: {folder}: {len(checked)} files match SHA256SUMS")


def parse_model(entry: str) -> tuple[str, str]:
    """``label=spec`` or ``spec`` -> (label, spec); a spec's label is its last path part."""
    label, sep, spec = entry.partition("=")
    if not sep:
        spec, label = entry, Path(entry.rstrip("/")).name
    return label, spec


def load_model(spec: str, cfg: SpeedRayConfig) -> Any:
    """A SentenceTransformer for ``spec`` with the configured maximum length, and the query/document
    prompts it saved (a model that saved none gets ``eval.retrieval.query_instruction``)."""
    from sentence_transformers import SentenceTransformer

    from speed_ray.embedding import build_model, pooling_module, set_prompts
    from speed_ray.models import resolve_model

    ec, ev = cfg.embed, cfg.eval
    pooling = ec.pooling
    if spec == "base":
        model = build_model(resolve_model(ec.model), pooling, ev.max_seq_length)
    else:
        if spec == "trained":
            path = cfg.run_dir / "embed" / "model"
            if not (path / "_manifest.json").is_file():
                raise FileNotFoundError(f"{path}: no trained model; run `speed-ray embed` first")
            folder = str(path)
        else:
            folder = resolve_model(spec, cfg.run_dir)
        if Path(folder).is_dir() and not (Path(folder) / "modules.json").is_file():
            model = build_model(folder, pooling, ev.max_seq_length)  # a plain transformer
        else:
            model = SentenceTransformer(folder, device="cpu")
            found = pooling_module(model)
            pooling = found.get_config_dict()["pooling_mode"] if found else pooling
    model.max_seq_length = ev.max_seq_length
    if not (model.prompts or {}).get("query"):  # sentence-transformers starts with empty prompts
        set_prompts(model, ev.retrieval.query_instruction, pooling)
    return model


def card_with_scores(cfg: SpeedRayConfig, model: Any, results: dict[str, tuple[str, str, dict]]) -> None:
    """Regenerate this run's trained model's README.md (sentence-transformers' model card) with the
    eval scores added: ``results`` is {task: (kind, main score name, scores)}."""
    from speed_ray.embedding import write_model_card
    from speed_ray.schemas import read_manifest

    folder = cfg.run_dir / "embed" / "model"
    manifest = read_manifest(folder) or {}
    card = manifest.get("model_card")
    if card is None:  # a model trained before the card was generated: its README stays
        return
    scores = {t: {"kind": k, "main_score": m, "scores": s} for t, (k, m, s) in results.items()}
    length = model.max_seq_length
    model.max_seq_length = card["hyperparameters"]["max_seq_length"]  # the saved one, not eval's
    try:
        write_model_card(model, folder, card, manifest.get("history", []), scores)
    finally:
        model.max_seq_length = length
    log(f"eval: {folder / 'README.md'}: model card with the scores of {len(scores)} task(s)")


def _evaluate(cfg: SpeedRayConfig, out: Path) -> dict:
    from speed_ray.evaluation import as_mteb_model, bm25_model, evaluate, tfidf_encoder
    from speed_ray.models import cache_dir

    ev = cfg.eval
    started = time.time()
    specs = task_specs(cfg)
    models = [parse_model(m) for m in ev.models]
    kinds = {s.name: s.kind for s in specs}
    log(f"eval: {len(models)} models x {len(specs)} tasks: {', '.join(s.name for s in specs)}")
    cache_root = cache_dir() / "embeddings" if ev.cache else None
    scores: dict[str, dict[str, Any]] = {}
    main_scores: dict[str, str] = {}
    layers: dict[str, dict[str, float]] = {}
    for label, spec in models:
        t0 = time.time()
        scores[label] = {}
        st = None if spec in BASELINES else load_model(spec, cfg)
        encoder = None if st is None else as_mteb_model(st, label, cache_root)
        for ts in specs:
            if spec == "bm25" and ts.kind != "retrieval" or spec == "tfidf" and ts.texts is None:
                log(f"eval: {label}: {ts.name}: skipped ({spec} scores no {ts.kind} task)")
                continue
            t1 = time.time()
            if spec == "bm25":
                model = bm25_model()
            elif spec == "tfidf":
                assert ts.texts is not None
                model = tfidf_encoder(ts.texts())
            else:
                model = encoder
            task = ts.build()
            try:
                s = evaluate(model, task, out, ev.batch_size)
            except ConnectionError as e:  # datasets, offline, without the task in its cache
                raise FileNotFoundError(
                    f"eval.mteb_tasks: {ts.name}: its dataset is not in the local Hugging Face cache "
                    f"and the hub cannot be reached ({e}); run where there is network with "
                    "HF_DATASETS_OFFLINE=0, or copy a cache that holds it to HF_HOME"
                ) from e
            s["seconds"] = round(time.time() - t1, 1)
            scores[label][ts.name] = s
            main_scores[ts.name] = task.metadata.main_score
            log(
                f"eval: {label}: {ts.name}: {task.metadata.main_score} {s['main_score']:.4f} ({s['seconds']:.0f}s)"
            )
        if spec == "trained" and st is not None:
            card_with_scores(cfg, st, {t: (kinds[t], main_scores[t], s) for t, s in scores[label].items()})
        if ev.layers and st is not None:
            from speed_ray.layers import layer_scores

            knn = next(ts for ts in specs if ts.kind == "knn")
            assert knn.texts is not None
            layers[label] = layer_scores(st, knn.build, knn.texts(), out, ev.batch_size)
            log(f"eval: {label}: layers: " + ", ".join(f"{k} {v:.3f}" for k, v in layers[label].items()))
        log(f"eval: {label} done in {time.time() - t0:.0f}s")
    manifest = {
        "tasks": {s.name: s.kind for s in specs},
        "models": dict(models),
        "scores": scores,
        "layers": layers,
        "duration_s": round(time.time() - started, 2),
    }
    if layers:
        from speed_ray.layers import plot_layers

        plot_layers(layers, next(s.name for s in specs if s.kind == "knn"), out / "layers.png")
    write_json_atomic(out / "_manifest.json", manifest)
    return manifest
