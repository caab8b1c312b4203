"""Pure synth logic: request rows, parsing batches, example selection, preference pairs."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from speed_ray.io.schemas import EXAMPLES, GENERATIONS, JUDGMENTS, PREFERENCE_PAIRS, TASKS
from speed_ray.synth import speed

MIX = {"classification": 7, "sts": 7, "retrieval": 7, "text_matching": 2}


def test_mix_is_allocated_by_largest_remainder():
    topics = [f"T/{i}" for i in range(23)]
    pairs = speed.assign_task_types(topics, MIX, seed=0)
    counts = {t: sum(1 for _, x in pairs if x == t) for t in MIX}
    assert counts == {"classification": 7, "sts": 7, "retrieval": 7, "text_matching": 2}
    assert [t for t, _ in pairs] == topics  # topics keep their order; types are shuffled
    # 10 topics: quotas 3.04 x3 and 0.87 -> floors 3,3,3,0 and the one left goes to text_matching
    counts10 = [x for _, x in speed.assign_task_types(topics[:10], MIX, seed=0)]
    assert sorted(counts10).count("text_matching") == 1 and len(counts10) == 10
    assert speed.assign_task_types(topics, {"sts": 1, "retrieval": 0}, seed=0) == [(t, "sts") for t in topics]


def test_task_requests_are_stable_and_complete():
    topics = [f"A/B{i}" for i in range(23)]
    rows = speed.task_requests(topics, MIX, seed=1, max_chars=50)
    assert rows == speed.task_requests(topics, MIX, seed=1, max_chars=50)
    assert len(rows) == 23 and len({r["id"] for r in rows}) == 23
    assert sorted(r["topic"] for r in rows) == sorted(topics)  # one task per topic
    sts = [r for r in rows if r["kind"] == "sts"]
    assert len(sts) == 7 and all(r["task"] == r["topic"] and r["messages"] == "" for r in sts)
    assert {r["kind"] for r in rows if r["task_type"] == "text_matching"} <= {
        "text_matching_short",
        "text_matching_long",
    }
    other = speed.task_requests(topics, MIX, seed=2, max_chars=50)
    assert {r["id"] for r in other}.isdisjoint({r["id"] for r in rows})


def test_load_topics(tmp_path):
    f = tmp_path / "topics.txt"
    f.write_text("# comment\nA/B/C/D/E/F\nX/Y\n\nX/Y\n")
    assert sorted(speed.load_topics(str(f), [], 2, seed=0)) == ["A/B/E/F", "X/Y"]
    assert len(speed.load_topics(None, ["a", "b", "c"], 2, seed=0)) == 2
    with pytest.raises(ValueError, match="synth.num_topics: 3 asked for, but .* has 2 distinct topics"):
        speed.load_topics(str(f), [], 3, seed=0)
    assert len(speed.load_topics(None, [], 1000, seed=0)) == 1000  # the built-in taxonomy
    f.write_text("# nothing\n")
    with pytest.raises(ValueError, match="topics.txt"):
        speed.load_topics(str(f), [], 10, seed=0)


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


def test_parse_generations_and_pick_drafts():
    batch = pa.Table.from_pylist(
        [
            _generated("a", 0, "retrieval", "garbage"),
            _generated("a", 1, "retrieval", GOOD),
            _generated("b", 0, "retrieval", SOUP),
            _generated("b", 1, "retrieval", GOOD),
        ]
    )
    gens = speed.parse_generations(batch)
    assert gens.schema == GENERATIONS
    assert [e is None for e in gens["error"].to_pylist()] == [False, True, True, True]
    drafts = speed.pick_drafts(speed.group_samples(gens))
    assert drafts.schema == GENERATIONS
    # no judge: first valid sample per prompt: a -> sample 1, b -> sample 0
    assert [(r["id"], r["sample"]) for r in drafts.to_pylist()] == [("a", 1), ("b", 0)]
    examples = speed.final_rows(drafts, None)
    assert examples.schema == EXAMPLES
    assert [(r["id"], r["query"]) for r in examples.to_pylist()] == [("a", "how to bake bread"), ("b", "x1")]


def test_quality_score_by_hand():
    row = {"error": None, "query": "ab", "positive": "a1", "negative": None}
    # fluency: letters/spaces in "aba1" = 3/4; +1 valid; +1 positive != query; +1 no negative
    assert speed.quality_score(row) == pytest.approx(1 + 0.75 + 1 + 1)
    assert speed.quality_score({"error": "bad", "query": None, "positive": None, "negative": None}) == 0.0


def test_rule_scored_pairs_best_vs_worst_and_ties_dropped():
    batch = pa.Table.from_pylist(
        [
            _generated("a", 0, "retrieval", "garbage"),
            _generated("a", 1, "retrieval", GOOD),
            _generated("b", 0, "retrieval", GOOD),
            _generated("b", 1, "retrieval", GOOD),
        ]
    )
    pairs, dropped = speed.preference_pairs(speed.group_samples(speed.parse_generations(batch)))
    assert pairs.schema == PREFERENCE_PAIRS
    assert dropped == {"rule scores tie": 1}  # b: two equal samples
    # GOOD: valid (1) + all letters and spaces (1) + positive != query (1) + negative != positive (1) = 4
    # TRL's conversational preference format: the prompt's messages, one assistant message each side
    assert pairs.to_pylist() == [
        {
            "id": "a",
            "prompt": [{"role": "user", "content": "p"}],
            "chosen": [{"role": "assistant", "content": GOOD}],
            "rejected": [{"role": "assistant", "content": "garbage"}],
            "reason": "rule score 4.000 > 0.000 (invalid JSON: 'garbage')",
        }
    ]


def test_parse_tasks_keeps_first_task():
    rows = [
        _generated("t", 0, "retrieval", '["Find papers on A.", "Find papers on B."]') | {"sample": 0},
        _generated("u", 0, "retrieval", "no list"),
    ]
    tasks = speed.parse_tasks(pa.Table.from_pylist(rows))
    assert tasks.schema == TASKS
    assert tasks["task"].to_pylist() == ["Find papers on A.", None]
    assert tasks["error"][1].as_py().startswith("invalid JSON")
    reqs = list(speed.example_requests(tasks.to_pylist(), seed=0, max_chars=40))
    assert len(reqs) == 1 and reqs[0]["task"] == "Find papers on A."


def _judged(example_id, raw, samples=2, engine_error=None):
    return {
        "id": "j" + example_id,
        "example_id": example_id,
        "samples": samples,
        "raw": raw,
        "generator": "judge",
        "seed": 3,
        "num_input_tokens": 50,
        "num_output_tokens": 9,
        "engine_error": engine_error,
    }


def test_judge_requests_pairs_and_drafts():
    gens = speed.parse_generations(
        pa.Table.from_pylist(
            [
                _generated("a", 0, "retrieval", GOOD),
                _generated("a", 1, "retrieval", SOUP),
                _generated("b", 0, "retrieval", SOUP),
                _generated("b", 1, "retrieval", "garbage"),
                _generated("c", 0, "retrieval", GOOD),
            ]
        )
    )
    groups = speed.group_samples(gens)
    reqs = speed.judge_requests(groups, seed=0, max_chars=100)
    assert [r["example_id"] for r in reqs] == ["a", "b"]  # c has one sample: nothing to judge
    user = json.loads(reqs[0]["messages"])[-1]["content"]
    assert "### Prompt\np" in user and f"[0] {GOOD}" in user and f"[1] {SOUP}" in user
    assert json.loads(reqs[0]["json_schema"])["properties"]["best"] == {"type": "integer", "enum": [0, 1]}

    judgments = speed.parse_judgments(
        pa.Table.from_pylist(
            [
                _judged("a", '{"reason": "1 is noise", "best": 1, "worst": 0}'),
                _judged("b", '{"reason": "x", "best": 1, "worst": 1}'),
                _judged("c", "", samples=2, engine_error="http 503 after 5 attempts"),
            ]
        )
    )
    assert judgments.schema == JUDGMENTS
    assert judgments["error"].to_pylist() == [
        None,
        "best and worst are the same output (1)",
        "http 503 after 5 attempts",
    ]
    pairs, dropped = speed.preference_pairs(groups, judgments)
    assert dropped == {"rule scores tie": 1}  # c: one sample
    # a: the judge (against the rule score's choice); b: no usable verdict -> rule score; c: one sample
    texts = [
        (p["id"], p["chosen"][0]["content"], p["rejected"][0]["content"], p["reason"])
        for p in pairs.to_pylist()
    ]
    assert texts == [
        ("a", SOUP, GOOD, "judge: 1 is noise"),
        # SOUP: valid 1 + fluency 1/8 (only the x of "x1@@##$$") + 1 + 1
        ("b", SOUP, "garbage", "rule score 3.125 > 0.000 (invalid JSON: 'garbage')"),
    ]
    # without the rule fallback (SPEED's own loop), prompts with no usable verdict are dropped, by reason
    strict, dropped = speed.preference_pairs(groups, judgments, fallback=False)
    assert [p["id"] for p in strict.to_pylist()] == ["a"]
    assert dropped == {"judge: best and worst are the same output": 1, "judge: http 503 after 5 attempts": 1}
    # the judge's best wins when it parsed (a -> 1); b's judgment failed -> first valid sample (0)
    drafts = speed.pick_drafts(groups, judgments)
    assert [(r["id"], r["sample"]) for r in drafts.to_pylist()] == [("a", 1), ("b", 0), ("c", 0)]


def test_revision_requests_and_final_rows():
    gens = speed.parse_generations(
        pa.Table.from_pylist([_generated("a", 0, "retrieval", GOOD), _generated("b", 0, "retrieval", GOOD)])
    )
    drafts = speed.pick_drafts(speed.group_samples(gens))
    reqs = speed.revise_requests(drafts.to_pylist(), seed=0, max_chars=100)
    user = json.loads(reqs[0]["messages"])[-1]["content"]
    assert json.loads(user.split("### Example\n")[1].split("\n\n")[0]) == json.loads(GOOD)
    revised = '{"reason": "shorter", "revision": {"user_query": "bake bread", "positive_document": "Knead", "hard_negative_document": "Cake"}}'
    outs = [
        r | {"raw": raw, "generator": "reviser", "num_input_tokens": 80, "num_output_tokens": 20}
        for r, raw in zip(reqs, [revised, '{"reason": "x", "revision": {"user_query": "only"}}'], strict=True)
    ]
    revisions = speed.parse_revisions(pa.Table.from_pylist(outs))
    assert revisions["prompt_id"].to_pylist() == ["a", "b"]
    assert revisions["reason"][0].as_py() == "shorter"
    assert revisions["error"][1].as_py() == "revision: missing or empty field 'positive_document'"
    final = speed.final_rows(drafts, revisions).to_pylist()
    assert [(r["id"], r["query"], r["negative"], r["generator"], r["round"]) for r in final] == [
        ("a", "bake bread", "Cake", "reviser", "revision"),
        ("b", "how to bake bread", "Bread is old", "g", "examples"),  # failed revision: the draft stays
    ]


def test_degenerate_rows_are_counted_by_kind():
    from speed_ray.eval.report_synth import degenerate_rows

    rows = [
        {"query": "S1", "positive": "S2", "negative": "S3"},  # a placeholder query
        {"query": "what is a cat", "positive": "what is a cat", "negative": ""},  # positive = query
        {"query": "find tea shops", "positive": "tea here", "negative": "tea here"},  # negative = positive
        {"query": "a fine long query", "positive": "Asian", "negative": None},  # a label: fine
    ]
    assert degenerate_rows(rows) == {
        "positive = query": 1,
        "negative = positive": 1,
        "query under 3 words": 1,
    }
    assert degenerate_rows(rows[3:]) == {}
