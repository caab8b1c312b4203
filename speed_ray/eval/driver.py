"""eval: every model of ``eval.models`` on every configured task, through mteb, offline.

Tasks: retrieval on a BEIR folder (nDCG@10), kNN classification and clustering on a labelled JSONL,
and standard mteb tasks by name. Models: the untouched base, this run's trained model, any other
model (``label=spec`` names it), and the TF-IDF and BM25 baselines. With ``eval.layers`` every
layer of each model is also scored on the kNN task.

Produces ``<run>/eval/results/`` (mteb's layout: ``results/speed-ray__<label>/<revision>/<Task>.json``,
the revision being the model's content hash), ``<run>/eval/_manifest.json`` with the scores per model
and task, and ``<run>/eval/layers.png`` with the layer analysis.

Each (model, task) is scored once per fingerprint: ``<run>/eval/_done/<label>/<task>.json`` records
its fingerprint (the task's settings and data, the model's spec, settings and, for a trained model,
its output), its scores and its result files. A rerun reuses every record whose fingerprint holds, so
adding a model scores that model alone, and a retrained model is scored again while the base is not.
This run's trained model gets its scores in its model card: ``<run>/embed/model/README.md`` is
regenerated with them whenever it is scored.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speed_ray.config import RUNTIME_KEYS, SpeedRayConfig
from speed_ray.eval.experiments import MAIN_SCORES
from speed_ray.io.fingerprint import (
    diff,
    fingerprint,
    flatten,
    folder_stamp,
    output_hash,
    path_hash,
    select,
)
from speed_ray.io.schemas import read_manifest, write_json_atomic
from speed_ray.io.steps import log, remove, step

logger = logging.getLogger(__name__)

BASELINES = ("tfidf", "bm25")
LAYERS = "layers"  # the layer analysis, recorded as one more task of each model


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "eval"
    specs = task_specs(cfg)
    models = [parse_model(m) for m in cfg.eval.models]
    units = unit_fingerprints(cfg, specs, models)
    whole = fingerprint({}, {f"{label}/{task}": fp["sha256"] for (label, task), fp in units.items()})
    return step(out, "eval", lambda: _evaluate(cfg, out, specs, models, units), whole, clean=False)


# What a score depends on (``speed_ray.io.fingerprint``): the task's settings and data, and the model's
# settings; which model a label names (its spec), and what is in it, are inputs of their own.
TASK_KEYS = {
    "retrieval": ("eval.seed", "eval.retrieval"),
    "knn": ("eval.seed", "eval.knn"),
    "clustering": ("eval.seed", "eval.clustering"),
    "mteb": (),
    LAYERS: ("eval.seed", "eval.knn"),
}
MODEL_KEYS = {
    "base": ("embed.model", "embed.pooling", "eval.max_seq_length", "eval.retrieval.query_instruction"),
    "trained": ("eval.max_seq_length",),  # its pooling and query prompt are saved in it
    "tfidf": (),
    "bm25": (),
    "other": ("embed.pooling", "eval.max_seq_length", "eval.retrieval.query_instruction"),
}
DATA = {"retrieval": "eval.retrieval.path", "knn": "eval.knn.path", "clustering": "eval.clustering.path"}


def unit_fingerprints(
    cfg: SpeedRayConfig, specs: list[TaskSpec], models: list[tuple[str, str]]
) -> dict[tuple[str, str], dict[str, Any]]:
    """``{(label, task): fingerprint}`` for every score this config asks for (the layer analysis is
    task ``layers``)."""
    flat = flatten(cfg)
    data = {kind: {key: path_hash(flat[key])} for kind, key in DATA.items() if flat[key] is not None}
    data[LAYERS] = data.get("knn", {})
    units = {}
    for label, spec in models:
        model_keys = MODEL_KEYS.get(spec, MODEL_KEYS["other"])
        model_config = {"model": spec} | select(flat, model_keys, RUNTIME_KEYS)
        model_inputs = _model_inputs(cfg, spec)
        tasks = [(ts.name, ts.kind) for ts in specs if _scores(spec, ts)]
        if cfg.eval.layers and spec not in BASELINES:
            tasks.append((LAYERS, LAYERS))
        for name, kind in tasks:
            # the query instruction is a setting of the models that saved none (MODEL_KEYS)
            task_config = {"task": name} | select(
                flat, TASK_KEYS[kind], (*RUNTIME_KEYS, "eval.retrieval.query_instruction")
            )
            units[(label, name)] = fingerprint(task_config | model_config, data.get(kind, {}) | model_inputs)
    return units


def _model_inputs(cfg: SpeedRayConfig, spec: str) -> dict[str, str | None]:
    """What is in the model a spec names: this run's trained model by its manifest; a folder (or
    another run's model, ``run:...``) by its manifest or its files; a built-in or hub name by name."""
    if spec == "trained":
        return {"embed": output_hash(read_manifest(cfg.run_dir / "embed" / "model"))}
    if spec in ("base", *BASELINES):
        return {}
    if spec.startswith("run:"):
        folder = Path(os.path.normpath(cfg.run_dir / spec.removeprefix("run:")))
    else:
        folder = Path(spec).expanduser()
    return {"model": folder_stamp(folder)} if folder.is_dir() else {}


