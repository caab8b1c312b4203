"""The mteb integration scores tiny tasks exactly as a hand computation does.

The encoder here answers each text with a vector written in the test, so the ranking, the
neighbours and hence every score can be worked out by hand; mteb's own evaluators do the scoring.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from speed_ray.eval.layers import precomputed_encoder
from speed_ray.eval.tasks import (
    clustering_task,
    evaluate,
    knn_task,
    per_query_scores,
    retrieval_task,
    sample_corpus,
    sample_queries,
    tfidf_encoder,
)
from speed_ray.io.data import holdout_ids, read_labelled, sample_rows


def _angle(deg: float) -> np.ndarray:
    return np.array([math.cos(math.radians(deg)), math.sin(math.radians(deg))], dtype=np.float32)


def _beir(folder: Path, corpus: dict[str, str], queries: dict[str, str], qrels: dict[str, str]) -> Path:
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in corpus.items())
    )
    (folder / "queries.jsonl").write_text(
        "".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items())
    )
    lines = ["query-id\tcorpus-id\tscore", *(f"{q}\t{d}\t1" for q, d in qrels.items())]
    (folder / "qrels" / "test.tsv").write_text("\n".join(lines) + "\n")
    return folder


def test_retrieval_scores_match_hand_computation(tmp_path):
    # q1 wants d1 but sees d2 (10 deg away) before d1 (30 deg): relevant at rank 2.
    # q2 wants d3, which is nearest: rank 1.
    folder = _beir(
        tmp_path / "beir",
        {"d1": "doc one", "d2": "doc two", "d3": "doc three"},
        {"q1": "query one", "q2": "query two"},
        {"q1": "d1", "q2": "d3"},
    )
    vectors = {
        "doc one": _angle(30),
        "doc two": _angle(10),
        "doc three": _angle(90),
        "query one": _angle(0),
        "query two": _angle(85),
    }
    s = evaluate(
        precomputed_encoder("test/lookup", vectors), retrieval_task("TinyRetrieval", folder), tmp_path, 8
    )
    ndcg_q1 = 1 / math.log2(3)  # one relevant document at rank 2; the ideal has it at rank 1
    assert s["ndcg_at_10"] == pytest.approx((ndcg_q1 + 1.0) / 2, abs=1e-5)
    assert s["recall_at_1"] == pytest.approx(0.5)
    assert s["mrr_at_10"] == pytest.approx((1 / 2 + 1) / 2, abs=1e-5)
    # per query: q1 ndcg_q1, q2 1; the standard error of a mean of two is |a - b| / 2
    assert s["per_item"]["ndcg_at_10"] == pytest.approx({"q1": ndcg_q1, "q2": 1.0}, abs=1e-6)
    assert s["ndcg_at_10_se"] == pytest.approx((1 - ndcg_q1) / 2, abs=1e-6)
    assert s["per_item"]["recall_at_10"] == {"q1": 1.0, "q2": 1.0} and s["recall_at_10_se"] == 0.0
    # mteb's own layout: results/<model>/<revision>/<Task>.json
    saved = json.loads((tmp_path / "results/test__lookup/layers/TinyRetrieval.json").read_text())
    assert saved["scores"]["test"][0]["ndcg_at_10"] == pytest.approx(s["ndcg_at_10"], abs=1e-5)


def test_per_query_ndcg_and_recall_match_hand_computation():
    """pytrec_eval's per-query scores (what mteb averages), linear gain, log2(rank + 1) discount:
    - q1 wants d1 and d2; the run ranks d3, d1, d2: DCG 1/log2(3) + 1/log2(4), ideal 1 + 1/log2(3).
    - q2 wants d3 (grade 2) and d1 (grade 1); the run ranks d1, d3: DCG 1 + 2/log2(3), ideal
      2 + 1/log2(3).
    - q3 wants d4, which the run never returns: 0, recall 0."""
    from mteb._evaluators.retrieval_metrics import calculate_retrieval_scores

    qrels = {"q1": {"d1": 1, "d2": 1}, "q2": {"d3": 2, "d1": 1}, "q3": {"d4": 1}}
    run = {"q1": {"d3": 0.9, "d1": 0.8, "d2": 0.7}, "q2": {"d1": 0.9, "d3": 0.8}, "q3": {"d1": 0.5}}
    r = calculate_retrieval_scores(run, qrels, [10])
    per = per_query_scores(r.all_scores)
    l3 = math.log2(3)
    ndcg = {"q1": (1 / l3 + 1 / 2) / (1 + 1 / l3), "q2": (1 + 2 / l3) / (2 + 1 / l3), "q3": 0.0}
    assert per["ndcg_at_10"] == pytest.approx(ndcg, abs=1e-6)
    assert per["recall_at_10"] == {"q1": 1.0, "q2": 1.0, "q3": 0.0}
    # mteb's score is their mean (rounded to 5 decimals)
    assert r.ndcg["NDCG@10"] == pytest.approx(sum(ndcg.values()) / 3, abs=1e-5)


def _rows(spec: list[tuple[str, float, str]]) -> tuple[list[dict], dict[str, np.ndarray]]:
    rows = [{"id": i, "text": f"text {i}", "label": label} for i, _, label in spec]
    return rows, {f"text {i}": _angle(deg) for i, deg, _ in spec}


def test_knn_holdout_scores_match_hand_computation(tmp_path):
    # Training: three 'a' rows near 0 deg, three 'b' rows near 90 deg; k = 3.
    # Test: t1 (5 deg, a) -> a; t2 (85, b) -> b; t3 (88, labelled a) -> b, wrong; t4 (2, a) -> a.
    train = [
        ("a1", 0, "a"),
        ("a2", 3, "a"),
        ("a3", 6, "a"),
        ("b1", 80, "b"),
        ("b2", 84, "b"),
        ("b3", 90, "b"),
    ]
    test = [("t1", 5, "a"), ("t2", 85, "b"), ("t3", 88, "a"), ("t4", 2, "a")]
    rows, vectors = _rows(train + test)
    task = knn_task("TinyKNN", rows, k=3, test_ids={"t1", "t2", "t3", "t4"})
    s = evaluate(precomputed_encoder("test/lookup", vectors), task, tmp_path, 8)
    assert s["accuracy"] == pytest.approx(3 / 4)
    # a: precision 2/2, recall 2/3 -> F1 0.8; b: precision 1/2, recall 1/1 -> F1 2/3
    assert s["f1"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert s["per_item"] == {"accuracy": {"t1": 1.0, "t2": 1.0, "t3": 0.0, "t4": 1.0}}
    assert s["accuracy_se"] == pytest.approx(math.sqrt(0.75 * 0.25 / 4))  # sqrt(p(1-p)/n)


def test_knn_cross_validation_matches_hand_computation(tmp_path):
    # 10 rows, 5 folds of 2. Cluster near 0 deg: five 'a'. Cluster near 90 deg: four 'b' and one row
    # labelled 'a' (m). With k = 3, any held-out row still has at least 3 of its own cluster in
    # training, at most one of them m: every row is predicted its cluster's majority label, so only m
    # is wrong. The fold holding m scores 1/2, the other four 1: mean 0.9.
    spec = (
        [(f"a{i}", i, "a") for i in range(5)] + [(f"b{i}", 86 + i, "b") for i in range(4)] + [("m", 90, "a")]
    )
    rows, vectors = _rows(spec)
    s = evaluate(precomputed_encoder("test/lookup", vectors), knn_task("TinyKNNCV", rows, k=3), tmp_path, 8)
    assert s["accuracy"] == pytest.approx(0.9)
    # every row scored once across the folds; only m is wrong
    assert s["per_item"]["accuracy"] == {r["id"]: float(r["id"] != "m") for r in rows}
    assert s["accuracy_se"] == pytest.approx(math.sqrt(0.9 * 0.1 / 10))


def test_clustering_separable_labels_score_one(tmp_path):
    spec = [(f"a{i}", i, "x") for i in range(6)] + [(f"b{i}", 85 + i, "y") for i in range(6)]
    rows, vectors = _rows(spec)
    s = evaluate(
        precomputed_encoder("test/lookup", vectors), clustering_task("TinyClustering", rows), tmp_path, 8
    )
    assert s["v_measure"] == pytest.approx(1.0)


def test_tfidf_baseline_retrieves_by_shared_words(tmp_path):
    folder = _beir(
        tmp_path / "beir",
        {"d1": "apple banana cherry", "d2": "dog elephant fox", "d3": "guitar piano violin"},
        {"q1": "banana", "q2": "violin piano", "q3": "fox"},
        {"q1": "d1", "q2": "d3", "q3": "d2"},
    )
    texts = ["apple banana cherry", "dog elephant fox", "guitar piano violin"]
    s = evaluate(tfidf_encoder(texts), retrieval_task("TinyTfidf", folder), tmp_path, 8)
    assert s["ndcg_at_10"] == pytest.approx(1.0)


def test_samples_and_splits_are_seeded(tmp_path):
    rows = [{"id": str(i), "text": f"t{i}", "label": "x"} for i in range(100)]
    assert sample_rows(rows, 0, 1) is rows
    a, b = sample_rows(rows, 10, 1), sample_rows(rows, 10, 1)
    assert a == b and len(a) == 10 and [r["id"] for r in a] == sorted((r["id"] for r in a), key=int)
    test = holdout_ids([r["id"] for r in rows], 0.1, 42)
    assert len(test) == 10 and test == holdout_ids([r["id"] for r in reversed(rows)], 0.1, 42)
    # the held-out split and a sample are drawn independently (one seed, separate streams)
    many = [str(i) for i in range(2000)]
    sampled = {r["id"] for r in sample_rows([{"id": i} for i in many], 500, 42)}
    assert 25 <= len(sampled & holdout_ids(many, 0.1, 42)) <= 75
    queries = [{"id": f"q{i}"} for i in range(5)]
    kept, qrels = sample_queries(queries, {"q1": {"d": 1}, "q3": {"d": 1}, "q4": {"d": 1}}, 2, 0)
    assert len(kept) == 2 and set(qrels) == {q["id"] for q in kept} <= {"q1", "q3", "q4"}
    corpus = [{"id": f"d{i}"} for i in range(50)]
    small = sample_corpus(corpus, {"q1": {"d7": 1}, "q2": {"d40": 1}}, 10, 0)
    ids = [d["id"] for d in small]
    assert len(small) == 10 and {"d7", "d40"} <= set(ids) and ids == sorted(ids, key=lambda d: int(d[1:]))
    assert sample_corpus(corpus, {}, 0, 0) is corpus


def test_labelled_file_errors_name_the_row(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text('{"id": "a", "text": "fine", "label": "x"}\n{"id": "b", "text": "", "label": "y"}\n')
    with pytest.raises(ValueError, match=r'l.jsonl:2: text: expected a non-empty string, got ""'):
        read_labelled(path)
    path.write_text('{"id": "a", "text": "fine"}\n')
    with pytest.raises(ValueError, match=r"l.jsonl:1: missing keys \['label'\]"):
        read_labelled(path)


def test_standard_tasks_and_benchmarks_by_name():
    from speed_ray.eval.tasks import named_tasks

    (task,) = named_tasks(["NanoArguAnaRetrieval"])
    assert task.metadata.name == "NanoArguAnaRetrieval" and task.metadata.type == "Retrieval"
    bench = named_tasks(["MTEB(eng, v2)"])
    assert len(bench) > 20 and {"STSBenchmark", "Banking77Classification"} <= {t.metadata.name for t in bench}
    with pytest.raises(
        ValueError, match=r"eval.mteb_tasks: 'NoSuchTask' is neither an mteb task nor a benchmark"
    ):
        named_tasks(["NoSuchTask"])
