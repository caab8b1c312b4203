"""The eval stage end to end on real (tiny and small) models: every model on every task, mteb's
results layout, the baselines, the layer analysis and the embeddings cache."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pytest

from speed_ray.config import load_config
from speed_ray.eval.stats import paired_difference, se_mean, se_proportion
from speed_ray.io.data import open_text
from tests.conftest import DEBIAN


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """60 Debian package descriptions, 20 from each of three sections."""
    want = {"games": 20, "science": 20, "libs": 20}
    rows = []
    for line in open_text(DEBIAN / "labelled.jsonl.gz"):
        r = json.loads(line)
        if want.get(r["label"], 0) > 0:
            want[r["label"]] -= 1
            rows.append(r)
    path = tmp_path_factory.mktemp("labelled") / "sections.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _tfidf_knn_by_hand(path: Path, seed: int) -> float:
    """The kNN protocol computed with scikit-learn directly: 5 shuffled folds, k=10, cosine."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.model_selection import KFold
    from sklearn.neighbors import KNeighborsClassifier

    rows = [json.loads(line) for line in path.open()]
    x = (
        TfidfVectorizer(sublinear_tf=True, max_features=16384)
        .fit_transform([r["text"] for r in rows])
        .toarray()
    )
    y = np.array([r["label"] for r in rows])
    accs = []
    for train, test in KFold(5, shuffle=True, random_state=seed).split(x):
        knn = KNeighborsClassifier(n_neighbors=10, metric="cosine", algorithm="brute").fit(x[train], y[train])
        accs.append(float((knn.predict(x[test]) == y[test]).mean()))
    return float(np.mean(accs))


