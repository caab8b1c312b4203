"""Experiments: variant and eval configs, shared runs, the tables' arithmetic."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from speed_ray.config import load_config
from speed_ray.eval.experiment import configs
from speed_ray.eval.experiments import (
    gain_share,
    override_args,
    score_table,
    series_points,
    snapshot_models,
    training_table,
    variant_models,
)
from speed_ray.io.settings import ConfigError

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "configs" / "experiments"


def _configs(name: str, overrides: list[str] | None = None):
    path = str(EXPERIMENTS / name)
    return configs(load_config(path, overrides), path, overrides or [])


def test_experiments_share_the_runs_they_name_alike():
    _, a_variants, a_evals = _configs("a-crops-vs-dropout.yaml")
    _, b_variants, _ = _configs("b-last-blocks.yaml")
    _, d_variants, d_evals = _configs("d-curves.yaml")
    # the same run, the same config: trained once, whichever experiment runs first
    assert a_variants["crops"] == b_variants["crops"] == d_variants["crops"]
    assert a_variants["dropout"] == d_variants["dropout"]
    assert a_variants["crops"].run_dir.name == "exp-smollm-crops"
    assert a_variants["dropout"].embed.data.pair_mode == "dropout"
    assert b_variants["last-2"].embed.train_last_blocks == 2
    assert a_variants["crops-train"].embed.data.holdout_fraction == a_evals["heldout"].eval.knn.test_fraction
    # variant names in eval.models become their trained models
    models = a_evals["main"].eval.models
    assert "crops=" + str(a_variants["crops"].run_dir / "embed" / "model") in models
    assert a_evals["heldout"].eval.knn.split == "holdout" and a_evals["heldout"].eval.retrieval.path is None
    assert a_evals["main"].run_dir.name == "exp-a" and a_evals["heldout"].run_dir.name == "exp-a-heldout"
    assert d_evals == {}


def test_speed_experiment_aligns_once_and_trains_on_each_set_at_two_sizes():
    prepare, variants, evals = _configs("c-speed-small.yaml")
    assert {name: stages for name, (_, stages) in prepare.items()} == {
        "align": ["align", "report"],
        "junior": ["synth", "report"],
        "senior": ["synth", "report"],
        "senior-revisor": ["synth", "report"],
    }
    runs = {name: c for name, (c, _) in prepare.items()}
    assert runs["align"].run_dir.name == "exp-c-align"
    # every set is generated from the align run's models, with the same tasks (brainstormer, seed)
    for name, model in (("junior", "junior"), ("senior", "senior"), ("senior-revisor", "senior")):
        assert runs[name].synth.engine.model == f"run:../exp-c-align/align/{model}"
        assert runs[name].synth.brainstormer == runs["junior"].synth.brainstormer
    assert runs["senior"].synth.reviser is None
    assert runs["senior-revisor"].synth.reviser.model == "run:../exp-c-align/align/revisor"
    # same budget for every variant; the small sizes are samples of the same sets
    assert {v.embed.steps * v.embed.batch_size * v.embed.resources.workers for v in variants.values()} == {
        640
    }
    for name, v in variants.items():
        source = name.rsplit("-", 1)[0]
        assert v.embed.data.source == "synth" and v.embed.data.path == str(runs[source].run_dir)
        assert v.embed.data.max_rows == (16 if name.endswith("-16") else 0)
    assert evals["main"].eval.models[0] == "base" and len(evals["main"].eval.models) == 7


def test_filtered_speed_experiment_reuses_cs_sets_and_filters_copies_of_them():
    c_prepare, c_variants, _ = _configs("c-speed-small.yaml")
    prepare, variants, evals = _configs("c-filtered.yaml")
    runs = {name: c for name, (c, _) in prepare.items()}
    # C's align run and unfiltered sets, and its trained models, are the same runs: made once
    for name in ("align", "junior", "senior", "senior-revisor"):
        assert prepare[name] == c_prepare[name]
        assert not runs[name].synth.filters.enabled
    for name in ("junior", "senior", "senior-revisor"):
        assert variants[name] == c_variants[f"{name}-all"]
        assert variants[f"{name}-16"] == c_variants[f"{name}-16"]
        # the filtered copies read the unfiltered set's training rows and filter them, no generation
        for copy, k in (("rules", 0), ("roundtrip", 1)):
            f = runs[f"{name}-{copy}"]
            assert f.synth.source == "pairs" and f.synth.pairs == str(runs[name].run_dir / "synth" / "train")
            assert f.synth.filters.enabled and f.synth.filters.round_trip_k == k
        # trained on the rule-filtered rows with the same settings as on the unfiltered ones
        rules = variants[f"{name}-rules"]
        assert rules.embed.data.path == str(runs[f"{name}-rules"].run_dir)
        assert rules.embed == replace(variants[name].embed, data=rules.embed.data)
    assert not [v for v in variants if v.endswith("-roundtrip")]  # under one batch: counted, not trained on
    models = evals["main"].eval.models
    assert models[0] == "base" and models[-1] == "bm25"
    assert [m.split("=")[0] for m in models[1:-1]] == list(variants)


def test_series_are_scores_against_training_rows():
    ev = {
        "tasks": {"R": "retrieval"},
        "scores": {"a-16": {"R": {"ndcg_at_10": 0.5}}, "a-all": {"R": {"ndcg_at_10": 0.625}}},
    }
    points = series_points({"a": ["a-all", "a-16"]}, ev, {"a-16": 16, "a-all": 57})
    assert points == {"a": {"R": [(16, 0.5), (57, 0.625)]}}
    ev["scores"]["base"] = {"R": {"ndcg_at_10": 0.75}}  # the untrained model is the point at 0 rows
    assert series_points({"a": ["a-16"]}, ev, {"a-16": 16}) == {"a": {"R": [(0, 0.75), (16, 0.5)]}}


def test_bad_variants_are_named_before_anything_runs(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text("experiment:\n  variants:\n    odd: {embed.nope: 1}\n")
    with pytest.raises(ConfigError, match=r"experiment.variants.odd: embed.nope: unknown key"):
        configs(load_config(str(path)), str(path), [])
    path.write_text("experiment:\n  variants:\n    v: {}\n  curves: [v]\n")
    with pytest.raises(ConfigError, match=r"variant v needs embed.snapshot_steps > 0"):
        configs(load_config(str(path)), str(path), [])
    path.write_text("experiment:\n  prepare:\n    p: {synth.num_topics: 2}\n  variants:\n    v: {}\n")
    with pytest.raises(
        ConfigError, match=r"experiment.prepare.p.stages: expected a list of stages from align"
    ):
        configs(load_config(str(path)), str(path), [])
    path.write_text("experiment:\n  prepare:\n    p: {stages: [train]}\n  variants:\n    v: {}\n")
    with pytest.raises(ConfigError, match=r"experiment.prepare.p.stages: .* got \['train'\]"):
        configs(load_config(str(path)), str(path), [])
    path.write_text("experiment:\n  variants:\n    v: {}\n  series:\n    s: [v, w]\n")
    with pytest.raises(ConfigError, match=r"experiment.series.s: expected variants scored by the main eval"):
        configs(load_config(str(path)), str(path), [])
    path.write_text("experiment: {evals: {}}\n")
    with pytest.raises(ConfigError, match="expected variants to train or evals with eval.models"):
        configs(load_config(str(path)), str(path), [])


def test_override_args_and_model_entries(tmp_path):
    assert override_args({"embed.steps": 3, "eval.retrieval.path": None, "eval.models": ["a", "b"]}) == [
        "embed.steps=3",
        "eval.retrieval.path=null",
        'eval.models=["a", "b"]',
    ]
    assert variant_models(["base", "v", "tfidf"], {"v": Path("/r/v")}) == [
        "base",
        "v=/r/v/embed/model",
        "tfidf",
    ]
    for step in (10, 5):
        (tmp_path / "embed" / "snapshots" / f"step_{step:05d}").mkdir(parents=True)
    (tmp_path / "embed" / "snapshots" / "step_00015.tmp").mkdir()  # an interrupted export: ignored
    assert snapshot_models("c", tmp_path, 20) == [
        (5, f"c@5={tmp_path}/embed/snapshots/step_00005"),
        (10, f"c@10={tmp_path}/embed/snapshots/step_00010"),
        (20, f"c@20={tmp_path}/embed/model"),
    ]


def test_gain_share_and_score_table():
    assert gain_share(0.40, 0.55, 0.60) == pytest.approx(0.75)
    assert gain_share(0.40, 0.40, 0.40) is None
    # the reference loses: no share (0.35 would otherwise read as "200% of the gain")
    assert gain_share(0.40, 0.30, 0.35) is None
    ev = {
        "tasks": {"K": "knn", "R": "retrieval"},
        "scores": {
            "base": {"K": {"accuracy": 0.40}, "R": {"ndcg_at_10": 0.50}},
            "last-2": {"K": {"accuracy": 0.55}, "R": {"ndcg_at_10": 0.60}},
            "all": {"K": {"accuracy": 0.60}, "R": {"ndcg_at_10": 0.70}},
        },
    }
    lines = score_table(ev, reference="all")
    # scores without standard errors or per-item scores (an older manifest): the scores alone, and
    # the difference from base without its standard error
    assert lines[0] == (
        "| model | K kNN accuracy | R nDCG@10 | K: vs base | R: vs base | K: share of all's gain "
        "| R: share of all's gain |"
    )
    assert lines[2:] == [
        "| base | 40.0 | 50.0 |  |  |  |  |",
        "| last-2 | 55.0 | 60.0 | +15.0 | +10.0 | 75% | 50% |",
        "| all | 60.0 | 70.0 | +20.0 | +20.0 |  |  |",
    ]


def test_training_table_reads_the_embed_manifest():
    m = {
        "history": [
            {"loss": 2.0, "seconds": 4.0},
            {"loss": 1.5, "seconds": 40.0},
            {"loss": 1.0, "seconds": 6.0},
        ],
        "data": {"source": "corpus", "pair_mode": "crops", "held_out": 7},
        "train_last_blocks": 2,
        "trainable_params": 1234,
        "steps": 2,
        "global_batch": 16,
        "duration_s": 30.4,
    }
    assert training_table({"v": m})[2] == (
        "| v | crops, last 2 blocks, 7 documents held out | 1,234 | 2 x 16 | 2.000 -> 1.000 | 30 | 6.0 |"
    )


def test_report_page_has_the_tables_and_plots_of_the_markdown(tmp_path):
    from speed_ray.eval.html import write_report

    md = "# C. <SPEED>\n\n| model | nDCG@10 |\n|---|---:|\n| base | 81.4 |\n\n![scaling](scaling.png)\n\n<script>x</script>\n"
    write_report(tmp_path / "report.md", md)
    assert (tmp_path / "report.md").read_text() == md
    page = (tmp_path / "report.html").read_text()
    assert "<title>C. &lt;SPEED&gt;</title>" in page
    assert '<th>model</th>\n<th style="text-align:right">nDCG@10</th>' in page
    assert '<td style="text-align:right">81.4</td>' in page
    assert '<img src="scaling.png" alt="scaling" />' in page
    assert "<script>" not in page and "&lt;script&gt;" in page  # model outputs are never live HTML
    assert not list(tmp_path.glob("*.tmp"))
