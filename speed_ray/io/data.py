"""Loaders for the project's text data, used as they are (never rebuilt).

The package ships one data set, gzip-compressed, under ``speed_ray/data/debian/`` (its data card is
the ``README.md`` there): Debian package descriptions, one per source package.
``builtin:debian/labelled`` ({id, text, label, tags}: the Debian section is the label) and
``builtin:debian/retrieval`` in the BEIR layout (corpus.jsonl {_id, title, text}, queries.jsonl
{_id, text}, qrels/test.tsv). ``SHA256SUMS`` beside them holds the checksums of the published,
uncompressed files, so a loader proves it reads them unchanged.

Any config key that takes a data path also takes a built-in name. Readers open ``.gz`` files
transparently, and a BEIR folder may hold its files plain or gzipped. The pairs and corpus readers
also read a file on object storage, named by its URI (``s3://bucket/pairs.parquet``: ``locate_input``),
as a stream through pyarrow's filesystems.
"""

from __future__ import annotations

import csv
import difflib
import gzip
import hashlib
import io
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

from speed_ray.io.schemas import assistant
from speed_ray.io.storage import RemoteFile, is_uri


class DataError(ValueError):
    """A user's data file that cannot be used as it is: the message names the file, the line (or row),
    the field and what was expected. The CLI prints it as one line and exits with status 2."""


BUILTIN = "builtin:"
DATA_DIR = Path(__file__).parents[1] / "data"
# Built-in data name -> its file or folder under DATA_DIR.
BUILTIN_DATA = {
    "debian/labelled": "debian/labelled.jsonl.gz",
    "debian/retrieval": "debian/retrieval",
}


def locate(spec: str) -> Path:
    """The file or folder a data spec names: a built-in name (``builtin:debian/retrieval``) or a
    path. An unknown built-in name raises ``DataError`` with the closest names."""
    if not spec.startswith(BUILTIN):
        return Path(spec)
    name = spec.removeprefix(BUILTIN)
    if name not in BUILTIN_DATA:
        close = difflib.get_close_matches(name, BUILTIN_DATA, n=3, cutoff=0.4) or list(BUILTIN_DATA)
        raise DataError(
            f"{spec}: no such built-in data set (closest: {', '.join(BUILTIN + c for c in close)})"
        )
    return DATA_DIR / BUILTIN_DATA[name]


# A data file as the pairs and corpus readers take it: a local path or a file on object storage.
Source = Path | RemoteFile


def locate_input(spec: str) -> Source:
    """``locate``, or for a URI (``s3://bucket/pairs.parquet``) the file on object storage."""
    return RemoteFile(spec) if is_uri(spec) else locate(spec)


def _remote(file: RemoteFile) -> RemoteFile:
    """``file``, once it is known to be a file: a missing object or a folder raises ``DataError``."""
    kind = file.info().type.name
    if kind == "NotFound":
        raise DataError(f"{file}: not found (no object with key {file.key!r} in bucket {file.bucket!r})")
    if kind == "Directory":
        raise DataError(
            f"{file}: a folder on object storage; expected a parquet or JSONL file there (step and "
            "datasets folders are read from a local path)"
        )
    return file


def open_text(path: Source) -> IO[str]:
    """A text file, decompressed on the fly when its name ends in ``.gz``."""
    if isinstance(path, RemoteFile):
        return io.TextIOWrapper(_remote(path).open_stream(), encoding="utf-8")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8")
    return path.open(encoding="utf-8")


def member(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/name.gz`` when only the compressed copy is there."""
    path = folder / name
    gz = path.with_name(path.name + ".gz")
    return gz if not path.is_file() and gz.is_file() else path


def _numbered_jsonl(path: Source) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank line, one at a time; each must be a JSON object."""
    n = 0
    try:
        with open_text(path) as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataError(
                        f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno}); "
                        "expected one JSON object per line"
                    ) from None
                if not isinstance(row, dict):
                    raise DataError(f"{path}:{n}: expected a JSON object, got {_shown(row)}")
                yield n, row
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{n + 1}: not UTF-8 text ({e.reason}); expected JSON lines") from None


def read_jsonl(path: Source) -> list[dict[str, Any]]:
    return [row for _, row in _numbered_jsonl(path)]


def _shown(value: Any) -> str:
    """A value as a JSON file spells it (null, 3, "", [..]), cut short, for error messages."""
    if isinstance(value, dict | list):
        kind = "an object" if isinstance(value, dict) else "a list"
        return f"{kind} {_cut(json.dumps(value, default=str))}"
    return _cut(json.dumps(value, default=str))


