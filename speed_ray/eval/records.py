"""Per (model, task) records, so that a rerun scores only what changed.

A score's fingerprint (``speed_ray.io.fingerprint``) holds what it depends on: the task's settings and
data, the model's spec, settings and, for a trained model or a folder, what is in it.
``<run>/eval/_done/<label>/<task>.json`` records the fingerprint with the scores and the mteb result
files the score wrote. A record whose fingerprint holds is kept; a stale one, or one of a model or
task the config no longer asks for, is removed with its result files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed_ray.config import RUNTIME_KEYS, SpeedRayConfig
from speed_ray.eval.models import BASELINES, can_score
from speed_ray.io.fingerprint import diff, fingerprint, flatten, folder_stamp, output_hash, path_hash, select
from speed_ray.io.schemas import read_manifest, write_json_atomic
from speed_ray.io.steps import log, remove

if TYPE_CHECKING:
    from speed_ray.eval.task_specs import TaskSpec

LAYERS = "layers"  # the layer analysis, recorded as one more task of each model
DONE = "_done"

# What a score depends on: the task's settings and data, and the model's settings; which model a
# label names (its spec), and what is in it, are inputs of their own.
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
PER_ITEM = {"retrieval", "knn"}
"""The kinds whose records keep per-item scores (``per_item``); a record made before they were kept
has another fingerprint, so it is scored again (from the embeddings cache) rather than shown
without its standard error."""


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
        for name, kind in _model_tasks(cfg, spec, specs):
            # the query instruction is a setting of the models that saved none (MODEL_KEYS)
            scored = {"scores": "per-item"} if kind in PER_ITEM else {}
            task_config = (
                {"task": name}
                | scored
                | select(flat, TASK_KEYS[kind], (*RUNTIME_KEYS, "eval.retrieval.query_instruction"))
            )
            units[(label, name)] = fingerprint(task_config | model_config, data.get(kind, {}) | model_inputs)
    return units


def _model_tasks(cfg: SpeedRayConfig, spec: str, specs: list[TaskSpec]) -> list[tuple[str, str]]:
    """(name, kind) of every task model ``spec`` is scored on, the layer analysis included."""
    tasks = [(ts.name, ts.kind) for ts in specs if can_score(spec, ts)]
    if cfg.eval.layers and spec not in BASELINES:
        tasks.append((LAYERS, LAYERS))
    return tasks


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


def _record_path(out: Path, label: str, task: str) -> Path:
    return out / DONE / label / f"{task}.json"


def kept(out: Path, label: str, task: str, fp: dict[str, Any]) -> dict[str, Any] | None:
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


def record(out: Path, label: str, task: str, fp: dict, scores: dict, before: dict[str, Any]) -> None:
    """Record a fresh score with its fingerprint and the result files it wrote (``before``: the
    ``result_files`` before it was scored)."""
    files = sorted(p for p, stamp in result_files(out).items() if before.get(p) != stamp)
    rec = {"fingerprint": fp, "scores": scores, "files": files}
    path = _record_path(out, label, task)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, rec)


def result_files(out: Path) -> dict[str, tuple[int, int]]:
    """mteb's result files under ``out`` (the scores; not the model_meta.json beside them)."""
    found = {}
    for top in ("results", "layers"):
        for p in (out / top).rglob("*.json"):
            if p.name != "model_meta.json":
                st = p.stat()
                found[str(p.relative_to(out))] = (st.st_mtime_ns, st.st_size)
    return found


def _drop(out: Path, done: Path, rec: dict[str, Any]) -> None:
    """Remove the record at ``done`` (``rec``) and its result files, and the folders left with
    nothing else."""
    for name in rec.get("files", []):
        path = out / name
        path.unlink(missing_ok=True)
        folder = path.parent
        while folder != out and folder.is_dir() and not any(map(_holds_results, folder.iterdir())):
            remove(folder)  # what mteb writes beside results (model_meta.json, run_settings.jsonl)
            folder = folder.parent
    done.unlink(missing_ok=True)
    if done.parent.is_dir() and not any(done.parent.iterdir()):
        done.parent.rmdir()


def _holds_results(path: Path) -> bool:
    return path.is_dir() or path.suffix == ".json" and path.name != "model_meta.json"


def drop_unasked(out: Path, units: set[tuple[str, str]]) -> None:
    """Records (and result files) of models or tasks this config no longer asks for."""
    for path in sorted((out / DONE).glob("*/*.json")):
        label, task = path.parent.name, path.stem
        if (label, task) not in units:
            log(f"eval: {label}: {task}: no longer in this config; its results removed")
            _drop(out, path, json.loads(path.read_text()))
