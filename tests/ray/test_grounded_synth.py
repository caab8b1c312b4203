"""Grounded synthesis end to end through the CLI: a hand-made corpus, an OpenAI-compatible fake
generator answering from the schema, and every step's rows checked: the excluded and the too short
documents left out, a long one cut into chunks, one query of each kind per chunk with the chunk as
its positive, and the training set in sentence-transformers' columns."""

from __future__ import annotations

import json
from pathlib import Path

from speed_ray.cli import main
from speed_ray.io.schemas import DOCUMENTS, EXAMPLES, QUERIES, TRIPLETS, read_manifest, read_stage
from speed_ray.synth.grounded import KIND_INSTRUCTIONS
from tests.conftest import TEST_API_KEY_ENV
from tests.fakes import FakeTeacher

LONG = "\n".join(f"Paragraph {i} of the long document, " + " ".join(["with words"] * 10) for i in range(3))
DOCS = {
    "alpha": "The alpha tool converts images between many formats and keeps their metadata intact.",
    "beta": LONG,
    "tiny": "Too short.",
    "held": "This document is scored by the evaluation, so it must never be trained on at all.",
    "gamma": "Gamma is a library for parsing configuration files written in a small language.",
}


def write_corpus(tmp_path: Path) -> tuple[Path, Path]:
    corpus, exclude = tmp_path / "corpus.jsonl", tmp_path / "exclude.jsonl"
    corpus.write_text("".join(json.dumps({"id": k, "text": v}) + "\n" for k, v in DOCS.items()))
    exclude.write_text(json.dumps({"id": "held", "text": "x"}) + "\n")
    return corpus, exclude


def grounded_overrides(tmp_path: Path, url: str, name: str = "grounded") -> list[str]:
    corpus, exclude = write_corpus(tmp_path)
    return [
        f"run.output_dir={tmp_path}",
        f"run.name={name}",
        "synth.source=corpus",
        f"synth.corpus.path={corpus}",
        f"synth.corpus.exclude={exclude}",
        "synth.corpus.min_chars=40",
        "synth.corpus.chunk_chars=300",  # the long document: 3 lines of 142 characters,
        "synth.shard_rows=2",
        "synth.engine.kind=openai",
        "synth.engine.model=teacher-model",
        f"synth.engine.base_url={url}",
        f"synth.engine.api_key_env={TEST_API_KEY_ENV}",
        "synth.engine.num_cpus=0.25",
        "synth.engine.batch_size=2",
        "synth.engine.max_retries=1",
    ]


def empty_config(tmp_path: Path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


def test_grounded_queries_from_a_corpus(tmp_path, ray_session):
    with FakeTeacher() as teacher:
        args = [empty_config(tmp_path), *grounded_overrides(tmp_path, teacher.url)]
        assert main(["synth", *args]) == 0
    assert main(["report", *args]) == 0
    run = tmp_path / "grounded" / "synth"

    docs = read_stage(run / "documents", DOCUMENTS).to_pylist()
    chunks = {d["id"]: d["text"] for d in docs}
    assert sorted(chunks) == ["alpha", "beta#0", "beta#1", "gamma"]  # held excluded, tiny too short
    assert chunks["beta#0"] + "\n" + chunks["beta#1"] == LONG
    m = read_manifest(run / "documents")
    assert (m["documents"], m["excluded"], m["chunks"], m["chunks_too_short"]) == (4, 1, 4, 1)
    assert len(m["files"]) == 2  # synth.shard_rows chunks per shard

    queries = read_stage(run / "queries", QUERIES)
    assert sorted(queries["doc_id"].to_pylist()) == sorted(chunks) and queries["error"].null_count == 4
    assert teacher.requests == 4

    examples = read_stage(run / "examples", EXAMPLES).to_pylist()
    assert len(examples) == 12  # 4 chunks x 3 kinds, none a near duplicate of another
    for ex in examples:
        kind = ex["task_type"].removeprefix("grounded_")
        assert ex["positive"] == chunks[ex["topic"]]
        assert ex["query"].startswith(f"{kind} text ") and ex["instruction"] == KIND_INSTRUCTIONS[kind]
    assert read_manifest(run / "examples")["queries"] == 12

    train = read_stage(run / "train", TRIPLETS).to_pylist()
    assert sorted(r["positive"] for r in train) == sorted(ex["positive"] for ex in examples)
    assert all(r["anchor"].startswith("Instruct: Given a") and r["negative"] == "" for r in train)

    report = (tmp_path / "grounded" / "report.md").read_text()
    assert "- documents: 4 read, 1 excluded by id, 4 chunks (1 too short for a query)" in report
    assert "- training rows: 12 from 12 queries of 4 chunks (0 more repeated the prompt's" in report
    assert "| queries | openai:`teacher-model` | 4 | 4 | 0 |" in report
