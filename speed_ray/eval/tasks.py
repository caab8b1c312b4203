"""Evaluation through mteb, offline: tasks defined in code from local files, so mteb never reaches a
hub, and scored by mteb's own evaluators, so its tooling reads the results.

- retrieval: a BEIR-layout folder (corpus.jsonl, queries.jsonl, qrels/test.tsv); nDCG@10.
- kNN classification: a labelled JSONL; the k nearest training rows by cosine similarity vote (the
  crops paper's in-domain protocol), 5-fold cross-validation or a fixed held-out fraction; accuracy
  and macro-F1.
- clustering: a labelled JSONL; k-means with one cluster per label; V-measure.

Retrieval and kNN tasks keep their per-item scores (``ItemScores``): nDCG@10 and recall@10 per query
(pytrec_eval's, which mteb averages), and 0/1 per kNN row (right or wrong); ``evaluate`` returns
them under ``per_item`` with the standard errors they give (``<metric>_se``, ``speed_ray.eval.stats``).

Baselines: ``TfidfEncoder`` (fit on the task's own documents) and mteb's BM25 (retrieval only).
Embeddings are cached per model (``model_key``: weights, pooling, prompts, length), per task and per
text, with mteb's ``CachedEmbeddingWrapper``.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any, cast

import numpy as np

from speed_ray.eval.stats import se_mean, se_proportion
from speed_ray.io.data import read_beir, sample_rows

KNN_SEED = 42
PER_QUERY = {"ndcg_at_10": "ndcg_cut_10", "recall_at_10": "recall_10"}
"""The retrieval scores kept per query: mteb's name -> pytrec_eval's (mteb's mean is of these)."""


def _metadata(name: str, type_: str, main_score: str, description: str, splits: list[str]) -> Any:
    from mteb import TaskMetadata

    return TaskMetadata(
        name=name,
        description=description,
        reference=None,
        dataset={"path": "local/" + name, "revision": "local"},
        type=cast(Any, type_),
        category="t2t" if type_ == "Retrieval" else "t2c",
        eval_splits=splits,
        eval_langs=["eng-Latn"],
        main_score=main_score,
        date=("2026-01-01", "2026-01-01"),
        dialect=[],
        domains=[],
        task_subtypes=[],
        license="not specified",
        annotations_creators="derived",
        modalities=["text"],
        sample_creation="found",
        bibtex_citation="",
    )


# ----------------------------------------------------------------------------------------------
# Data: pure functions


def sample_queries(
    queries: list[dict], qrels: dict[str, dict[str, int]], max_queries: int, seed: int
) -> tuple[list[dict], dict[str, dict[str, int]]]:
    """A seeded sample of queries with judgements, in file order, and their qrels."""
    judged = [q for q in queries if q["id"] in qrels]
    kept = sample_rows(judged, max_queries, seed)
    return kept, {q["id"]: qrels[q["id"]] for q in kept}


def per_query_scores(trec_scores: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
    """``{metric: {query id: score}}`` of the ``PER_QUERY`` metrics from pytrec_eval's per-query
    scores (``{query id: {pytrec metric: score}}``, what mteb's retrieval evaluator computes)."""
    return {name: {q: round(s[trec], 6) for q, s in trec_scores.items()} for name, trec in PER_QUERY.items()}


# ----------------------------------------------------------------------------------------------
# Tasks


class ItemScores:
    """A task that keeps the per-item scores of its last evaluation, ``{metric: {item id: score}}``,
    and gives their standard errors."""

    per_item: dict[str, dict[str, float]]

    def standard_errors(self, scores: dict[str, float]) -> dict[str, float | None]:
        raise NotImplementedError


def sample_corpus(
    corpus: list[dict], qrels: dict[str, dict[str, int]], max_docs: int, seed: int
) -> list[dict]:
    """Every judged document of ``qrels`` plus a seeded sample of the others, ``max_docs`` in all
    (all when 0), in file order."""
    if not max_docs or max_docs >= len(corpus):
        return corpus
    judged = {d for rel in qrels.values() for d in rel}
    others = [i for i, d in enumerate(corpus) if d["id"] not in judged]
    room = max(0, max_docs - (len(corpus) - len(others)))
    keep = set(random.Random(f"corpus-{seed}").sample(others, min(room, len(others))))
    return [d for i, d in enumerate(corpus) if d["id"] in judged or i in keep]


def retrieval_task(
    name: str, folder: Path, max_queries: int = 0, seed: int = KNN_SEED, max_docs: int = 0
) -> Any:
    """An mteb retrieval task (main score nDCG@10) over a BEIR folder, loaded on first use; optionally
    a seeded sample of the queries and a smaller corpus that keeps every judged document."""
    from datasets import Dataset
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    class LocalRetrieval(ItemScores, AbsTaskRetrieval):
        metadata = _metadata(
            name, "Retrieval", "ndcg_at_10", f"Retrieval over the BEIR folder {folder}.", ["test"]
        )

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            corpus, queries, qrels = read_beir(folder)
            queries, qrels = sample_queries(queries, qrels, max_queries, seed)
            corpus = sample_corpus(corpus, qrels, max_docs, seed)
            split = RetrievalSplitData(
                corpus=Dataset.from_list(corpus),
                queries=Dataset.from_list(queries),
                relevant_docs=qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

        def task_specific_scores(
            self, scores: dict[str, dict[str, float]], qrels: Any, results: Any, hf_split: str, hf_subset: str
        ) -> dict[str, float]:
            # mteb's hook after scoring: ``scores`` holds pytrec_eval's score of every query.
            self.per_item = per_query_scores(scores)
            return {}

        def standard_errors(self, scores: dict[str, float]) -> dict[str, float | None]:
            return {f"{m}_se": se_mean(list(v.values())) for m, v in self.per_item.items()}

    return LocalRetrieval()


def knn_task(
    name: str, rows: list[dict], k: int = 10, test_ids: set[str] | None = None, seed: int = KNN_SEED
) -> Any:
    """An mteb classification task scored by a k-nearest-neighbour vote (cosine) over every training
    row: 5-fold cross-validation over ``rows``, or train on the rows outside ``test_ids`` and score
    the rows inside (main score accuracy; ``f1`` is macro-F1)."""
    from datasets import Dataset, DatasetDict
    from mteb.abstasks.classification import AbsTaskClassification
    from sklearn.neighbors import KNeighborsClassifier

    labels = sorted({r["label"] for r in rows})
    index = {label: i for i, label in enumerate(labels)}

    def table(part: list[dict]) -> Dataset:
        return Dataset.from_dict(
            {
                "text": [r["text"] for r in part],
                "label": [index[r["label"]] for r in part],
                "id": [r["id"] for r in part],  # names each scored row in ``per_item``
            }
        )

    if test_ids is None:
        splits, data = ["train"], DatasetDict({"train": table(rows)})
    else:
        train = [r for r in rows if r["id"] not in test_ids]
        test = [r for r in rows if r["id"] in test_ids]
        if not train or not test:
            raise ValueError(
                f"{name}: the held-out split leaves {len(train)} training and {len(test)} test rows"
            )
        splits, data = ["test"], DatasetDict({"train": table(train), "test": table(test)})
    protocol = "5-fold cross-validation" if test_ids is None else "a held-out split"
    description = f"kNN (k={k}, cosine) over {len(rows)} labelled rows ({len(labels)} labels), {protocol}."

    class LocalKNN(ItemScores, AbsTaskClassification):
        metadata = _metadata(name, "Classification", "accuracy", description, splits)
        evaluator_model = KNeighborsClassifier(n_neighbors=k, metric="cosine", algorithm="brute")
        samples_per_label = len(rows)  # every training row, not mteb's default 8 per label
        n_experiments = 1
        is_cross_validation = test_ids is None

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            # A plain dict of splits, not a DatasetDict: mteb then keeps every column, ``id`` too
            # (it drops all but text and label from a DatasetDict).
            self.dataset = {"default": dict(data)}
            self.data_loaded = True
            self.per_item = {"accuracy": {}}

        def _run_experiment(self, train_split: Any, eval_split: Any, *args: Any, **kwargs: Any) -> Any:
            # one fold (or the held-out split): each of its rows is right (1) or wrong (0)
            scores, predictions = super()._run_experiment(train_split, eval_split, *args, **kwargs)
            rows = zip(eval_split["id"], eval_split["label"], predictions, strict=True)
            self.per_item["accuracy"] |= {i: float(label == p) for i, label, p in rows}
            return scores, predictions

        def standard_errors(self, scores: dict[str, float]) -> dict[str, float | None]:
            # mteb's accuracy is the mean over folds of nearly equal size: about the pooled proportion
            return {"accuracy_se": se_proportion(scores["accuracy"], len(self.per_item["accuracy"]))}

    task = LocalKNN()
    task.seed = seed
    return task


def clustering_task(name: str, rows: list[dict], seed: int = KNN_SEED) -> Any:
    """An mteb clustering task over every row (mteb embeds 4% by default): mini-batch k-means with one
    cluster per label, 10 bootstrap draws of len(rows) rows; main score V-measure."""
    from datasets import Dataset
    from mteb.abstasks.clustering import AbsTaskClustering

    n_labels = len({r["label"] for r in rows})
    data = Dataset.from_dict({"sentences": [r["text"] for r in rows], "labels": [r["label"] for r in rows]})

    class LocalClustering(AbsTaskClustering):
        metadata = _metadata(
            name, "Clustering", "v_measure", f"k-means over {len(rows)} rows, {n_labels} labels.", ["test"]
        )
        max_fraction_of_documents_to_embed = None
        max_documents_per_cluster = len(rows)

        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            self.dataset = {"default": {"test": data}}
            self.data_loaded = True

    task = LocalClustering()
    task.seed = seed
    return task


def named_tasks(names: list[str]) -> list[Any]:
    """Standard mteb tasks or benchmarks by name; the datasets come from the network or the local
    Hugging Face cache (HF_DATASETS_OFFLINE=1 reads the cache only)."""
    import mteb

    benchmarks = {b.name for b in mteb.get_benchmarks()}
    tasks: list[Any] = []
    for name in names:
        if name in benchmarks:
            tasks.extend(mteb.get_benchmark(name).tasks)
        else:
            try:
                tasks.append(mteb.get_task(name))
            except KeyError as e:
                raise ValueError(f"eval.mteb_tasks: {name!r} is neither an mteb task nor a benchmark") from e
    return tasks


# ----------------------------------------------------------------------------------------------
# Models


def model_key(model: Any) -> str:
    """A hash of everything that decides a SentenceTransformer's embeddings: its weights, module
    configs, prompts and maximum length. Equal keys embed equally; a retrained model gets a new key."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().view(-1).view(dtype=_u8()).numpy().tobytes())
    settings = {
        "modules": [type(m).__name__ for m in model],
        "pooling": [m.get_config_dict() for m in model if hasattr(m, "get_config_dict")],
        "prompts": model.prompts,
        "max_seq_length": model.max_seq_length,
    }
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()


def _u8() -> Any:
    import torch

    return torch.uint8


def text_encoder(name: str, revision: str, embed: Any) -> Any:
    """An mteb encoder of our own: ``embed(texts) -> [n, dim] array``; its results go to
    ``results/<name>/<revision>/``. It names no similarity function, so mteb scores by cosine."""
    from mteb.models.abs_encoder import AbsEncoder
    from mteb.models.model_meta import ModelMeta

    class TextEncoder(AbsEncoder):
        mteb_model_meta = ModelMeta.create_empty({"name": name, "revision": revision})

        def encode(
            self, inputs: Any, *, task_metadata: Any, hf_split: str, hf_subset: str, **kwargs: Any
        ) -> Any:
            return embed([t for batch in inputs for t in batch["text"]])

    return TextEncoder()


def tfidf_encoder(fit_texts: list[str], max_features: int = 16384) -> Any:
    """TF-IDF vectors (sublinear tf, L2-normalised, the ``max_features`` most frequent terms) fit on
    ``fit_texts``, as an mteb encoder: the classical baseline of the crops paper."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    vectorizer = TfidfVectorizer(sublinear_tf=True, max_features=max_features, dtype=np.float32)
    vectorizer.fit(fit_texts)
    fit_hash = hashlib.sha256("\n".join(fit_texts).encode()).hexdigest()[:12]
    return text_encoder("speed-ray/tfidf", fit_hash, lambda texts: vectorizer.transform(texts).toarray())


def bm25_model() -> Any:
    """mteb's BM25 baseline (bm25s, English stop words and stemming); retrieval tasks only."""
    import mteb

    return mteb.get_model("mteb/baseline-bm25s")


def as_mteb_model(model: Any, label: str, cache_root: Path | None) -> Any:
    """A SentenceTransformer as an mteb encoder named ``speed-ray/<label>`` with its ``model_key`` as
    revision, its embeddings cached under ``cache_root/<key>`` when a root is given."""
    from mteb.models.cache_wrappers import CachedEmbeddingWrapper
    from mteb.models.sentence_transformer_wrapper import SentenceTransformerEncoderWrapper

    key = model_key(model)
    model.model_card_data.model_name = f"speed-ray/{label}"
    model.model_card_data.base_model_revision = key[:12]
    wrapped = SentenceTransformerEncoderWrapper(model)
    if cache_root is None:
        return wrapped
    return CachedEmbeddingWrapper(wrapped, cache_root / key)


def evaluate(model: Any, task: Any, results_dir: Path, batch_size: int) -> dict[str, Any]:
    """Run mteb on ``task``; results go to ``results_dir/results/<model>/<revision>/<Task>.json``
    (mteb's layout); returns the numeric scores of the task's first split, and for an ``ItemScores``
    task the standard errors (``<metric>_se``) and the per-item scores (``per_item``)."""
    import mteb
    from mteb.cache import ResultCache

    from speed_ray.io.logs import bars

    result = mteb.evaluate(
        model,
        tasks=[task],
        cache=ResultCache(cache_path=results_dir),
        overwrite_strategy="always",
        # A bar with an ETA per encoding pass (sentence-transformers' encode; mteb passes it on), none
        # at -q; mteb's own bar would count the one task.
        encode_kwargs={"batch_size": batch_size, "show_progress_bar": bars()},
        show_progress_bar=False,
    )
    split = task.metadata.eval_splits[0]
    numbers = {
        k: float(v) for k, v in result.task_results[0].scores[split][0].items() if isinstance(v, int | float)
    }
    if not isinstance(task, ItemScores):
        return numbers
    return numbers | task.standard_errors(numbers) | {"per_item": task.per_item}
