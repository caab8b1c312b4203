"""Grounded queries, the pure part: chunks of a document, requests, parsing and the example rows."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow as pa
import pytest

from speed_ray.config import load_config
from speed_ray.io.schemas import QUERIES
from speed_ray.io.settings import ConfigError
from speed_ray.synth import grounded
from tests.conftest import DEBIAN

A, B, C = "a" * 120, "b" * 120, "c" * 120


def test_paragraphs_are_packed_into_chunks_up_to_the_limit():
    assert grounded.chunk_text(f"{A}\n\n{B}\n{C}", 300) == [f"{A}\n{B}", C]
    assert grounded.chunk_text(f"  {A}  \n\n\n", 300) == [A]


def test_a_long_paragraph_is_cut_at_sentence_ends_then_hard():
    one, two = "x" * 90 + ".", "y" * 90 + "!"
    assert grounded.chunk_text(f"{one} {two}", 100) == [one, two]
    assert grounded.chunk_text("z" * 250, 100) == ["z" * 100, "z" * 100, "z" * 50]


def test_chunks_keep_the_id_of_a_whole_document_and_count_the_short_ones():
    counts = Counter[str]()
    docs = [
        {"id": "one", "text": A},
        {"id": "two", "text": f"{A}\n{B}\n{C}\nshort"},
        {"id": "tiny", "text": "hi"},
    ]
    rows = list(grounded.document_chunks(docs, 250, 100, counts))
    assert rows == [
        {"id": "one", "text": A},
        {"id": "two#0", "text": f"{A}\n{B}"},
        {"id": "two#1", "text": f"{C}\nshort"},
    ]
    assert counts == {"documents": 3, "chunks": 3, "chunks_too_short": 1}


def test_requests_carry_the_chunk_and_ask_for_each_kind_under_a_schema():
    docs = pa.table({"id": ["d1", "d2"], "text": ["first text", "second text"]})
    rows = grounded.query_requests(docs, seed=3, kinds=["keyword", "question"], max_chars=200)
    assert [r["doc_id"] for r in grounded.query_requests(docs, 3, ["keyword"], 200, only={"d2"})] == ["d2"]
    assert [r["doc_id"] for r in rows] == ["d1", "d2"] and rows[0]["text"] == "first text"
    assert rows == grounded.query_requests(docs, seed=3, kinds=["keyword", "question"], max_chars=200)
    assert rows[0]["id"] != grounded.query_requests(docs, 4, ["keyword"], 200)[0]["id"]  # seeded
    schema = json.loads(rows[0]["json_schema"])
    assert schema["required"] == ["keyword", "question"]
    assert schema["properties"]["keyword"]["maxLength"] == 100  # a keyword query stays short
    assert schema["properties"]["question"]["maxLength"] == 200
    chat = json.loads(rows[0]["messages"])
    user = chat[-1]["content"]
    assert json.loads(chat[-2]["content"]) == {
        k: grounded.EXAMPLE_QUERIES[k] for k in ("keyword", "question")
    }
    assert "first text" in user and '"keyword"' in user and '"paraphrase"' not in user


def engine_rows(raws: list[str], kinds=("keyword", "question")) -> pa.Table:
    docs = pa.table(
        {"id": [f"d{i}" for i in range(len(raws))], "text": [f"text {i}" for i in range(len(raws))]}
    )
    rows = grounded.query_requests(docs, 0, list(kinds), 300)
    out = [
        r | {"sample": 0, "raw": raw, "generator": "g", "num_input_tokens": 50, "num_output_tokens": 9}
        for r, raw in zip(rows, raws, strict=True)
    ]
    return pa.Table.from_pylist(out)


def test_parsing_keeps_each_kind_and_names_what_is_wrong():
    raws = [
        '{"keyword": "debian  package\\nmanager", "question": "How do I install it?"}',
        '{"keyword": "tool", "question": ""}',
        "not json at all",
        '["a", "list"]',
    ]
    table = grounded.parse_queries(engine_rows(raws))
    assert table.schema == QUERIES
    rows = table.to_pylist()
    assert (rows[0]["keyword"], rows[0]["question"], rows[0]["error"]) == (
        "debian package manager",
        "How do I install it?",
        None,
    )
    assert rows[1]["error"] == "missing or empty field: question"
    assert rows[2]["error"].startswith("invalid JSON")
    assert rows[3]["error"] == "invalid JSON: expected an object"
    assert rows[0]["round"] == "queries" and rows[0]["text"] == "text 0"


def test_each_valid_query_is_an_example_with_its_chunk_as_positive():
    copied = grounded.EXAMPLE_QUERIES["question"].upper()
    raws = [
        '{"keyword": "k0", "question": "q0"}',
        "broken",
        json.dumps({"keyword": "k2", "question": "q2"}),
        json.dumps({"keyword": "k3", "question": copied}),
    ]
    examples, counts = grounded.grounded_examples(grounded.parse_queries(engine_rows(raws)))
    rows = examples.to_pylist()
    assert [(r["query"], r["positive"], r["task_type"], r["topic"]) for r in rows] == [
        ("k0", "text 0", "grounded_keyword", "d0"),
        ("q0", "text 0", "grounded_question", "d0"),
        ("k2", "text 2", "grounded_keyword", "d2"),
        ("q2", "text 2", "grounded_question", "d2"),
        ("k3", "text 3", "grounded_keyword", "d3"),
    ]
    assert rows[0]["instruction"] == grounded.KIND_INSTRUCTIONS["keyword"] and rows[0]["negative"] is None
    assert len({r["id"] for r in rows}) == 5
    # a chunk's call is counted once: its tokens sit on its first example
    assert [r["num_input_tokens"] for r in rows] == [50, 0, 50, 0, 50]
    assert counts == {"chunks": 4, "queries": 5, "copied_example": 1, "failed": {"invalid JSON": 1}}


def test_the_corpus_source_checks_its_keys_before_any_work(tmp_path):
    base = [f"eval.retrieval.path={DEBIAN / 'retrieval'}", "synth.source=corpus"]
    with pytest.raises(ConfigError, match=r"synth.corpus.path: required when synth.source is 'corpus'"):
        load_config(None, base).validate()
    corpus = tmp_path / "c.jsonl"
    corpus.write_text('{"id": "a", "text": "some text"}\n{"id": "b"}\n')
    with pytest.raises(ConfigError, match=r"synth.corpus.path: .*c.jsonl:2: .*text"):
        load_config(None, [*base, f"synth.corpus.path={corpus}"]).validate()
    corpus.write_text('{"id": "a", "text": "some text"}\n')
    with pytest.raises(ConfigError, match=r"synth.corpus.kinds: expected a non-empty list of keyword"):
        load_config(None, [*base, f"synth.corpus.path={corpus}", "synth.corpus.kinds=[title]"]).validate()
    with pytest.raises(ConfigError, match=r"synth.source: expected one of"):
        load_config(None, ["synth.source=topics"]).validate()


def write_step(folder, rows, schema):
    from speed_ray.io.schemas import cast_rows, write_stage

    return write_stage(folder, [cast_rows(rows, schema)], schema, {}, 0.0)


def test_rows_rank_against_the_documents_then_their_own_texts_that_are_not_documents(tmp_path):
    from speed_ray.io.schemas import DOCUMENTS, EXAMPLES
    from speed_ray.synth.mining import ANY
    from speed_ray.synth.neighbours import _corpus

    write_step(
        tmp_path / "documents", [{"id": "a", "text": "doc a"}, {"id": "b", "text": "doc b"}], DOCUMENTS
    )
    rows = [
        {"id": "1", "query": "q1", "positive": "doc b", "negative": "own negative", "task_type": "pairs"},
        {"id": "2", "query": "q2", "positive": "a pair's positive", "negative": None, "task_type": "pairs"},
    ]
    write_step(tmp_path / "examples", rows, EXAMPLES)
    assert _corpus(tmp_path, grouped=False) == [
        (ANY, "doc a"),
        (ANY, "doc b"),
        (ANY, "own negative"),
        (ANY, "a pair's positive"),
    ]
    assert _corpus(tmp_path, grouped=True) == [
        ("pairs", "doc b"),
        ("pairs", "own negative"),
        ("pairs", "a pair's positive"),
    ]


def test_a_sample_of_chunks_gets_queries_and_a_smaller_one_lies_inside_it(tmp_path):
    from speed_ray.io.schemas import DOCUMENTS
    from speed_ray.synth.driver import sampled_chunks

    write_step(tmp_path / "documents", [{"id": f"d{i}", "text": "t"} for i in range(50)], DOCUMENTS)
    assert sampled_chunks(tmp_path / "documents", 0, 0) is None
    ten, twenty = (sampled_chunks(tmp_path / "documents", n, 0) for n in (10, 20))
    assert ten is not None and twenty is not None and len(ten) == 10 and ten < twenty
    assert (
        sampled_chunks(tmp_path / "documents", 10, 0) == ten != sampled_chunks(tmp_path / "documents", 10, 1)
    )
