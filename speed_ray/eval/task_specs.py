"""The tasks ``eval.*`` configures (``retrieval``, ``knn``, ``clustering``, ``mteb_tasks``), as specs the
eval stage builds afresh for every model; their data are read and checked when the specs are made,
before any model loads."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.eval.config import EvalConfig, LabelledTaskConfig

logger = logging.getLogger(__name__)


@dataclass
class TaskSpec:
    """A task to build afresh for every model (mteb tasks keep random state between runs)."""

    name: str
    kind: str  # retrieval | knn | clustering | mteb
    build: Callable[[], Any]
    texts: Callable[[], list[str]] | None  # what TF-IDF is fit on (None: no TF-IDF)


def task_specs(cfg: SpeedRayConfig) -> list[TaskSpec]:
    """The configured tasks, data read and checked now (before any model loads)."""
    from speed_ray.eval.tasks import named_tasks

    ev = cfg.eval
    specs = [] if ev.retrieval.path is None else [_retrieval_spec(ev)]
    for kind, tc in (("knn", ev.knn), ("clustering", ev.clustering)):
        if tc.path is not None:
            specs.append(_labelled_spec(kind, tc, ev.seed))
    for task in named_tasks(ev.mteb_tasks):
        specs.append(TaskSpec(task.metadata.name, "mteb", _bind(lambda t: t, task), None))
    return specs


def _retrieval_spec(ev: EvalConfig) -> TaskSpec:
    """Retrieval on a BEIR folder; TF-IDF is fit on its corpus."""
    from speed_ray.eval.tasks import retrieval_task
    from speed_ray.io.data import locate, read_beir, verify_checksums

    r = ev.retrieval
    assert r.path is not None
    folder = locate(r.path)
    _checked(folder, verify_checksums)
    corpus = read_beir(folder)[0]
    return TaskSpec(
        r.name,
        "retrieval",
        lambda: retrieval_task(r.name, folder, r.max_queries, ev.seed, r.max_docs),
        lambda: [(d["title"] + " " + d["text"]).strip() for d in corpus],
    )


def _labelled_spec(kind: str, tc: LabelledTaskConfig, seed: int) -> TaskSpec:
    """kNN classification or clustering on a labelled JSONL; TF-IDF is fit on the sampled rows."""
    from speed_ray.eval.tasks import clustering_task, knn_task
    from speed_ray.io.data import holdout_ids, locate, read_labelled, sample_rows, verify_checksums

    assert tc.path is not None
    path = locate(tc.path)
    _checked(path.parent, verify_checksums)
    all_rows = read_labelled(path, tc.text_field, tc.label_field)
    rows = sample_rows(all_rows, tc.max_docs, seed)
    name = tc.name or _task_name(path, kind)
    if kind == "knn":
        test = (
            holdout_ids([r["id"] for r in all_rows], tc.test_fraction, seed)
            if tc.split == "holdout"
            else None
        )
        build = _bind(knn_task, name, rows, tc.k, test, seed)
    else:
        build = _bind(clustering_task, name, rows, seed)
    return TaskSpec(name, kind, build, _bind(lambda rs: [r["text"] for r in rs], rows))


def _task_name(path: Path, kind: str) -> str:
    """A task named after its file: ``debian_sections.jsonl`` -> ``DebianSectionsKNN``."""
    return path.name.split(".")[0].title().replace("_", "").replace("-", "") + (
        "KNN" if kind == "knn" else "Clustering"
    )


def _bind(fn: Callable, *args: Any) -> Callable[[], Any]:
    return lambda: fn(*args)


def _checked(folder: Path, verify: Callable[[Path], list[str]]) -> None:
    checked = verify(folder)
    if checked:
        logger.info(f"eval: {folder}: {len(checked)} files match SHA256SUMS")
