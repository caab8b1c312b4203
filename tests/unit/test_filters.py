"""The quality filters and hard-negative mining on hand-made rows: which rows are kept, the counts by
reason, and the negatives chosen from hand-computed scores."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from speed_ray.io.schemas import EXAMPLES, NEIGHBOURS, cast_rows, triplets_schema
from speed_ray.synth import speed
from speed_ray.synth.filters import filtered_shard, placeholder
from speed_ray.synth.mining import documents_corpus, hard_negatives, rank_corpus, row_corpus


def ex(i, query, positive, negative=None, task_type="retrieval", instruction=None):
    return {
        "id": f"e{i}",
        "instruction": instruction,
        "query": query,
        "positive": positive,
        "negative": negative,
        "task_type": task_type,
    }


@pytest.mark.parametrize(
    "text",
    [
        "S1",
        "query",
        "a task",
        "the document",
        "<query>",
        "{document}",
        "N/A",
        "string",
        "hard_negative_document",
        " ",
    ],
)
def test_placeholders_are_found(text):
    assert placeholder(text)


@pytest.mark.parametrize("text", ["postgresql extension whitelist", "nginx modules", "query 12", "S100"])
def test_real_values_are_not_placeholders(text):
    assert not placeholder(text)


def test_sentiment_labels_are_values_in_classification_only():
    assert placeholder("positive") and not placeholder("positive", label=True)
    assert placeholder("S1", label=True)


def test_each_rule_filter_is_counted_by_reason():
    rows = [
        ex(0, "postgresql extension whitelist", "Lets users install trusted extensions.", "Compiles C code."),
        ex(1, "S1", "A real document."),  # query placeholder
        ex(2, "how do I rotate logs", "the document"),  # positive placeholder
        ex(3, "What is a Cat", " what is a  cat "),  # positive = query, case and blanks aside
        ex(4, "vim", "A text editor."),  # one word
        ex(5, "a b", "Two tiny words."),  # two words but 3 characters
        ex(
            6, "nginx modules", "Dynamic modules for nginx.", "dynamic modules for NGINX."
        ),  # negative = positive
        ex(7, "tune swap usage", "Set vm.swappiness.", "<negative>"),  # negative placeholder
        ex(8, "i am happy today", "positive", "negative", task_type="classification"),  # labels: kept
        ex(9, "find tea shops", "Tea here.", "find tea shops"),  # negative = query
    ]
    table, counts = filtered_shard(cast_rows(rows, EXAMPLES))
    kept = table.to_pylist()
    assert [r["id"] for r in kept] == ["e0", "e6", "e7", "e8", "e9"]
    assert {r["id"]: r["negative"] for r in kept} == {
        "e0": "Compiles C code.",
        "e6": None,
        "e7": None,
        "e8": "negative",
        "e9": None,
    }
    assert counts["rows_in"] == 10
    assert counts["dropped"] == {
        "query placeholder": 1,
        "positive placeholder": 1,
        "positive = query": 1,
        "query too short": 2,
    }
    assert counts["negatives_dropped"] == {
        "negative = positive": 1,
        "negative placeholder": 1,
        "negative = query": 1,
    }
    assert counts["negatives_per_row"] == {"1": 2, "0": 3}
    assert counts["samples"]["query too short"] == [
        {"id": "e4", "query": "vim", "positive": "A text editor.", "negative": ""},
        {"id": "e5", "query": "a b", "positive": "Two tiny words.", "negative": ""},
    ]
    # disabled: every row kept as it is
    table, counts = filtered_shard(cast_rows(rows, EXAMPLES), enabled=False)
    assert table.num_rows == 10 and counts["dropped"] == {} and table["negative"][6].as_py()


def neighbours(rows):
    return cast_rows(rows, NEIGHBOURS)


def test_round_trip_drops_rows_whose_positive_ranks_below_k():
    rows = [ex(0, "rotate log files", "logrotate."), ex(1, "show disk usage", "df."), ex(2, "S2", "x")]
    near = neighbours(
        [
            {"id": "e0", "positive_score": 0.9, "rank": 1, "candidates": [], "scores": []},
            {"id": "e1", "positive_score": 0.4, "rank": 3, "candidates": [], "scores": []},
            {"id": "e2", "positive_score": 0.1, "rank": 9, "candidates": [], "scores": []},
        ]
    )
    table, counts = filtered_shard(cast_rows(rows, EXAMPLES), near, round_trip_k=2)
    assert table["id"].to_pylist() == ["e0"] and table["rank"].to_pylist() == [1]
    # e2 fails a rule first: one reason per row, the first in order
    assert counts["dropped"] == {"round trip": 1, "query placeholder": 1}
    table, counts = filtered_shard(cast_rows(rows, EXAMPLES), near, round_trip_k=3)
    assert table["id"].to_pylist() == ["e0", "e1"]


def test_hard_negatives_skip_the_positive_equal_texts_and_false_negatives():
    """Positive score 0.80, max_ratio 0.95: the ceiling is 0.76. Sorted by score: 0.90 the positive
    itself (skipped), 0.78 above the ceiling (a likely false negative, skipped), 0.75 "Find Tea
    Shops" the query in other case (skipped), 0.70 kept, 0.70 the same text again (skipped), 0.60
    kept, 0.50 not reached (n = 2)."""
    candidates = ["c050", "pos", "c078", "c060", "find  tea shops", "c070", "C070"]
    scores = [0.50, 0.90, 0.78, 0.60, 0.75, 0.70, 0.70]
    got = hard_negatives("Find Tea Shops", "pos", 0.80, candidates, scores, 2, 0.95)
    assert got == ["c070", "c060"]
    # another query: the 0.75 text is a candidate now; the row's own negative "c060" is skipped
    got = hard_negatives("q", "pos", 0.80, candidates, scores, 5, 0.95, exclude=["c060"])
    assert got == ["find  tea shops", "c070", "c050"]
    # max_ratio 1.0: only candidates above the positive itself are guarded
    assert hard_negatives("Find Tea Shops", "pos", 0.80, candidates, scores, 2, 1.0) == ["c078", "c070"]


def test_rank_corpus_is_exact_blockwise_and_keeps_groups_apart():
    """2-d unit vectors at angles: q = (1, 0); corpus rows at 0, 30, 60, 90 degrees (cosines 1, .866,
    .5, 0) and a row at 10 degrees in another group. The positive is row 2 (cos .5): two rows of its
    group score higher, rank 3."""
    angles = np.radians([60, 0, 90, 30, 10])
    corpus = np.stack([np.cos(angles), np.sin(angles)], 1).astype(np.float32)
    groups = ["a", "a", "a", "a", "b"]
    q = np.array([[1.0, 0.0]], dtype=np.float32)
    for block in (1, 2, 16):
        idx, scores, pos, ranks = rank_corpus(q, corpus, ["a"], groups, [0], k=3, block=block)
        assert idx.tolist() == [[1, 3, 0]]
        np.testing.assert_allclose(scores, [[1.0, np.cos(np.radians(30)), 0.5]], atol=1e-6)
        assert pos.tolist() == pytest.approx([0.5]) and ranks.tolist() == [3]
    idx, scores, _, _ = rank_corpus(q, corpus, ["b"], groups, [4], k=3)  # one row in group b: padded
    assert idx.tolist() == [[4, -1, -1]] and np.isinf(scores[0, 1:]).all()


def test_corpora_are_distinct_texts_in_order():
    t = cast_rows(
        [ex(0, "q", "p1", "n1"), ex(1, "q", "p1", None), ex(2, "q", "p1", "n1", task_type="sts")], EXAMPLES
    )
    assert row_corpus([t]) == [("retrieval", "p1"), ("retrieval", "n1"), ("sts", "p1"), ("sts", "n1")]
    docs = pa.table({"id": ["a", "b", "c"], "text": ["x", "y", "x"]})
    assert documents_corpus([docs]) == [("", "x"), ("", "y")]


def test_mined_negatives_go_to_numbered_columns_after_the_rows_own():
    rows = [ex(0, "rotate log files", "logrotate", "cron"), ex(1, "show disk usage", "df", None)]
    near = neighbours(
        [
            {
                "id": "e0",
                "positive_score": 0.8,
                "rank": 1,
                "candidates": ["logrotate", "cron", "du", "ls"],
                "scores": [0.8, 0.5, 0.4, 0.3],
            },
            {
                "id": "e1",
                "positive_score": 0.8,
                "rank": 1,
                "candidates": ["du", "df", "ls"],
                "scores": [0.79, 0.7, 0.2],
            },
        ]
    )
    table, counts = filtered_shard(cast_rows(rows, EXAMPLES), near, negatives=2)
    # e0: its own "cron" kept first, then the two best others; e1: "du" (0.79 > 0.76) is a likely
    # false negative, "df" the positive, so "ls" alone
    assert table["mined_negatives"].to_pylist() == [["du", "ls"], ["ls"]]
    assert counts["mined"] == 3 and counts["negatives_per_row"] == {"3": 1, "1": 1}
    train = speed.training_triplets(table, 3)
    assert train.schema == triplets_schema(3)
    assert train.to_pylist() == [
        {
            "anchor": "rotate log files",
            "positive": "logrotate",
            "negative_1": "cron",
            "negative_2": "du",
            "negative_3": "ls",
        },
        {
            "anchor": "show disk usage",
            "positive": "df",
            "negative_1": "ls",
            "negative_2": "",
            "negative_3": "",
        },
    ]
    assert speed.training_triplets(table, 1)["negative"].to_pylist() == ["cron", "ls"]


def test_the_report_tables_the_drops_by_reason():
    from speed_ray.eval.report_synth import filter_lines

    filtered = {
        "num_rows": 6,
        "rows_in": 10,
        "dropped": {"query placeholder": 3, "round trip": 1},
        "negatives_dropped": {"negative = positive": 2},
        "samples": {"query placeholder": [{"query": "S1", "positive": "a|b", "negative": ""}]},
        "mined": 12,
        "negatives_per_row": {"2": 6},
    }
    lines = filter_lines(filtered, {"model": "all-minilm-l6-v2", "pooling": "mean", "corpus": 10})
    assert "Quality filters: kept 6 of 10 rows." in lines
    assert "| query placeholder | row | 3 | `S1` / `a\\|b` / - |" in lines
    assert "| negative = positive | negative | 2 |  |" in lines
    assert lines[-1].endswith('12 hard negatives mined; rows by number of negatives: {"2": 6}')
