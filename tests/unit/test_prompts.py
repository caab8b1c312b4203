"""Prompt building: seeded placeholders, schemas, judge and reviser prompts."""

from __future__ import annotations

import random

from speed_ray.synth import prompts


def test_prompts_are_a_function_of_the_seed():
    for kind in prompts.KINDS:
        a = prompts.synthesis_prompt(kind, "Find papers", random.Random(3))
        b = prompts.synthesis_prompt(kind, "Find papers", random.Random(3))
        assert a == b
        assert a[0] == {"role": "system", "content": prompts.SYSTEM}
        assert "JSON" in a[1]["content"]
    seen = {prompts.synthesis_prompt("retrieval", "t", random.Random(s))[1]["content"] for s in range(20)}
    assert len(seen) > 10  # placeholders and guideline order vary with the seed


def test_brainstorm_names_the_topic():
    msgs = prompts.brainstorm_prompt("retrieval", "Health/Nutrition", random.Random(0))
    assert "for the topic: Health/Nutrition" in msgs[1]["content"]


def test_schemas_require_exactly_the_fields():
    schema = prompts.synthesis_schema("retrieval", 100)
    assert schema["required"] == ["user_query", "positive_document", "hard_negative_document"]
    assert schema["properties"]["user_query"]["maxLength"] == 100
    assert prompts.synthesis_schema("text_matching_long", 5)["required"] == ["input", "positive_document"]


def test_judge_and_reviser_prompts_and_schemas():
    judge = prompts.judge_prompt("Write one example.", ['{"a": 1}', "oops"])
    assert judge[0]["content"] == prompts.SYSTEM
    assert "### Prompt\nWrite one example." in judge[1]["content"]
    assert '[0] {"a": 1}\n[1] oops' in judge[1]["content"] and "indices start from 0" in judge[1]["content"]
    schema = prompts.judge_schema(3, max_chars=50)
    assert schema["required"] == ["reason", "best", "worst"]
    assert schema["properties"]["worst"] == {"type": "integer", "enum": [0, 1, 2]}
    revise = prompts.revise_prompt("Write one example.", '{"input": "x", "positive_document": "y"}')
    assert '### Example\n{"input": "x", "positive_document": "y"}' in revise[1]["content"]
    rschema = prompts.revise_schema("text_matching_short", max_chars=50)
    assert rschema["properties"]["revision"] == prompts.synthesis_schema("text_matching_short", 50)
    assert rschema["properties"]["revision"]["required"] == ["input", "positive_document"]
