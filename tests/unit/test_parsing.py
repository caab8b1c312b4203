"""JSON extraction and repair, task lists, and the per-type mapping to training triplets."""

from __future__ import annotations

import pytest

from speed_ray.synth.parsing import extract_json, parse_judgment, parse_revision, parse_task_list, to_triplet
from speed_ray.synth.prompts import STS_TASK


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ('{"a": 1}', {"a": 1}),
        ('```json\n{"a": "x"}\n```', {"a": "x"}),  # fenced
        ('Sure! Here it is: {"a": [1, 2]} Hope it helps.', {"a": [1, 2]}),  # chatter around
        ('{"a": "line\nbreak"}', {"a": "line\nbreak"}),  # raw newline inside a string (strict=False)
        ('{"a": {"b": "cut', {"a": {"b": "cut"}}),  # truncated: quote and two braces closed
        ('["one", "two"', ["one", "two"]),  # truncated list
        ('["] a list", "task two", "cut', ["] a list", "task two", "cut"]),  # truncated, "]" inside a string
    ],
)
def test_extract_json_repairs(text, value):
    assert extract_json(text) == (value, None)


@pytest.mark.parametrize("text", ["", "no json here", "{{{{", '{"a": }'])
def test_extract_json_reports_garbage(text):
    value, err = extract_json(text)
    assert value is None
    assert err.startswith("invalid JSON")


def test_task_list():
    assert parse_task_list('["Find related docs.", " ", "  ]", "S2", "Rank the news."]') == (
        ["Find related docs.", "Rank the news."],
        None,
    )
    assert parse_task_list('{"tasks": ["Classify a review."]}') == (["Classify a review."], None)
    assert parse_task_list("[]") == ([], "no task of at least 3 words in the list")
    assert parse_task_list('"just a string"') == ([], "expected a JSON list of tasks, got str")


def test_triplet_per_type():
    retrieval = '{"user_query": " q ", "positive_document": "p", "hard_negative_document": "n"}'
    assert to_triplet("retrieval", "Find X", retrieval) == (
        {"instruction": "Find X", "query": "q", "positive": "p", "negative": "n"},
        None,
    )
    sts = '{"S1": "a", "S2": "b", "S3": "c"}'
    assert to_triplet("sts", "Topic/Path", sts)[0] == {
        "instruction": STS_TASK,
        "query": "a",
        "positive": "b",
        "negative": "c",
    }
    s2s = '{"input": "word", "positive_document": "definition"}'
    assert to_triplet("text_matching_short", "Match", s2s)[0]["negative"] is None
    cls = '{"input_text": "t", "label": "l", "misleading_label": "m"}'
    assert to_triplet("classification", "Classify", cls)[0]["positive"] == "l"


def test_triplet_errors_are_values_not_exceptions():
    assert to_triplet("retrieval", "t", '{"user_query": "q", "positive_document": ""}') == (
        {},
        "missing or empty field 'positive_document'",
    )
    assert to_triplet("sts", "t", "[1, 2]") == ({}, "expected a JSON object, got list")
    assert to_triplet("sts", "t", "nonsense")[1].startswith("invalid JSON")


def test_parse_judgment():
    assert parse_judgment('{"reason": "r", "best": 1, "worst": 0}', 2) == (
        {"best": 1, "worst": 0, "reason": "r"},
        None,
    )
    assert parse_judgment('```json\n{"reason": "r", "best": "2", "worst": 0}\n```', 3)[0]["best"] == 2
    assert parse_judgment('{"best": 2, "worst": 0}', 2) == (
        {},
        "field 'best': expected an index in 0..1, got 2",
    )
    assert parse_judgment('{"best": 0, "worst": 0}', 2)[1] == "best and worst are the same output (0)"
    assert parse_judgment("[0, 1]", 2)[1] == "expected a JSON object, got list"


def test_parse_revision():
    text = '{"reason": "ok", "revision": {"S1": "a", "S2": "b", "S3": "c"}}'
    assert parse_revision("sts", "ignored", text) == (
        {"instruction": STS_TASK, "query": "a", "positive": "b", "negative": "c", "reason": "ok"},
        None,
    )
    assert (
        parse_revision("sts", "t", '{"reason": "x"}')[1] == "expected a JSON object with a 'revision' object"
    )
    assert (
        parse_revision("sts", "t", '{"revision": {"S1": "a"}}')[1] == "revision: missing or empty field 'S2'"
    )