def _cut(text: str) -> str:
    return text if len(text) <= 40 else text[:37] + "..."


def _required(row: dict, keys: tuple[str, ...], path: Source, n: int) -> None:
    missing = [k for k in keys if k not in row]
    if missing:
        raise DataError(f"{path}:{n}: missing keys {missing} (expected {list(keys)})")


def _text(row: dict, key: str, path: Source, n: int, optional: bool = False) -> str | None:
    """``row[key]`` as a non-empty string (``optional``: a missing, null or empty one is None)."""
    if key not in row and not optional:
        raise DataError(f"{path}:{n}: missing keys [{key!r}] (expected a non-empty string in {key!r})")
    value = row.get(key)
    if value is None or value == "":
        if optional:
            return None
        got = "null" if value is None else '""'
        raise DataError(f"{path}:{n}: {key}: expected a non-empty string, got {got}")
    if not isinstance(value, str):
        raise DataError(f"{path}:{n}: {key}: expected a string, got {type(value).__name__} {_shown(value)}")
    if not optional and not value.strip():
        raise DataError(f"{path}:{n}: {key}: expected a non-empty string, got {_shown(value)}")
    return value


def _scalar(row: dict, key: str, path: Source, n: int) -> str:
    """``row[key]`` (an id or a label) as a string: a non-empty string or a number."""
    value = row.get(key)
    if key not in row:
        raise DataError(f"{path}:{n}: missing keys [{key!r}] (expected a string or number in {key!r})")
    if value is None or value == "" or isinstance(value, dict | list):
        raise DataError(f"{path}:{n}: {key}: expected a string or number, got {_shown(value)}")
    return str(value)


def _some(rows: list | int, path: Source) -> None:
    if not rows:
        raise DataError(f"{path}: no rows (expected one JSON object per line)")


def read_beir(folder: Path) -> tuple[list[dict], list[dict], dict[str, dict[str, int]]]:
    """(corpus [{id, title, text}], queries [{id, text}], qrels {query_id: {doc_id: score}})."""
    corpus, queries = [], []
    path = member(folder, "corpus.jsonl")
    for n, r in _numbered_jsonl(path):
        _required(r, ("_id", "text"), path, n)
        title = _text(r, "title", path, n, optional=True) or ""
        corpus.append({"id": _scalar(r, "_id", path, n), "title": title, "text": _text(r, "text", path, n)})
    _some(corpus, path)
    path = member(folder, "queries.jsonl")
    for n, r in _numbered_jsonl(path):
        _required(r, ("_id", "text"), path, n)
        queries.append({"id": _scalar(r, "_id", path, n), "text": _text(r, "text", path, n)})
    _some(queries, path)
    return corpus, queries, _read_qrels(member(folder / "qrels", "test.tsv"))


def _read_qrels(path: Path) -> dict[str, dict[str, int]]:
    columns = ("query-id", "corpus-id", "score")
    qrels: dict[str, dict[str, int]] = {}
    with open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in columns if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(
                f"{path}:1: missing columns {missing} (expected a tab-separated header: {', '.join(columns)})"
            )
        for row in reader:
            n = reader.line_num
            for c in columns:
                if not (row.get(c) or "").strip():
                    raise DataError(f"{path}:{n}: {c}: expected a value (3 tab-separated columns), got none")
            try:
                score = int(row["score"])
            except ValueError:
                raise DataError(f"{path}:{n}: score: expected an integer, got {row['score']!r}") from None
            qrels.setdefault(row["query-id"], {})[row["corpus-id"]] = score
    if not qrels:
        raise DataError(f"{path}: no rows (expected query-id, corpus-id, score lines after the header)")
    return qrels


def read_corpus(path: Source) -> list[dict[str, Any]]:
    """[{id, text}] from an unlabelled JSONL corpus (extra keys such as ``label`` are ignored)."""
    return list(iter_corpus(path))


def iter_corpus(path: Source) -> Iterator[dict[str, Any]]:
    """``read_corpus``'s rows one at a time, for readers that must not hold a whole corpus."""
    count = 0
    for n, r in _numbered_jsonl(path):
        _required(r, ("id", "text"), path, n)
        count += 1
        yield {"id": _scalar(r, "id", path, n), "text": _text(r, "text", path, n)}
    _some(count, path)


