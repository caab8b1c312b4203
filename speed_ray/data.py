"""Loaders for the project's text data, used as they are (never rebuilt).

``../shared/data/debian/`` holds Debian package descriptions, one per source package:
``labelled.jsonl`` ({id, text, label, tags}: the Debian section is the label) and ``retrieval/`` in
the BEIR layout (corpus.jsonl {_id, title, text}, queries.jsonl {_id, text}, qrels/test.tsv).
``SHA256SUMS`` beside them lets a loader prove it reads the published files.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from pathlib import Path
from typing import Any

from speed_ray.prompts import assistant


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open() as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from None
    return rows


def _required(row: dict, keys: tuple[str, ...], path: Path, n: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"{path}:{n}: missing keys {missing} (expected {list(keys)})")


def read_beir(folder: Path) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """(corpus [{id, title, text}], queries [{id, text}], qrels {query_id: {doc_id: score}})."""
    corpus, queries = [], []
    for n, r in enumerate(read_jsonl(folder / "corpus.jsonl"), 1):
        _required(r, ("_id", "text"), folder / "corpus.jsonl", n)
        corpus.append({"id": str(r["_id"]), "title": r.get("title", ""), "text": r["text"]})
    for n, r in enumerate(read_jsonl(folder / "queries.jsonl"), 1):
        _required(r, ("_id", "text"), folder / "queries.jsonl", n)
        queries.append({"id": str(r["_id"]), "text": r["text"]})
    qrels: dict[str, dict[str, int]] = {}
    with (folder / "qrels" / "test.tsv").open() as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            _required(row, ("query-id", "corpus-id", "score"), folder / "qrels" / "test.tsv", n)
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = int(row["score"])
    return corpus, queries, qrels


def read_corpus(path: Path) -> list[dict[str, Any]]:
    """[{id, text}] from an unlabelled JSONL corpus (extra keys such as ``label`` are ignored)."""
    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        _required(r, ("id", "text"), path, n)
    return [{"id": str(r["id"]), "text": r["text"]} for r in rows]


def read_labelled(path: Path) -> list[dict[str, Any]]:
    """[{id, text, label}] from a labelled JSONL file."""
    rows = read_jsonl(path)
    for n, r in enumerate(rows, 1):
        _required(r, ("id", "text", "label"), path, n)
    return [{"id": str(r["id"]), "text": r["text"], "label": r["label"]} for r in rows]


def verify_checksums(folder: Path) -> list[str]:
    """Check every file under ``folder`` that a ``SHA256SUMS`` in it or its parent lists.

    Returns the checked paths; raises ``ValueError`` naming the first file whose hash differs.
    No SHA256SUMS means nothing to check (a user's own data).
    """
    for sums in (folder / "SHA256SUMS", folder.parent / "SHA256SUMS"):
        if sums.is_file():
            break
    else:
        return []
    checked = []
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition("  ")
        path = sums.parent / name
        if not name or folder.resolve() not in path.resolve().parents:
            continue
        if hashlib.sha256(path.read_bytes()).hexdigest() != digest:
            raise ValueError(f"{path}: SHA-256 differs from {sums}; use the published files as they are")
        checked.append(name)
    return checked


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet file, a JSONL file, a finished speed-ray step folder (its manifest's parquet
    shards, such as ``synth/train``) or a ``datasets`` folder saved with ``save_to_disk``."""
    manifest = path / "_manifest.json"
    if manifest.is_file():
        import pyarrow.parquet as pq

        files = [path / f["name"] for f in json.loads(manifest.read_text())["files"]]
        rows = [r for f in files for r in pq.read_table(f).to_pylist()]
    elif path.is_dir():
        from datasets import load_from_disk

        rows = load_from_disk(str(path)).to_list()
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
    else:
        rows = read_jsonl(path)
    if not rows:
        raise ValueError(f"{path}: no rows")
    return rows


def read_pairs(path: Path) -> list[dict[str, Any]]:
    """Pairs in the sentence-transformers convention: ``anchor``, ``positive`` and optional hard
    negatives in ``negative`` / ``negative_1``, ``negative_2``... columns (empty ones are skipped),
    from parquet, JSONL, a step folder (``synth/train``) or a ``datasets`` folder saved with
    ``save_to_disk``."""
    rows = read_rows(path)
    columns = {k for r in rows for k in r if k.startswith("negative")}  # JSONL rows may omit some
    negatives = sorted(columns, key=_negative_order)
    out = []
    for n, r in enumerate(rows, 1):
        _required(r, ("anchor", "positive"), path, n)
        for k in ("anchor", "positive", *negatives):
            if r.get(k) is not None and not isinstance(r[k], str):
                raise ValueError(f"{path}:{n}: {k}: expected a string, got {type(r[k]).__name__}")
        negs = [r[k] for k in negatives if r.get(k)]
        out.append({"anchor": r["anchor"], "positive": r["positive"], "negatives": negs})
    return out


def _negative_order(column: str) -> int:
    """negative, negative_1, negative_2, ... in that order (negative_10 after negative_9)."""
    suffix = column.removeprefix("negative").lstrip("_")
    return int(suffix) if suffix.isdigit() else 0


def nested_sample(rows: list[Any], n: int, seed: int) -> list[Any]:
    """``n`` rows (all when 0 or more than there are) in their input order: the first ``n`` of one
    seeded shuffle, so with the same rows and seed the sample for a smaller ``n`` lies inside the
    sample for a larger one (training-data sizes for a scaling curve)."""
    if not n or n >= len(rows):
        return rows
    order = list(range(len(rows)))
    random.Random(f"nested-{seed}").shuffle(order)
    return [rows[i] for i in sorted(order[:n])]


def read_chat_rows(path: Path, text_keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """A user's alignment data: ``messages`` (a chat prompt: a list of ``{role, content}`` objects, or
    its JSON) plus the non-empty string columns ``text_keys``; ``messages`` comes back as JSON."""
    out = []
    for n, r in enumerate(read_rows(path), 1):
        _required(r, ("messages", *text_keys), path, n)
        msgs = _messages(r["messages"], "messages", path, n)
        for k in text_keys:
            _text(r[k], k, path, n)
        out.append({"messages": json.dumps(msgs)} | {k: r[k] for k in text_keys})
    return out


def read_preference_rows(path: Path) -> list[dict[str, Any]]:
    """A user's preference pairs in TRL's conversational preference format: ``prompt`` (a list of
    ``{role, content}`` messages), ``chosen`` and ``rejected`` (the assistant's answers, as messages).

    Also taken: speed-ray's earlier form, ``messages`` for the prompt (or its JSON) and ``chosen`` /
    ``rejected`` as plain strings; a string answer becomes one assistant message.
    """
    out = []
    for n, r in enumerate(read_rows(path), 1):
        key = "prompt" if "prompt" in r or "messages" not in r else "messages"
        _required(r, (key, "chosen", "rejected"), path, n)
        row = {"prompt": _messages(r[key], key, path, n)}
        for k in ("chosen", "rejected"):
            if isinstance(r[k], str):
                row[k] = assistant(_text(r[k], k, path, n))
            else:
                row[k] = _messages(r[k], k, path, n)
        out.append(row)
    return out


def _text(value: Any, key: str, path: Path, n: int) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{path}:{n}: {key}: expected a non-empty string, got {value!r}")
    return value


def _messages(value: Any, key: str, path: Path, n: int) -> list[dict[str, str]]:
    """A chat (a list of ``{role, content}`` objects, or its JSON) as plain ``{role, content}`` dicts."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise ValueError(f"{path}:{n}: {key} is a string but not JSON") from None
    if not (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        raise ValueError(f"{path}:{n}: {key}: expected a non-empty list of {{role, content}} objects")
    return [{"role": m["role"], "content": m["content"]} for m in value]