def test_eval_stage_scores_every_model_on_every_task(tmp_path, tiny_bert, beir_tiny, labelled, ray_session):
    from speed_ray.eval import driver as evaluate
    from speed_ray.io.schemas import read_manifest

    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=ev",
            f"embed.model={tiny_bert}",
            f"eval.models=[base, tfidf, bm25, tiny={tiny_bert}]",
            f"eval.retrieval.path={beir_tiny}",
            f"eval.knn.path={labelled}",
            f"eval.clustering.path={labelled}",
            "eval.layers=true",
            "eval.batch_size=16",
        ],
    )
    evaluate.run(cfg)
    out = cfg.run_dir / "eval"
    m = read_manifest(out)
    tasks = {"DebianPackageRetrieval", "SectionsKNN", "SectionsClustering"}
    assert m["tasks"] == {
        "DebianPackageRetrieval": "retrieval",
        "SectionsKNN": "knn",
        "SectionsClustering": "clustering",
    }
    for label in ("base", "tfidf", "tiny"):
        assert set(m["scores"][label]) == tasks
    # every model was scored in a Ray task (eval.resources: one CPU here), none in this process
    assert set(m["scored_on"]) == {"base", "tfidf", "bm25", "tiny"}
    assert {w["device"] for w in m["scored_on"].values()} == {"cpu"}
    assert os.getpid() not in {w["pid"] for w in m["scored_on"].values()}
    assert set(m["scores"]["bm25"]) == {"DebianPackageRetrieval"}  # BM25 only retrieves

    # mteb's own layout; a SentenceTransformer's revision is its content hash
    revisions = [p.name for p in (out / "results/speed-ray__tiny").iterdir() if p.is_dir()]
    assert len(revisions) == 1 and len(revisions[0]) == 12
    for task in tasks:
        saved = json.loads((out / f"results/speed-ray__tiny/{revisions[0]}/{task}.json").read_text())
        assert saved["task_name"] == task
    # the same weights under two labels: one revision, the same scores
    assert m["scores"]["tiny"]["SectionsKNN"]["accuracy"] == m["scores"]["base"]["SectionsKNN"]["accuracy"]
    assert (out / f"results/speed-ray__base/{revisions[0]}").is_dir()
    assert (out / "results/mteb__baseline-bm25s").is_dir()

    # TF-IDF kNN follows the protocol exactly: scikit-learn alone gives the same accuracy
    assert m["scores"]["tfidf"]["SectionsKNN"]["accuracy"] == pytest.approx(_tfidf_knn_by_hand(labelled, 42))
    # words decide these tasks well: TF-IDF beats chance on sections (3: 1/3) and BM25 retrieves
    assert m["scores"]["tfidf"]["SectionsKNN"]["accuracy"] > 0.5
    assert m["scores"]["bm25"]["DebianPackageRetrieval"]["ndcg_at_10"] > 0.8

    # standard errors: over queries for retrieval, sqrt(p(1-p)/n) over every row for kNN accuracy;
    # the paired differences from base are over the same queries and rows
    bm25 = m["scores"]["bm25"]["DebianPackageRetrieval"]
    per_query = bm25["per_item"]["ndcg_at_10"]
    assert sum(per_query.values()) / len(per_query) == pytest.approx(bm25["ndcg_at_10"], abs=1e-5)
    assert bm25["ndcg_at_10_se"] == pytest.approx(se_mean(list(per_query.values())))
    assert bm25["recall_at_10_se"] is not None
    knn = m["scores"]["tfidf"]["SectionsKNN"]
    rows = knn["per_item"]["accuracy"]
    assert len(rows) == len(labelled.read_text().splitlines())  # 5-fold: every row scored once
    assert knn["accuracy_se"] == pytest.approx(se_proportion(knn["accuracy"], len(rows)))
    base_rows = m["scores"]["base"]["SectionsKNN"]["per_item"]["accuracy"]
    assert m["differences"]["tfidf"]["SectionsKNN"] == pytest.approx(paired_difference(rows, base_rows))
    assert "accuracy_se" not in m["scores"]["base"]["SectionsClustering"]
    assert "base" not in m["differences"] and set(m["differences"]["bm25"]) == {"DebianPackageRetrieval"}

    # layers: token embeddings + 2 blocks for the tiny BERT; the last layer is the model itself
    base_layers = m["layers"]["base"]
    assert list(base_layers) == ["0", "1", "2"]
    assert base_layers["2"] == pytest.approx(m["scores"]["base"]["SectionsKNN"]["accuracy"], abs=0.02)
    assert m["layers"]["tiny"] == base_layers
    assert (out / "layers.png").stat().st_size > 10_000

    # speed-ray report RUN_DIR: tables per task, the layer table and the plots
    from speed_ray.cli import main
    from speed_ray.config import save_config

    save_config(cfg, cfg.run_dir / "config.yaml")
    assert main(["report", str(cfg.run_dir)]) == 0
    report = (cfg.run_dir / "report.md").read_text()
    diff = m["differences"]["tfidf"]["SectionsKNN"]
    assert "## Evaluation: SectionsKNN (knn, mteb)" in report
    assert (
        f"| tfidf | {knn['accuracy']:.4f} ± {knn['accuracy_se']:.4f} | {knn['f1']:.4f} | "
        f"{diff['difference']:+.4f} ± {diff['se']:.4f} |"
    ) in report
    assert (
        "| 2 | " + f"{base_layers['2']:.4f} | " in report and "![layer analysis](eval/layers.png)" in report
    )
    assert "![scores](eval.png)" in report and (cfg.run_dir / "eval.png").stat().st_size > 10_000
    page = (cfg.run_dir / "report.html").read_text()  # the same report as a page for a browser
    assert '<img src="eval/layers.png" alt="layer analysis" />' in page and page.count("<table>") >= 3


def test_the_embeddings_cache_answers_a_second_run_without_the_model(tmp_path, tiny_bert, beir_tiny):
    from speed_ray.embed.model import build_model
    from speed_ray.eval.tasks import as_mteb_model, evaluate, model_key, retrieval_task

    model = build_model(tiny_bert, "mean", 64)
    first = evaluate(
        as_mteb_model(model, "tiny", tmp_path / "cache"), retrieval_task("T", beir_tiny), tmp_path, 8
    )
    key = model_key(model)

    def refuse(*args, **kwargs):
        raise AssertionError("the model ran although every text was cached")

    model[0].forward = refuse
    again = evaluate(
        as_mteb_model(model, "tiny", tmp_path / "cache"), retrieval_task("T", beir_tiny), tmp_path, 8
    )
    assert again["ndcg_at_10"] == first["ndcg_at_10"]
    assert model_key(model) == key

    # other weights, another key: nothing is reused
    other = build_model(tiny_bert, "cls", 64)
    assert model_key(other) != key