def document_ids(path: Source) -> set[str]:
    """The document ids of a corpus: a JSONL file's ``id`` or a BEIR folder's ``corpus.jsonl`` ``_id``
    (``exclude`` keys: the documents an evaluation scores, left out of training)."""
    if isinstance(path, Path) and path.is_dir():
        corpus = member(path, "corpus.jsonl")
        return {_scalar(r, "_id", corpus, n) for n, r in _numbered_jsonl(corpus) if "_id" in r}
    return {doc["id"] for doc in iter_corpus(path)}


def read_labelled(path: Path, text_field: str = "text", label_field: str = "label") -> list[dict[str, Any]]:
    """[{id, text, label}] from a labelled JSONL file: a non-empty string in ``text_field`` and a
    string or number in ``label_field`` (kept as a string) per row; ``id`` defaults to the line number."""
    rows = []
    for n, r in _numbered_jsonl(path):
        _required(r, (text_field, label_field), path, n)
        text, label = _text(r, text_field, path, n), _scalar(r, label_field, path, n)
        rows.append({"id": _scalar(r, "id", path, n) if "id" in r else str(n), "text": text, "label": label})
    _some(rows, path)
    return rows


def verify_checksums(folder: Path) -> list[str]:
    """Check every file under ``folder`` that a ``SHA256SUMS`` in it or its parent lists; a file
    shipped gzipped (``name.gz``) is checked by its decompressed bytes.

    Returns the checked paths; raises ``DataError`` naming the first file whose hash differs.
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
            raise DataError(f"{path}: SHA-256 differs from {sums}; use the published files as they are")
        checked.append(name)
    return checked


def read_rows(path: Source) -> list[dict[str, Any]]:
    """Rows of a parquet file, a JSONL file, a finished speed-ray step folder (its manifest's parquet
    shards, such as ``synth/train``) or a ``datasets`` folder saved with ``save_to_disk``."""
    return [row for _, row in _numbered_rows(path)]


def _numbered_rows(path: Source) -> Iterator[tuple[int, dict[str, Any]]]:
    """(n, row), one at a time: n is the line of a JSONL file, the row (from 1) of a table or step
    folder (read a shard or a record batch at a time)."""
    numbered = (
        enumerate(_table_rows(path), 1)
        if path.suffix == ".parquet" or path.is_dir()
        else _numbered_jsonl(path)
    )
    count = 0
    for n, row in numbered:
        count += 1
        yield n, row
    if not count:
        raise DataError(f"{path}: no rows")


def _table_rows(path: Source) -> Iterator[dict[str, Any]]:
    """The rows of a step folder, a ``datasets`` folder or a parquet file, a batch at a time (on
    object storage: a parquet file)."""
    import pyarrow.parquet as pq

    if isinstance(path, RemoteFile):
        with _remote(path).open_random() as f:
            yield from _parquet_rows(f, path)
        return
    manifest = path / "_manifest.json"
    if manifest.is_file():
        for f in json.loads(manifest.read_text())["files"]:
            for batch in pq.ParquetFile(path / f["name"]).iter_batches(batch_size=4096):
                yield from batch.to_pylist()
    elif path.is_dir():
        from datasets import load_from_disk

        try:
            ds = load_from_disk(str(path))
        except FileNotFoundError:
            raise DataError(
                f"{path}: a folder, but neither a finished speed-ray step (no _manifest.json) nor a "
                "datasets folder saved with save_to_disk; expected one of those, or a parquet or JSONL file"
            ) from None
        for batch in ds.with_format("arrow").iter(batch_size=4096):
            yield from batch.to_pylist()
    elif path.suffix == ".parquet":
        yield from _parquet_rows(path, path)


def _parquet_rows(source: Any, path: Source) -> Iterator[dict[str, Any]]:
    """The rows of the parquet file ``source`` (a path or an open file), a batch at a time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        for batch in pq.ParquetFile(source).iter_batches(batch_size=4096):
            yield from batch.to_pylist()
    except pa.ArrowInvalid as e:
        raise DataError(f"{path}: not a readable parquet file ({e})") from None


def read_pairs(path: Source) -> list[dict[str, Any]]:
    """Pairs in the sentence-transformers convention: ``anchor``, ``positive`` and optional hard
    negatives in ``negative`` / ``negative_1``, ``negative_2``... columns (empty ones are skipped),
    from parquet, JSONL, a step folder (``synth/train``) or a ``datasets`` folder saved with
    ``save_to_disk``."""
    return list(iter_pairs(path))


