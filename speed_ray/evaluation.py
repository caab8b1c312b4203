"""Offline mteb evaluation: a retrieval task read from a BEIR-layout folder (corpus.jsonl,
queries.jsonl, qrels/test.tsv), defined in code so mteb never reaches a hub.

The Debian retrieval set (../shared/data/debian/retrieval) is read as it is: 5,000 long package
descriptions as the corpus, 1,000 short descriptions as queries, one relevant document each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speed_ray.data import read_beir


def retrieval_task(name: str, folder: Path) -> Any:
    """An mteb retrieval task (main score nDCG@10) over the BEIR folder, loaded on first use."""
    from datasets import Dataset
    from mteb import TaskMetadata
    from mteb.abstasks.retrieval import AbsTaskRetrieval
    from mteb.abstasks.retrieval_dataset_loaders import RetrievalSplitData

    metadata = TaskMetadata(
        name=name,
        description=f"Retrieval over the BEIR-layout folder {folder.name}, defined offline by speed-ray.",
        reference=None,
        dataset={"path": "local/" + name, "revision": "local"},
        type="Retrieval",
        category="t2t",
        eval_splits=["test"],
        eval_langs=["eng-Latn"],
        main_score="ndcg_at_10",
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

    class LocalRetrieval(AbsTaskRetrieval):
        def load_data(self, num_proc: int | None = None, **kwargs: Any) -> None:
            corpus, queries, qrels = read_beir(folder)
            split = RetrievalSplitData(
                corpus=Dataset.from_list(corpus),
                queries=Dataset.from_list(queries),
                relevant_docs=qrels,
                top_ranked=None,
            )
            self.dataset = {"default": {"test": split}}
            self.data_loaded = True

    LocalRetrieval.metadata = metadata
    return LocalRetrieval()


def evaluate(model: Any, label: str, task: Any, results_dir: Path, batch_size: int) -> dict[str, float]:
    """Run mteb on ``task``; results go to ``results_dir/results/speed-ray__<label>/...`` (mteb's own
    layout); returns the test scores."""
    import mteb
    from mteb.cache import ResultCache

    model.model_card_data.model_name = f"speed-ray/{label}"

    result = mteb.evaluate(
        model,
        tasks=[task],
        cache=ResultCache(cache_path=results_dir),
        overwrite_strategy="always",
        encode_kwargs={"batch_size": batch_size},
        show_progress_bar=True,
    )
    scores = result.task_results[0].scores["test"][0]
    return {k: float(v) for k, v in scores.items() if isinstance(v, int | float)}
