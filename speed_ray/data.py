"""Loaders for the project's text data, used as they are (never rebuilt).

The package ships one data set, gzip-compressed, under ``speed_ray/data/debian/`` (its data card is
the ``README.md`` there): Debian package descriptions, one per source package.
``builtin:debian/labelled`` ({id, text, label, tags}: the Debian section is the label) and
``builtin:debian/retrieval`` in the BEIR layout (corpus.jsonl {_id, title, text}, queries.jsonl
{_id, text}, qrels/test.tsv). ``SHA256SUMS`` beside them holds the checksums of the published,
uncompressed files, so a loader proves it reads them unchanged.

Any config key that takes a data path also takes a built-in name. Readers open ``.gz`` files
transparently, and a BEIR folder may hold its files plain or gzipped.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import random
from pathlib import Path
from typing import IO, Any

BUILTIN = "builtin:"
DATA_DIR = Path(__file__).parent / "data"
# Built-in data name -> its file or folder under DATA_DIR.
BUILTIN_DATA = {
    "debian/labelled": "debian/labelled.jsonl.gz",
    "debian/retrieval": "debian/retrieval",
}


def locate(spec: str) -> Path:
    """The file or folder a data spec names: a built-in name (``builtin:debian/retrieval``) or a
    path. An unknown built-in name raises ``ValueError`` with the closest names."""
    if not spec.startswith(BUILTIN):
        return Path(spec)
    name = spec.removeprefix(BUILTIN)
    if name not in BUILTIN_DATA:
        close = difflib.get_close_matches(name, BUILTIN_DATA, n=3, cutoff=0.4) or list(BUILTIN_DATA)
        raise ValueError(
            f"{spec}: no such built-in data set (closest: {', '.join(BUILTIN + c for c in close)})"
        )
    return DATA_DIR / BUILTIN_DATA[name]


def open_text(path: Path) -> IO[str]:
    """A text file, decompressed on the fly when its name ends in ``.gz``."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return path.open(encoding="utf-8")


def member(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/name.gz`` when only the compressed copy is there."""
    path = folder / name
    gz = path.with_name(path.name + ".gz")
    return gz if not path.is_file() and gz.is_file() else path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with open_text(path) as f:
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
    corpus_path, queries_path = member(folder, "corpus.jsonl"), member(folder, "queries.jsonl")
    for n, r in enumerate(read_jsonl(corpus_path), 1):
        _required(r, ("_id", "text"), corpus_path, n)
        corpus.append({"id": str(r["_id"]), "title": r.get("title", ""), "text": r["text"]})
    for n, r in enumerate(read_jsonl(queries_path), 1):
        _required(r, ("_id", "text"), queries_path, n)
        queries.append({"id": str(r["_id"]), "text": r["text"]})
    qrels: dict[str, dict[str, int]] = {}
    qrels_path = member(folder / "qrels", "test.tsv")
    with open_text(qrels_path) as f:
        for n, row in enumerate(csv.DictReader(f, delimiter="\t"), 2):
            _required(row, ("query-id", "corpus-id", "score"), qrels_path, n)
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
    """Check every file under ``folder`` that a ``SHA256SUMS`` in it or its parent lists; a file
    shipped gzipped (``name.gz``) is checked by its decompressed bytes.

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
        path = member(sums.parent, name)
        if not name or folder.resolve() not in path.resolve().parents:
            continue
        data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"{path}: SHA-256 differs from {sums}; use the published files as they are")
        checked.append(name)
    return checked


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Rows of a parquet file, a JSONL file or a ``datasets`` folder saved with ``save_to_disk``."""
    if path.is_dir():
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
    from parquet, JSONL or a ``datasets`` folder saved with ``save_to_disk``."""
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
        msgs = r["messages"]
        if isinstance(msgs, str):
            try:
                msgs = json.loads(msgs)
            except json.JSONDecodeError:
                raise ValueError(f"{path}:{n}: messages is a string but not JSON") from None
        if not (
            isinstance(msgs, list)
            and msgs
            and all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs)
        ):
            raise ValueError(f"{path}:{n}: messages: expected a non-empty list of {{role, content}} objects")
        for k in text_keys:
            if not isinstance(r[k], str) or not r[k].strip():
                raise ValueError(f"{path}:{n}: {k}: expected a non-empty string, got {r[k]!r}")
        msgs = [{"role": m["role"], "content": m["content"]} for m in msgs]
        out.append({"messages": json.dumps(msgs)} | {k: r[k] for k in text_keys})
    return out
