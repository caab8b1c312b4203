"""Hard-negative mining and the retriever's ranking, as pure functions over texts and arrays.

The corpus is the texts a query's negatives may come from: ``synth/documents`` for grounded runs
(each example's positive is one of them), else the distinct positives and negatives of the examples,
kept apart by task type (a classification label is never a retrieval row's negative). ``rank_corpus``
ranks it exactly for a block of queries (normalised embeddings: a dot product is the cosine), and
``hard_negatives`` picks a row's negatives from the ranked candidates with NV-Retriever's
positive-aware false-negative guard (arXiv 2407.15831, §3, "TopK-PercPos"). No Ray and no model here:
``speed_ray.synth.neighbours`` runs the embedder.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pyarrow as pa

ANY = ""
"""The group of every query and document of a grounded corpus: any document may be a negative."""


def normalised(text: str | None) -> str:
    """A text compared as a reader would: case and runs of blanks ignored."""
    return " ".join((text or "").split()).casefold()


def row_corpus(examples: Iterable[pa.Table]) -> list[tuple[str, str]]:
    """(task type, text) of every distinct positive and negative of the examples, in order of first
    appearance (the shards in order), so the corpus and its indices are the same on every run."""
    seen: dict[tuple[str, str], None] = {}
    for table in examples:
        for r in table.select(["task_type", "positive", "negative"]).to_pylist():
            for text in (r["positive"], r["negative"]):
                if text:
                    seen.setdefault((r["task_type"] or ANY, text), None)
    return list(seen)


def documents_corpus(documents: Iterable[pa.Table]) -> list[tuple[str, str]]:
    """(``ANY``, text) of every distinct document text, in order."""
    seen: dict[tuple[str, str], None] = {}
    for table in documents:
        for text in table["text"].to_pylist():
            seen.setdefault((ANY, text), None)
    return list(seen)


def rank_corpus(
    queries: np.ndarray,
    corpus: np.ndarray,
    query_groups: Sequence[str],
    corpus_groups: Sequence[str],
    positives: Sequence[int],
    k: int,
    block: int = 16384,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Exact top-``k`` corpus rows per query, among those of the query's group.

    Args:
        queries: [n, d] normalised query embeddings.
        corpus: [m, d] normalised corpus embeddings.
        query_groups: n group names; corpus_groups: m (a query sees only its group's rows).
        positives: n corpus row indices, each query's own positive.
        k: candidates kept per query.
        block: corpus rows scored at a time ([n, block] scores in memory, never [n, m]).

    Returns:
        (indices [n, k'], scores [n, k'], positive scores [n], positive ranks [n]): best first,
        k' = min(k, m); an index of -1 (score -inf) pads a group with fewer than k' rows. A rank is
        1 + the rows of the group scoring above the positive.
    """
    n, m = len(queries), len(corpus)
    k = min(k, m)
    qg = np.asarray(query_groups, dtype=object)
    cg = np.asarray(corpus_groups, dtype=object)
    pos = np.asarray(positives, dtype=np.int64)
    positive_scores = np.einsum("ij,ij->i", queries, corpus[pos]).astype(np.float64)
    best_s = np.full((n, k), -np.inf)
    best_i = np.full((n, k), -1, dtype=np.int64)
    above = np.zeros(n, dtype=np.int64)
    for start in range(0, m, block):
        s = (queries @ corpus[start : start + block].T).astype(np.float64)  # [n, b]
        s[qg[:, None] != cg[None, start : start + block]] = -np.inf
        # A tolerance, so rounding never ranks the positive above itself.
        above += (s > positive_scores[:, None] + 1e-6).sum(axis=1)
        cand_s = np.concatenate([best_s, s], axis=1)  # [n, k + b]
        cand_i = np.concatenate([best_i, np.arange(start, start + s.shape[1])[None, :].repeat(n, 0)], 1)
        order = np.argsort(-cand_s, axis=1, kind="stable")[:, :k]
        best_s = np.take_along_axis(cand_s, order, 1)
        best_i = np.where(np.isfinite(best_s), np.take_along_axis(cand_i, order, 1), -1)
    return best_i, best_s, positive_scores, above + 1


def hard_negatives(
    query: str,
    positive: str,
    positive_score: float,
    candidates: Sequence[str],
    scores: Sequence[float],
    n: int,
    max_ratio: float,
    exclude: Iterable[str | None] = (),
) -> list[str]:
    """The first ``n`` candidates by score that are not the positive, the query or a text of
    ``exclude`` (the row's own negative), compared ``normalised``, and score at most ``max_ratio`` x
    the positive's score: above it a candidate is likely relevant too, a false negative
    (NV-Retriever's TopK-PercPos, 0.95 in the paper)."""
    skip = {normalised(t) for t in (query, positive, *exclude) if t}
    ceiling = max_ratio * positive_score
    out: list[str] = []
    for score, text in sorted(zip(scores, candidates, strict=True), key=lambda c: -c[0]):
        if len(out) == n:
            break
        if score > ceiling or normalised(text) in skip:
            continue
        skip.add(normalised(text))
        out.append(text)
    return out