def test_models_keep_their_saved_prompts_and_others_get_the_configured_one(tmp_path, tiny_llama):
    from speed_ray.embed.model import build_model
    from speed_ray.eval.models import load_model, parse_model
    from speed_ray.io.schemas import query_prefix

    saved = build_model(tiny_llama, "lasttoken", 32)
    saved.prompts = {"query": query_prefix("Find the package"), "document": ""}
    saved.save(str(tmp_path / "st"))
    cfg = load_config(
        None, [f"embed.model={tiny_llama}", "embed.pooling=lasttoken", "eval.max_seq_length=48"]
    )
    model = load_model(str(tmp_path / "st"), cfg)
    assert model.prompts["query"] == "Instruct: Find the package\nQuery: " and model.max_seq_length == 48
    base = load_model("base", cfg)  # a plain decoder: the configured instruction, E5's format
    assert base.prompts["query"] == query_prefix(cfg.eval.retrieval.query_instruction)
    plain = load_model(tiny_llama, cfg)  # a folder without modules.json: pooled as embed.pooling says
    assert plain.prompts == base.prompts
    assert parse_model("mine=/a/b/model") == ("mine", "/a/b/model")
    assert parse_model("/a/b/model/") == ("model", "/a/b/model/")


def test_eval_scores_only_what_changed_per_model_and_task(
    tmp_path, tiny_bert, beir_tiny, caplog, ray_session
):
    """Adding a model scores that model alone; a retrained model is scored again, the base is not;
    a model dropped from eval.models takes its results with it."""
    caplog.set_level(logging.INFO, logger="speed_ray")
    from speed_ray.embed.model import build_model
    from speed_ray.eval import driver as evaluate
    from speed_ray.io.schemas import read_manifest, write_json_atomic

    loaded: list[str] = []  # the models scored (so loaded, on a worker), in order

    def run(models: str) -> dict:
        args = [f"run.output_dir={tmp_path}", "run.name=ev", f"embed.model={tiny_bert}"]
        args += [f"eval.models={models}", f"eval.retrieval.path={beir_tiny}", "eval.batch_size=16"]
        before = read_manifest(tmp_path / "ev/eval")
        m = evaluate.run(load_config(None, args))
        if m != before:  # not skipped whole
            loaded.extend(m["models"][label] for label in m["scored_on"])
        return m

    def result(label: str) -> Path:
        (path,) = (tmp_path / "ev/eval/results" / f"speed-ray__{label}").glob("*/DebianPackageRetrieval.json")
        return path

    def train(pooling: str, steps: int) -> None:  # stands in for the embed step
        model = tmp_path / "ev/embed/model"
        build_model(tiny_bert, pooling, 64).save(str(model))
        write_json_atomic(model / "_manifest.json", {"steps": steps, "pooling": pooling})

    first = run("[base]")
    base_result, base_stamp = result("base"), result("base").stat().st_mtime_ns
    assert loaded == ["base"]

    both = run(f"[base, tiny={tiny_bert}]")  # a model added: that model alone is loaded and scored
    assert loaded == ["base", tiny_bert]
    assert result("base").stat().st_mtime_ns == base_stamp
    assert both["scores"]["base"] == first["scores"]["base"] and set(both["scores"]) == {"base", "tiny"}
    assert "eval: base: DebianPackageRetrieval: unchanged since it was scored, kept" in caplog.text
    run(f"[base, tiny={tiny_bert}]")
    assert len(loaded) == 2 and "eval: already finished, skipped" in caplog.text

    train("mean", 1)
    run("[base, trained]")
    old_trained = result("trained")
    assert loaded[2:] == ["trained"]
    assert not (tmp_path / "ev/eval/results/speed-ray__tiny").exists()  # dropped from eval.models
    assert set(read_manifest(tmp_path / "ev/eval")["scores"]) == {"base", "trained"}

    train("cls", 2)  # retrained: other weights, another manifest
    caplog.clear()
    m = run("[base, trained]")
    err = caplog.text
    assert loaded[3:] == ["trained"] and result("base") == base_result
    assert result("base").stat().st_mtime_ns == base_stamp
    assert "eval: trained: DebianPackageRetrieval: stale: input embed " in err and "scoring it again" in err
    assert result("trained") != old_trained and not old_trained.exists()  # the stale result is gone
    assert m["scores"]["base"] == first["scores"]["base"]
