"""Pure synth logic: request rows, parsing batches, example selection, preference pairs."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from speed_ray import synthesis
from speed_ray.schemas import EXAMPLES, GENERATIONS, PREFERENCE_PAIRS, TASKS


def test_task_requests_are_stable_and_complete():
    topics = ["A/B", "C/D"]
    rows = synthesis.task_requests(
        topics, ["classification", "sts", "retrieval", "text_matching"], seed=1, max_chars=50
    )
    again = synthesis.task_requests(
        topics, ["classification", "sts", "retrieval", "text_matching"], seed=1, max_chars=50
    )
    assert rows == again
    assert len(rows) == 8 and len({r["id"] for r in rows}) == 8
    sts = [r for r in rows if r["kind"] == "sts"]
    assert [r["task"] for r in sts] == topics and all(r["messages"] == "" for r in sts)
    assert {r["kind"] for r in rows if r["task_type"] == "text_matching"} <= {
        "text_matching_short",
        "text_matching_long",
    }
    other = synthesis.task_requests(topics, ["retrieval"], seed=2, max_chars=50)
    assert other[0]["id"] != [r for r in rows if r["task_type"] == "retrieval"][0]["id"]


def test_load_topics(tmp_path):
    f = tmp_path / "topics.txt"
    f.write_text("# comment\nA/B/C/D/E/F\nX/Y\n\nX/Y\n")
    assert sorted(synthesis.load_topics([], str(f), 10, seed=0)) == ["A/B/E/F", "X/Y"]
    assert len(synthesis.load_topics(["a", "b", "c"], None, 2, seed=0)) == 2
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="no topics"):
        synthesis.load_topics([], str(f), 10, seed=0)


def _generated(rid, sample, kind, raw, task="Find docs"):
    return {
        "id": rid,
        "sample": sample,
        "topic": "T",
        "task_type": kind,
        "kind": kind,
        "task": task,
        "messages": json.dumps([{"role": "user", "content": "p"}]),
        "raw": raw,
        "generator": "g",
        "seed": 7,
        "json_schema": "{}",
        "num_input_tokens": 10,
        "num_output_tokens": 5,
    }


GOOD = '{"user_query": "how to bake bread", "positive_document": "Mix flour and water", "hard_negative_document": "Bread is old"}'
SOUP = '{"user_query": "x1", "positive_document": "@@##", "hard_negative_document": "$$"}'


def test_parse_generations_and_pick_examples():
    batch = pa.Table.from_pylist(
        [
            _generated("a", 0, "retrieval", "garbage"),
            _generated("a", 1, "retrieval", GOOD),
            _generated("b", 0, "retrieval", SOUP),
            _generated("b", 1, "retrieval", GOOD),
        ]
    )
    gens = synthesis.parse_generations(batch)
    assert gens.schema == GENERATIONS
    assert [e is None for e in gens["error"].to_pylist()] == [False, True, True, True]
    examples = synthesis.pick_examples(gens)
    assert examples.schema == EXAMPLES
    # first valid sample per prompt: a -> sample 1, b -> sample 0
    assert [(r["id"], r["query"]) for r in examples.to_pylist()] == [("a", "how to bake bread"), ("b", "x1")]


def test_quality_score_by_hand():
    row = {"error": None, "query": "ab", "positive": "a1", "negative": None}
    # fluency: letters/spaces in "aba1" = 3/4; +1 valid; +1 positive != query; +1 no negative
    assert synthesis.quality_score(row) == pytest.approx(1 + 0.75 + 1 + 1)
    assert synthesis.quality_score({"error": "bad", "query": None, "positive": None, "negative": None}) == 0.0


def test_preference_pairs_best_vs_worst_and_ties_dropped():
    batch = pa.Table.from_pylist(
        [
            _generated("a", 0, "retrieval", "garbage"),
            _generated("a", 1, "retrieval", GOOD),
            _generated("b", 0, "retrieval", GOOD),
            _generated("b", 1, "retrieval", GOOD),
        ]
    )
    pairs = synthesis.preference_pairs(synthesis.parse_generations(batch))
    assert pairs.schema == PREFERENCE_PAIRS
    # GOOD: valid (1) + all letters and spaces (1) + positive != query (1) + negative != positive (1) = 4
    assert pairs.to_pylist() == [
        {
            "id": "a",
            "messages": json.dumps([{"role": "user", "content": "p"}]),
            "chosen": GOOD,
            "rejected": "garbage",
            "reason": "rule score 4.000 > 0.000 (invalid JSON: 'garbage')",
        }
    ]


def test_parse_tasks_keeps_first_task():
    rows = [
        _generated("t", 0, "retrieval", '["Find papers on A.", "Find papers on B."]') | {"sample": 0},
        _generated("u", 0, "retrieval", "no list"),
    ]
    tasks = synthesis.parse_tasks(pa.Table.from_pylist(rows))
    assert tasks.schema == TASKS
    assert tasks["task"].to_pylist() == ["Find papers on A.", None]
    assert tasks["error"][1].as_py().startswith("invalid JSON")
    reqs = synthesis.example_requests(tasks.to_pylist(), seed=0, max_chars=40)
    assert len(reqs) == 1 and reqs[0]["task"] == "Find papers on A."
