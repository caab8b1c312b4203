"""Standard errors and paired differences of eval scores, and the tables that show them, against
values worked out by hand."""

from __future__ import annotations

import math

import pytest

from speed_ray.eval.experiments import differences, score_table
from speed_ray.eval.report_eval import eval_lines
from speed_ray.eval.stats import paired_difference, se_mean, se_proportion, signed_with_se, with_se


def test_standard_error_of_a_mean_and_of_a_proportion():
    # [1, 2, 3, 4]: mean 2.5, squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, / (n - 1) = 5/3;
    # stdev sqrt(5/3) = 1.2910, / sqrt(4) = 0.6455
    assert se_mean([1.0, 2.0, 3.0, 4.0]) == pytest.approx(math.sqrt(5 / 3) / 2)
    assert se_mean([0.7]) is None and se_mean([]) is None
    # 3 of 4 right: sqrt(0.75 * 0.25 / 4) = 0.2165
    assert se_proportion(0.75, 4) == pytest.approx(0.21650635)
    assert se_proportion(0.5, 0) is None


def test_paired_difference_uses_the_items_both_models_scored():
    # common queries q1..q3: differences 0.1, 0.0, 0.3; mean 0.4/3 = 0.1333; squared deviations
    # (1/30)^2 + (4/30)^2 + (5/30)^2 = 42/900, / 2 = 7/300; se sqrt(7/300) / sqrt(3) = 0.0882
    model = {"q1": 0.5, "q2": 0.8, "q3": 1.0}
    base = {"q1": 0.4, "q2": 0.8, "q3": 0.7, "q4": 0.1}
    d = paired_difference(model, base)
    assert d["n"] == 3
    assert d["difference"] == pytest.approx(0.4 / 3)
    assert d["se"] == pytest.approx(math.sqrt(7 / 300) / math.sqrt(3))
    assert paired_difference({"a": 1.0}, {"b": 1.0}) == {"difference": None, "se": None, "n": 0}


def test_cells_show_the_standard_error_beside_the_score():
    assert with_se(0.65432, 0.0123) == "0.6543 ± 0.0123"
    assert with_se(0.65432, None, 100, 1) == "65.4"
    assert signed_with_se(0.031, 0.008, 100, 1) == "+3.1 ± 0.8"
    assert signed_with_se(-0.031, None, 100, 1) == "-3.1"


def _ev() -> dict:
    """base and a trained model on two queries and four kNN rows, a clustering task without se."""

    def retrieval(q1: float, q2: float) -> dict:
        per_query = {"q1": q1, "q2": q2}
        # the se of a mean of two values is |a - b| / 2
        return {
            "ndcg_at_10": (q1 + q2) / 2,
            "ndcg_at_10_se": abs(q1 - q2) / 2,
            "recall_at_10": 1.0,
            "recall_at_10_se": 0.0,
            "per_item": {"ndcg_at_10": per_query},
            "seconds": 1.0,
        }

    def knn(right: list[float]) -> dict:
        p = sum(right) / 4
        per_row = dict(zip("abcd", right, strict=True))
        return {
            "accuracy": p,
            "accuracy_se": se_proportion(p, 4),
            "f1": p,
            "per_item": {"accuracy": per_row},
            "seconds": 2.0,
        }

    return {
        "tasks": {"R": "retrieval", "K": "knn", "C": "clustering"},
        "scores": {
            "base": {
                "R": retrieval(0.4, 0.6),
                "K": knn([1, 0, 0, 1]),
                "C": {"v_measure": 0.30, "seconds": 3.0},
            },
            "trained": {
                "R": retrieval(0.6, 0.9),
                "K": knn([1, 1, 0, 1]),
                "C": {"v_measure": 0.35, "seconds": 3.0},
            },
        },
    }


def test_experiment_table_has_scores_with_se_and_the_paired_difference_from_base():
    # R: base 0.5 ± 0.1 (|0.4 - 0.6| / 2), trained 0.75 ± 0.15 (|0.6 - 0.9| / 2); differences from
    # base 0.2, 0.3: mean 0.25, se 0.05 (|0.2 - 0.3| / 2).
    # K: 0.75 ± sqrt(0.75 * 0.25 / 4) = 0.2165; differences 0, 1, 0, 0: mean 0.25, stdev 0.5, se 0.25.
    # C: no per-item scores: the difference of the scores alone, 0.05.
    ev = _ev()
    lines = score_table(ev)
    assert lines[0] == (
        "| model | R nDCG@10 | K kNN accuracy | C V-measure | R: vs base | K: vs base | C: vs base |"
    )
    assert lines[2] == "| base | 50.0 ± 10.0 | 50.0 ± 25.0 | 30.0 |  |  |  |"
    assert lines[3] == "| trained | 75.0 ± 15.0 | 75.0 ± 21.7 | 35.0 | +25.0 ± 5.0 | +25.0 ± 25.0 | +5.0 |"
    d = differences(ev)
    assert set(d) == {"trained"}
    assert d["trained"]["R"] == pytest.approx({"difference": 0.25, "se": 0.05, "n": 2})
    assert d["trained"]["C"] == pytest.approx({"difference": 0.05, "se": None, "n": None})


def test_run_report_table_shows_se_and_the_difference_from_base():
    lines = eval_lines(_ev())
    start = lines.index("## Evaluation: R (retrieval, mteb)")
    assert lines[start + 2] == "| model | nDCG@10 | recall@10 | nDCG@10 vs base | seconds |"
    assert lines[start + 5] == "| trained | 0.7500 ± 0.1500 | 1.0000 ± 0.0000 | +0.2500 ± 0.0500 | 1.0 |"
    knn = lines.index("## Evaluation: K (knn, mteb)")
    assert lines[knn + 4].startswith("| base | 0.5000 ± 0.2500 | 0.5000 |  |")  # macro-F1: no se
