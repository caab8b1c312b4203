"""Property-based tests (hypothesis): the parsers of model output, the config loader, crop building and
the schema mapping, on arbitrary input, raise nothing but the project's documented errors.

- parsers: never raise; they return ``(value, error)``;
- the config loader: a loaded config or ``ConfigError``;
- crops: substrings of the document within the rule's limits, the same draw for the same seed;
- ``cast_rows``: a table of exactly the schema, or ``ValueError`` naming the extra columns.
"""

from __future__ import annotations

import dataclasses
import json
import typing

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from speed_ray.config import SpeedRayConfig, load_config
from speed_ray.embed.pairs import CropRule, build_pairs, sentence_crops
from speed_ray.io.schemas import EXAMPLES, cast_rows
from speed_ray.io.settings import ConfigError
from speed_ray.synth.parsing import (
    extract_json,
    parse_judgment,
    parse_revision,
    parse_task_list,
    to_triplet,
)
from speed_ray.synth.prompts import FIELDS

FAST = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Model output: any text, and text made of the characters JSON repair cares about.
model_text = st.one_of(
    st.text(),
    st.text(alphabet='{}[]":,\\ \n\ttrue0123456789abc`json', max_size=200),
)
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


@FAST
@given(model_text)
@example("[" * 5000)  # nested past Python's recursion limit: an error row, not a crash
@example('{"user_query": "a", "positive_document": "b"')  # cut off by the token budget
@example('```json\n{"a": 1}\n```')
def test_parsers_never_raise(text):
    value, err = extract_json(text)
    assert (err is None) or (value is None and err.startswith("invalid JSON"))
    tasks, err = parse_task_list(text)
    assert (tasks and err is None) or (tasks == [] and isinstance(err, str))
    for kind in FIELDS:
        row, err = to_triplet(kind, "task", text)
        assert (row and err is None) or (row == {} and isinstance(err, str))
        row, err = parse_revision(kind, "task", text)
        assert (row and err is None) or (row == {} and isinstance(err, str))
    verdict, err = parse_judgment(text, 3)
    assert (err is None and 0 <= verdict["best"] != verdict["worst"] < 3) or (verdict == {} and err)


@FAST
@given(json_values, st.text(alphabet="abc .:\n", max_size=20), st.text(alphabet="abc .:\n", max_size=20))
def test_json_comes_back_from_chatter_around_it(value, before, after):
    text = json.dumps(value)
    assert extract_json(text) == (value, None)
    if isinstance(value, dict | list):  # a bracketed value is found among words
        assert extract_json(f"{before}```json\n{text}\n```{after}") == (value, None)


def _scalar_keys(cls: type, prefix: str = "") -> list[str]:
    """Every dotted config key of a plain value (int, float, str, bool, optional or not)."""
    keys = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
        if dataclasses.is_dataclass(inner[0]):
            keys += _scalar_keys(inner[0], f"{prefix}{f.name}.")
        elif inner[0] in (int, float, str, bool):
            keys.append(prefix + f.name)
    return keys


CONFIG_KEYS = _scalar_keys(SpeedRayConfig)
override_values = st.one_of(
    st.integers(-(10**6), 10**6).map(str),
    st.floats(allow_nan=True).map(str),
    st.sampled_from(["true", "false", "null", "[]", "{}", "~", "''", "-1", "0", "1e309", "[1, [2]]"]),
    st.text(max_size=30),
)


@FAST
@given(st.lists(st.tuples(st.sampled_from(CONFIG_KEYS), override_values), max_size=4))
@example([("run.name", "../../etc")])
@example([("synth.sampling.max_tokens", "{a: [1, 2]}")])
@example([("embed.steps", "[unclosed")])
def test_any_overrides_load_or_raise_a_config_error(pairs):
    try:
        cfg = load_config(None, [f"{key}={value}" for key, value in pairs])
    except ConfigError as e:
        assert str(e)  # a message to show
        return
    assert isinstance(cfg, SpeedRayConfig)


@FAST
@given(
    st.lists(st.text(alphabet="ab .\n", max_size=400), min_size=1, max_size=5),
    st.integers(0, 3),
    st.sampled_from(["crops", "dropout"]),
)
def test_crops_are_pieces_of_their_document(texts, seed, mode):
    rule = CropRule(min_chars=5, max_chars=40, sentences_per_crop=2, min_crops=2)
    docs = [{"id": f"d{i}", "text": t} for i, t in enumerate(texts)]
    pairs, skipped = build_pairs(docs, mode, rule, seed=seed)
    assert sorted([p["id"] for p in pairs] + [s["id"] for s in skipped]) == sorted(d["id"] for d in docs)
    for p in pairs:
        crops = sentence_crops(docs[int(p["id"][1:])]["text"], rule)
        assert p["anchor"] in crops and p["positive"] in crops
        assert (p["anchor"] == p["positive"]) == (mode == "dropout")
        for piece in p["anchor"].split(". "):
            assert piece in docs[int(p["id"][1:])]["text"]
    assert build_pairs(docs, mode, rule, seed=seed) == (pairs, skipped)


@FAST
@given(
    st.lists(
        st.dictionaries(
            st.sampled_from([*EXAMPLES.names, "extra", "Query"]),
            st.none() | st.text(max_size=10) | st.integers(0, 10**6),
            max_size=6,
        ),
        max_size=5,
    )
)
def test_rows_map_to_the_schema_or_name_what_does_not_fit(rows):
    try:
        table = cast_rows(rows, EXAMPLES)
    except ValueError as e:
        bad = {k for r in rows for k in r} - set(EXAMPLES.names)
        if bad:
            assert str(e) == f"columns not in the schema: {sorted(bad)}"
        else:  # a value of the wrong type: the column and its type are named
            column = str(e).split(":")[0].removeprefix("column ")
            assert column in EXAMPLES.names and f"expected {EXAMPLES.field(column).type} values" in str(e)
        return
    assert table.schema == EXAMPLES and table.num_rows == len(rows)


def test_the_fuzzed_keys_cover_every_section():
    assert {k.split(".")[0] for k in CONFIG_KEYS} >= {"run", "synth", "align", "embed", "eval"}
    assert len(CONFIG_KEYS) > 100
    with pytest.raises(ConfigError):
        load_config(None, ["embed.steps=[unclosed"])
