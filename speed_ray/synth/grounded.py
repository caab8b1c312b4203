"""Queries grounded in the user's own documents: pure logic, no Ray and no model.

The loop of Promptagator (arXiv 2209.11755), InPars (arXiv 2202.05144) and NVIDIA's domain-specific
embedding recipe: for each document, or each chunk of a long one, the generator writes queries of
several kinds, and the document is their positive. Here one request per chunk asks for one query of
each kind as a JSON object whose schema the engine enforces; each valid query becomes an example.

Ids and seeds are hashes of (run seed, chunk id), so a rerun builds the same requests; the Ray side
(documents and queries steps, resumable shard by shard) is ``speed_ray.synth.driver``.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import Any

import pyarrow as pa

from speed_ray.io.schemas import EXAMPLES, QUERIES, cast_rows
from speed_ray.synth.mining import normalised
from speed_ray.synth.parsing import extract_json
from speed_ray.synth.prompts import chat
from speed_ray.synth.speed import outcome, stable_id, stable_seed

# What each kind asks for, and the instruction its queries carry (decoders embed it; SPEED/E5 form).
KIND_ASKS = {
    "keyword": "a short search query of 2 to 6 keywords that would find this document",
    "question": "a question that this document answers",
    "paraphrase": "one sentence that says what this document is about, in other words",
}
KIND_INSTRUCTIONS = {
    "keyword": "Given a keyword search query, retrieve the document it is looking for",
    "question": "Given a question, retrieve the document that answers it",
    "paraphrase": "Given a sentence, retrieve the document that says the same thing",
}
KIND_MAX_CHARS = {"keyword": 100, "question": 300, "paraphrase": 300}


_PARAGRAPH = re.compile(r"\n\s*\n|\n")
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def chunk_text(text: str, max_chars: int) -> list[str]:
    """``text`` cut into chunks of at most ``max_chars`` characters: whole paragraphs (lines) packed
    greedily, a paragraph longer than that cut at sentence ends, and a sentence longer than that cut
    hard. Whitespace at the ends of each piece is dropped; empty pieces vanish."""
    pieces: list[str] = []
    for para in _PARAGRAPH.split(text):
        for sentence in [para] if len(para) <= max_chars else _SENTENCE.split(para):
            sentence = sentence.strip()
            pieces += [sentence[i : i + max_chars] for i in range(0, len(sentence), max_chars)]
    chunks: list[str] = []
    for piece in filter(None, pieces):
        if chunks and len(chunks[-1]) + 1 + len(piece) <= max_chars:
            chunks[-1] += "\n" + piece
        else:
            chunks.append(piece)
    return chunks


def document_chunks(
    docs: Iterable[dict[str, Any]], max_chars: int, min_chars: int, counts: Counter[str]
) -> Iterator[dict[str, str]]:
    """DOCUMENTS rows (``id``, ``text``) of ``docs``: a document that fits in ``max_chars`` keeps its
    id; a longer one gives chunks ``<id>#0``, ``<id>#1``... Chunks under ``min_chars`` give no query
    and are counted in ``counts`` (with the documents and chunks made)."""
    for doc in docs:
        counts["documents"] += 1
        pieces = chunk_text(doc["text"], max_chars)
        for n, piece in enumerate(pieces):
            if len(piece) < min_chars:
                counts["chunks_too_short"] += 1
                continue
            counts["chunks"] += 1
            yield {"id": doc["id"] if len(pieces) == 1 else f"{doc['id']}#{n}", "text": piece}


# One worked example shown before the document (a made-up one: no user's corpus, no eval set): small
# generators copy the document or the instructions without it.
EXAMPLE_DOCUMENT = (
    "Tidewell reads the files that tide gauges record and turns them into tables of water levels. "
    "It fills short gaps by interpolation, flags readings that jump too far, and can plot a week of "
    "levels as a chart. A command-line tool and a Python library are included."
)
EXAMPLE_QUERIES = {
    "keyword": "tide gauge data reader",
    "question": "How can I turn tide gauge recordings into tables of water levels?",
    "paraphrase": "A tool and library that converts tide gauge files into water level tables, "
    "filling gaps and flagging bad readings.",
}


def _ask(text: str, kinds: list[str]) -> str:
    asks = "\n".join(f'- "{kind}": {KIND_ASKS[kind]}' for kind in kinds)
    return (
        f'Here is a document:\n\n"""\n{text}\n"""\n\n'
        f"Write what a user who needs this document would type to find it:\n{asks}\n\n"
        "Use your own words; do not copy sentences from the document. "
        f"Your output must be a JSON object with the keys {', '.join(kinds)} only, do not explain yourself."
    )


def query_prompt(text: str, kinds: list[str]) -> list[dict[str, str]]:
    """The chat asking for one query of each of ``kinds`` about the document ``text``, after the same
    request answered for ``EXAMPLE_DOCUMENT``."""
    example = json.dumps({k: EXAMPLE_QUERIES[k] for k in kinds})
    return [
        *chat(_ask(EXAMPLE_DOCUMENT, kinds)),
        {"role": "assistant", "content": example},
        {"role": "user", "content": _ask(text, kinds)},
    ]


def query_schema(kinds: list[str], max_chars: int) -> dict[str, Any]:
    """One non-empty string per kind, each capped (a keyword query at 100 characters), so a
    completion always closes."""
    props = {
        k: {"type": "string", "minLength": 1, "maxLength": min(max_chars, KIND_MAX_CHARS[k])} for k in kinds
    }
    return {"type": "object", "properties": props, "required": list(kinds), "additionalProperties": False}


def query_requests(
    documents: pa.Table, seed: int, kinds: list[str], max_chars: int, only: set[str] | None = None
) -> list[dict[str, Any]]:
    """One generation request per chunk of a shard of DOCUMENTS (those in ``only``, when given),
    carrying the chunk (the positive)."""
    schema = json.dumps(query_schema(kinds, max_chars))
    rows = []
    for doc in documents.to_pylist():
        if only is not None and doc["id"] not in only:
            continue
        rid = stable_id(seed, "queries", doc["id"])
        rows.append(
            {
                "id": rid,
                "doc_id": doc["id"],
                "text": doc["text"],
                "messages": json.dumps(query_prompt(doc["text"], kinds)),
                "json_schema": schema,
                "seed": stable_seed(seed, rid, 0),
            }
        )
    return rows


def parse_queries(batch: pa.Table) -> pa.Table:
    """Generated query objects -> QUERIES rows: each asked kind's query, or the row's error (invalid
    JSON, a missing or empty key)."""
    out = []
    for r in batch.to_pylist():
        kinds = json.loads(r["json_schema"])["required"]
        value, err = extract_json(r["raw"] or "")
        fields: dict[str, Any] = {}
        if err is None and not isinstance(value, dict):
            err = "invalid JSON: expected an object"
        if err is None:
            fields = {k: " ".join(str(value.get(k) or "").split()) or None for k in kinds}
            missing = [k for k in kinds if not fields[k]]
            if missing:
                err = f"missing or empty field: {', '.join(missing)}"
        out.append(
            {k: r[k] for k in ("id", "sample", "doc_id", "text", "raw")} | fields | outcome(r, err, "queries")
        )
    return cast_rows(out, QUERIES)


def grounded_examples(queries: pa.Table) -> tuple[pa.Table, dict[str, Any]]:
    """EXAMPLES rows of one shard of QUERIES: one per valid query, the chunk its positive, no
    negative (mining adds them); a query that repeats the worked example's is counted, not kept. ``task_type`` is ``grounded_<kind>`` and ``topic`` the chunk id, so
    each row names its document; the chunk's tokens are on its first row only, so sums count each
    call once. Counts: chunks in, queries out, chunks whose output failed (by error
    kind)."""
    from speed_ray.io.schemas import error_kind

    rows, failed, copied = [], Counter[str](), 0
    example = {k: normalised(v) for k, v in EXAMPLE_QUERIES.items()}
    for q in queries.to_pylist():
        if q["error"] is not None:
            failed[error_kind(q["error"])] += 1
            continue
        tokens = {"num_input_tokens": q["num_input_tokens"], "num_output_tokens": q["num_output_tokens"]}
        for kind in KIND_ASKS:
            if q[kind] and normalised(q[kind]) == example[kind]:
                copied += 1  # the worked example's query, not one about this document
            elif q[kind]:
                rows.append(
                    {
                        "id": stable_id(q["id"], kind),
                        "instruction": KIND_INSTRUCTIONS[kind],
                        "query": q[kind],
                        "positive": q["text"],
                        "negative": None,
                        "task_type": f"grounded_{kind}",
                        "topic": q["doc_id"],
                    }
                    | {k: q[k] for k in ("generator", "prompt_id", "seed", "round")}
                    | tokens
                )
                tokens = {"num_input_tokens": 0, "num_output_tokens": 0}  # a chunk's call counted once
    counts = {"chunks": queries.num_rows, "queries": len(rows), "copied_example": copied}
    return cast_rows(rows, EXAMPLES), counts | {"failed": dict(failed)}
