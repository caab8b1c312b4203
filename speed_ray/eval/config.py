"""The ``eval.*`` section (the models to score and the tasks to score them on) and the
``experiment.*`` section (variants of a run trained and scored side by side)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from speed_ray.io.settings import (
    ConfigError,
    check_choices,
    check_model,
    check_non_negative,
    check_rows,
    locate,
    looks_like_path,
)

# The eval.models entries that name no model spec: the run's own models and the lexical baselines.
NAMES = ("base", "trained", "tfidf", "bm25")
# Keys that change how fast eval runs, never its scores (``speed_ray.io.fingerprint``).
RUNTIME = ("eval.batch_size", "eval.cache", "eval.resources.cpus", "eval.resources.gpus")


@dataclass
class EvalResources:
    """What the Ray task that scores one model asks for: the models encode there, not in the driver
    (on a cluster, the driver's head node has no GPU)."""

    cpus: float = 1.0
    gpus: float = 0.0
    """1 on a GPU cluster: the model encodes on that GPU (a 7B embedder cannot be scored on CPU)."""


@dataclass
class RetrievalTaskConfig:
    path: str | None = "builtin:debian/retrieval"
    """A BEIR-layout folder: corpus.jsonl, queries.jsonl, qrels/test.tsv, each plain or gzipped
    (null: no retrieval task). Default: the Debian retrieval set shipped with speed-ray."""
    name: str = "DebianPackageRetrieval"
    query_instruction: str = "Given a short description of a Debian package, retrieve its full description"
    """The query prompt of models that saved none (decoders with lasttoken pooling use it)."""
    max_queries: int = 0
    """0: every query; N: a seeded sample of N queries."""
    max_docs: int = 0
    """0: the whole corpus; N: the sampled queries' judged documents plus a seeded sample of the
    others, N in all (big models on small machines: fewer documents make retrieval easier)."""


@dataclass
class LabelledTaskConfig:
    path: str | None = None
    """A JSONL file (or .jsonl.gz) with a text and a label per row (null: no such task);
    ``builtin:debian/labelled`` is the Debian set shipped with speed-ray."""
    name: str = ""
    """The mteb task name (results/<model>/<revision>/<name>.json); default: from the file name."""
    text_field: str = "text"
    label_field: str = "label"
    max_docs: int = 0
    """0: every row; N: a seeded sample of N rows (big models on small machines)."""
    split: str = "cv"
    """kNN only: cv (5-fold cross-validation) | holdout (a fixed test_fraction of the rows, seeded)."""
    test_fraction: float = 0.1
    k: int = 10
    """kNN only: neighbours, by cosine similarity (the crops paper: k=10)."""


@dataclass
class EvalConfig:
    models: list[str] = field(default_factory=lambda: ["base", "trained"])
    """base (embed.model, untouched, with embed.pooling) | trained (this run's embed/model) | tfidf |
    bm25 (retrieval only) | a built-in name, a model folder or a hub name (a SentenceTransformer, or a
    plain transformer given embed.pooling)."""
    retrieval: RetrievalTaskConfig = field(default_factory=RetrievalTaskConfig)
    knn: LabelledTaskConfig = field(default_factory=LabelledTaskConfig)
    """kNN classification (k nearest by cosine): accuracy and macro-F1."""
    clustering: LabelledTaskConfig = field(default_factory=LabelledTaskConfig)
    """k-means with one cluster per label: V-measure."""
    mteb_tasks: list[str] = field(default_factory=list)
    """Standard mteb tasks or benchmarks by name (e.g. NanoArguAnaRetrieval, "MTEB(eng, v2)"): they
    need network or the datasets in the local Hugging Face cache."""
    layers: bool = False
    """Also score every layer's mean-pooled hidden states on the kNN task (the crops paper's Fig. 4)."""
    seed: int = 42
    """Samples, splits and k-means."""
    batch_size: int = 64
    max_seq_length: int = 128
    cache: bool = True
    """Keep embeddings, keyed on the model's weights, prompts and length, and the text, so scoring a
    model again embeds nothing it has embedded before."""
    resources: EvalResources = field(default_factory=EvalResources)

    def validate(self, variants: Iterable[str] = ()) -> None:
        """``variants``: an experiment's variant names, which stand for their models in ``models``."""
        check_choices({"eval.knn.split": (self.knn.split, ("cv", "holdout"))})
        if not 0 < self.knn.test_fraction < 1:
            raise ConfigError(
                f"eval.knn.test_fraction: expected a number between 0 and 1, got {self.knn.test_fraction}"
            )
        if self.knn.k < 1:
            raise ConfigError(f"eval.knn.k: expected at least 1, got {self.knn.k}")
        check_non_negative(
            {"eval.resources.cpus": self.resources.cpus, "eval.resources.gpus": self.resources.gpus}
        )
        if self.layers and self.knn.path is None:
            raise ConfigError("eval.layers: the layer analysis scores the kNN task; set eval.knn.path")
        self._check_files()
        self._check_models(tuple(variants))

    def _check_files(self) -> None:
        from speed_ray.io import data

        if self.retrieval.path is not None:
            folder = locate("eval.retrieval.path", self.retrieval.path)
            for rel in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
                if not data.member(folder, rel).is_file():
                    raise ConfigError(
                        f"eval.retrieval.path: expected {folder / rel} or {folder / rel}.gz (BEIR layout), not found"
                    )
        for key, task in (("eval.knn", self.knn), ("eval.clustering", self.clustering)):
            if task.path is not None and not locate(f"{key}.path", task.path).is_file():
                raise ConfigError(f"{key}.path: file {task.path} not found")
        check_rows("eval.retrieval.path", self.retrieval.path, "read_beir")
        for key, task in (("eval.knn", self.knn), ("eval.clustering", self.clustering)):
            check_rows(f"{key}.path", task.path, "read_labelled", task.text_field, task.label_field)

    def _check_models(self, variants: tuple[str, ...]) -> None:
        """Every entry but a baseline or an experiment variant's name is a model spec checked as the
        other models are; a labelled path or hub name (``label=path``) is left alone, as an experiment
        may train that folder first (only bare paths must exist now)."""
        for i, entry in enumerate(self.models):
            label, named, spec = entry.partition("=")
            if named and (not re.fullmatch(r"[A-Za-z0-9_.-]+", label) or set(label) == {"."}):
                raise ConfigError(
                    f"eval.models[{i}]: label {label!r}: expected letters, digits, '.', '_' or '-' "
                    "(it names the model's result folder)"
                )
            if looks_like_path(entry) and not Path(entry).is_dir():
                raise ConfigError(f"eval.models[{i}]: model folder {entry} not found")
            if named and ("/" in spec or looks_like_path(spec)):
                continue
            spec = spec if named else entry
            if spec not in (*NAMES, *variants):
                check_model(f"eval.models[{i}]", spec)


@dataclass
class ExperimentConfig:
    """``speed-ray experiment``: variants of this config trained and scored side by side."""

    title: str = ""
    prepare: dict[str, Any] = field(default_factory=dict)
    """name -> {stages: [...], dotted.key: value}: ordinary runs of this config made first, in order
    (run name <run.name>-<name> unless set), for what every variant shares: aligned generators,
    synthetic data. Variants reach their outputs by path, e.g. ``embed.data.path: runs/exp-c-junior``
    or ``synth.engine.model: run:../exp-c-align/align/senior``."""
    variants: dict[str, Any] = field(default_factory=dict)
    """name -> {dotted.key: value} overrides; each variant is one run named <run.name>-<name>
    unless it sets run.name."""
    evals: dict[str, Any] = field(default_factory=lambda: {"main": {}})
    """name -> overrides of one eval run; in eval.models a variant's name stands for its model."""
    reference: str = ""
    """A model (a variant or an eval.models label) whose gain over the base counts as 100% in the
    share-of-gain columns."""
    curves: list[str] = field(default_factory=list)
    """Variants whose snapshots (embed.snapshot_steps) are scored against training step."""
    series: dict[str, list[str]] = field(default_factory=dict)
    """name -> variants trained on growing samples of one data set (embed.data.max_rows): plotted as
    score against training rows, from the ``main`` eval."""
    paper: str = ""
    """The papers' figures, in markdown, shown beside ours."""