def iter_pairs(path: Source) -> Iterator[dict[str, Any]]:
    """``read_pairs``'s rows one at a time, for readers that must not hold a whole file. A JSONL row
    may omit negative columns that others have: each row's own are taken, in column order."""
    for n, r in _numbered_rows(path):
        _required(r, ("anchor", "positive"), path, n)
        anchor, positive = _text(r, "anchor", path, n), _text(r, "positive", path, n)
        columns = sorted((k for k in r if k.startswith("negative")), key=_negative_order)
        negs = [_text(r, k, path, n, optional=True) for k in columns]
        yield {"anchor": anchor, "positive": positive, "negatives": [x for x in negs if x]}


def _negative_order(column: str) -> int:
    """negative, negative_1, negative_2, ... in that order (negative_10 after negative_9)."""
    suffix = column.removeprefix("negative").lstrip("_")
    return int(suffix) if suffix.isdigit() else 0


# Seeded selections, each from its own named stream of ``random.Random`` (one never shifts another).


def shuffled(items: Iterable[Any], stream: str) -> list[Any]:
    """``items`` in the order of one seeded shuffle."""
    order = list(items)
    random.Random(stream).shuffle(order)
    return order


def nested_sample(rows: Sequence[Any], n: int, seed: int) -> Sequence[Any]:
    """``n`` rows (all when 0 or more than there are) in their input order: the first ``n`` of one
    seeded shuffle, so with the same rows and seed the sample for a smaller ``n`` lies inside the
    sample for a larger one (training-data sizes for a scaling curve)."""
    if not n or n >= len(rows):
        return rows
    return [rows[i] for i in sorted(shuffled(range(len(rows)), f"nested-{seed}")[:n])]


def holdout_ids(ids: list[str], fraction: float, seed: int) -> set[str]:
    """The held-out ``fraction`` of ``ids``, the first of one seeded shuffle of them all: the same file
    and seed give the same split for training (``embed.data.holdout_fraction``) and for eval's kNN
    task (``split: holdout``)."""
    order = shuffled(sorted(set(ids)), f"holdout-{seed}")
    return set(order[: round(fraction * len(order))])


def sample_rows(rows: list[dict], max_rows: int, seed: int) -> list[dict]:
    """A seeded sample of ``max_rows`` rows in file order (all when 0 or more than there are). Not
    nested: it fixes eval's sampled query and document sets, which the scores in docs/ were measured
    on, so it keeps ``random.sample``'s draw."""
    if not max_rows or max_rows >= len(rows):
        return rows
    keep = sorted(random.Random(f"sample-{seed}").sample(range(len(rows)), max_rows))
    return [rows[i] for i in keep]


def read_chat_rows(path: Path, text_keys: tuple[str, ...]) -> list[dict[str, Any]]:
    """A user's alignment data: ``messages`` (a chat prompt: a list of ``{role, content}`` objects, or
    its JSON) plus the non-empty string columns ``text_keys``; ``messages`` comes back as JSON."""
    out = []
    for n, r in _numbered_rows(path):
        _required(r, ("messages", *text_keys), path, n)
        msgs = _messages(r["messages"], "messages", path, n)
        for k in text_keys:
            _text(r, k, path, n)
        out.append({"messages": json.dumps(msgs)} | {k: r[k] for k in text_keys})
    return out


def read_preference_rows(path: Path) -> list[dict[str, Any]]:
    """A user's preference pairs in TRL's conversational preference format: ``prompt`` (a list of
    ``{role, content}`` messages), ``chosen`` and ``rejected`` (the assistant's answers, as messages).

    Also taken: speed-ray's earlier form, ``messages`` for the prompt (or its JSON) and ``chosen`` /
    ``rejected`` as plain strings; a string answer becomes one assistant message.
    """
    out = []
    for n, r in _numbered_rows(path):
        key = "prompt" if "prompt" in r or "messages" not in r else "messages"
        _required(r, (key, "chosen", "rejected"), path, n)
        row = {"prompt": _messages(r[key], key, path, n)}
        for k in ("chosen", "rejected"):
            if isinstance(r[k], str):
                row[k] = assistant(str(_text(r, k, path, n)))
            else:
                row[k] = _messages(r[k], k, path, n)
        out.append(row)
    return out


def _messages(value: Any, key: str, path: Path, n: int) -> list[dict[str, str]]:
    """A chat (a list of ``{role, content}`` objects, or its JSON) as plain ``{role, content}`` dicts."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{path}:{n}: {key} is a string but not JSON") from None
    if not (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in value
        )
    ):
        raise DataError(f"{path}:{n}: {key}: expected a non-empty list of {{role, content}} objects")
    return [{"role": m["role"], "content": m["content"]} for m in value]
