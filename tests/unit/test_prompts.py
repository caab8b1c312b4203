"""Prompt building: topic truncation, seeded placeholders, schemas."""

from __future__ import annotations

import random

from speed_ray import prompts


def test_truncate_topic_keeps_first_two_and_last_two_levels():
    # SPEED App. D.1's own example.
    path = "Arts/Movies/Titles/3/36_Hours_-_1964/Cast_and_Crew"
    assert prompts.truncate_topic(path) == "Arts/Movies/36_Hours_-_1964/Cast_and_Crew"
    assert prompts.truncate_topic("/Science/Biology/") == "Science/Biology"


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