def _scores(spec: str, ts: TaskSpec) -> bool:
    """Whether model ``spec`` scores task ``ts`` at all (BM25 only retrieves; TF-IDF needs texts)."""
    return not (spec == "bm25" and ts.kind != "retrieval" or spec == "tfidf" and ts.texts is None)


@dataclass
class TaskSpec:
    """A task to build afresh for every model (mteb tasks keep random state between runs)."""

    name: str
    kind: str  # retrieval | knn | clustering | mteb
    build: Callable[[], Any]
    texts: Callable[[], list[str]] | None  # what TF-IDF is fit on (None: no TF-IDF)


def task_specs(cfg: SpeedRayConfig) -> list[TaskSpec]:
    """The configured tasks, data read and checked now (before any model loads)."""
    from speed_ray.eval.tasks import (
        clustering_task,
        knn_task,
        named_tasks,
        retrieval_task,
        sample_rows,
    )
    from speed_ray.io.data import holdout_ids, locate, read_beir, read_labelled, verify_checksums

    ev = cfg.eval
    specs: list[TaskSpec] = []
    if ev.retrieval.path is not None:
        folder = locate(ev.retrieval.path)
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
        path = locate(tc.path)
        _checked(path.parent, verify_checksums)
        all_rows = read_labelled(path, tc.text_field, tc.label_field)
        rows = sample_rows(all_rows, tc.max_docs, ev.seed)
        name = tc.name or path.name.split(".")[0].title().replace("_", "").replace("-", "") + (
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
        logger.info(f"eval: {folder}: {len(checked)} files match SHA256SUMS")


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

    from speed_ray.embed.model import build_model, pooling_module, set_prompts
    from speed_ray.io.models import resolve_model

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
    from speed_ray.embed.model import write_model_card
    from speed_ray.io.schemas import read_manifest

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


def _evaluate(
    cfg: SpeedRayConfig,
    out: Path,
    specs: list[TaskSpec],
    models: list[tuple[str, str]],
    units: dict[tuple[str, str], dict[str, Any]],
) -> dict:
    from speed_ray.eval.tasks import as_mteb_model, bm25_model, evaluate, tfidf_encoder
    from speed_ray.io.models import cache_dir

    ev = cfg.eval
    started = time.time()
    log(f"eval: {len(models)} models x {len(specs)} tasks: {', '.join(s.name for s in specs)}")
    _drop_unasked(out, set(units))
    cache_root = cache_dir() / "embeddings" if ev.cache else None
    scores: dict[str, dict[str, Any]] = {}
    layers: dict[str, dict[str, float]] = {}
    for label, spec in models:
        t0 = time.time()
        scores[label] = {}
        # (label, task) -> the record of an earlier score with the same fingerprint, or None: to do
        kept = {task: _kept(out, label, task, fp) for (lb, task), fp in units.items() if lb == label}
        todo = [task for task, rec in kept.items() if rec is None]
        st = None if spec in BASELINES or not todo else load_model(spec, cfg)
        encoder = None if st is None else as_mteb_model(st, label, cache_root)
        for ts in specs:
            if not _scores(spec, ts):
                log(f"eval: {label}: {ts.name}: skipped ({spec} scores no {ts.kind} task)")
                continue
            rec = kept[ts.name]
            if rec is not None:
                scores[label][ts.name] = rec["scores"]
                continue
            t1 = time.time()
            before = _result_files(out)
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
            _record(out, label, ts.name, units[(label, ts.name)], s, before)
            log(
                f"eval: {label}: {ts.name}: {task.metadata.main_score} {s['main_score']:.4f} ({s['seconds']:.0f}s)"
            )
        if spec == "trained" and st is not None:
            kinds = {t: next(ts.kind for ts in specs if ts.name == t) for t in scores[label]}
            card_with_scores(
                cfg,
                st,
                {t: (k, MAIN_SCORES.get(k, "main_score"), scores[label][t]) for t, k in kinds.items()},
            )
        if ev.layers and spec not in BASELINES:
            rec = kept[LAYERS]
            if rec is not None:
                layers[label] = rec["scores"]
            else:
                from speed_ray.eval.layers import layer_scores

                assert st is not None
                knn = next(ts for ts in specs if ts.kind == "knn")
                assert knn.texts is not None
                before = _result_files(out)
                layers[label] = layer_scores(st, knn.build, knn.texts(), out, ev.batch_size)
                _record(out, label, LAYERS, units[(label, LAYERS)], layers[label], before)
                log(f"eval: {label}: layers: " + ", ".join(f"{k} {v:.3f}" for k, v in layers[label].items()))
        log(f"eval: {label} done in {time.time() - t0:.0f}s" + ("" if todo else " (every score kept)"))
    manifest = {
        "tasks": {s.name: s.kind for s in specs},
        "models": dict(models),
        "scores": scores,
        "layers": layers,
        "duration_s": round(time.time() - started, 2),
    }
    if layers:
        from speed_ray.eval.layers import plot_layers

        plot_layers(layers, next(s.name for s in specs if s.kind == "knn"), out / "layers.png")
    write_json_atomic(out / "_manifest.json", manifest)
    return manifest


# ----------------------------------------------------------------------------------------------
# Per (model, task) records


DONE = "_done"


def _record_path(out: Path, label: str, task: str) -> Path:
    return out / DONE / label / f"{task}.json"


def _kept(out: Path, label: str, task: str, fp: dict[str, Any]) -> dict[str, Any] | None:
    """The record of (label, task) if it was scored with fingerprint ``fp``; a stale one is logged
    and removed with its result files, so the score is made again."""
    path = _record_path(out, label, task)
    if not path.is_file():
        return None
    rec = json.loads(path.read_text())
    if rec["fingerprint"]["sha256"] == fp["sha256"]:
        main = rec["scores"].get("main_score")
        shown = f" (main score {main:.4f})" if isinstance(main, float) else ""
        log(f"eval: {label}: {task}: unchanged since it was scored, kept{shown}")
        return rec
    changes = "; ".join(diff(rec["fingerprint"], fp)) or "its fingerprint changed"
    log(f"eval: {label}: {task}: stale: {changes}; scoring it again")
    _drop(out, path, rec)
    return None


def _record(out: Path, label: str, task: str, fp: dict, scores: dict, before: dict[str, Any]) -> None:
    """Record a fresh score with its fingerprint and the result files it wrote."""
    files = sorted(p for p, stamp in _result_files(out).items() if before.get(p) != stamp)
    rec = {"fingerprint": fp, "scores": scores, "files": files}
    path = _record_path(out, label, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, rec)


def _result_files(out: Path) -> dict[str, tuple[int, int]]:
    """mteb's result files under ``out`` (the scores; not the model_meta.json beside them)."""
    found = {}
    for top in ("results", "layers"):
        for p in (out / top).rglob("*.json"):
            if p.name != "model_meta.json":
                st = p.stat()
                found[str(p.relative_to(out))] = (st.st_mtime_ns, st.st_size)
    return found


def _drop(out: Path, record: Path, rec: dict[str, Any]) -> None:
    """Remove a record and its result files, and the folders left with nothing else."""
    for name in rec.get("files", []):
        path = out / name
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != out and folder.is_dir() and not any(map(_holds_results, folder.iterdir())):
            remove(folder)  # what mteb writes beside results (model_meta.json, run_settings.jsonl)
            folder = folder.parent
    record.unlink(missing_ok=True)
    if record.parent.is_dir() and not any(record.parent.iterdir()):
        record.parent.rmdir()


def _holds_results(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".json" and path.name != "model_meta.json"


def _drop_unasked(out: Path, units: set[tuple[str, str]]) -> None:
    """Records (and result files) of models or tasks this config no longer asks for."""
    for path in sorted((out / DONE).glob("*/*.json")):
        label, task = path.parent.name, path.stem
        if (label, task) not in units:
            log(f"eval: {label}: {task}: no longer in this config; its results removed")
            _drop(out, path, json.loads(path.read_text()))
