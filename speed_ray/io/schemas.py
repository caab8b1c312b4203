"""One pyarrow schema per stage output, and the manifest that marks a stage complete.

Writers cast to the schema; readers validate against it. A stage writes its shards into a temporary
folder and renames it into place, then writes ``_manifest.json`` last: a folder with a manifest is a
finished stage, and a folder without one is never read.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import shutil
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

SCHEMA_VERSION = 1
MANIFEST = "_manifest.json"

_PROVENANCE = [
    pa.field("generator", pa.string()),
    pa.field("prompt_id", pa.string()),
    pa.field("seed", pa.int64()),
    pa.field("round", pa.string()),
]
_ACCOUNTING = [
    pa.field("num_input_tokens", pa.int64()),
    pa.field("num_output_tokens", pa.int64()),
]

TASKS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("topic", pa.string()),
        pa.field("task_type", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("task", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("error", pa.string()),
        *_PROVENANCE,
        *_ACCOUNTING,
    ]
)

GENERATIONS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample", pa.int64()),
        pa.field("topic", pa.string()),
        pa.field("task_type", pa.string()),
        pa.field("kind", pa.string()),
        pa.field("task", pa.string()),
        pa.field("messages", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("instruction", pa.string()),
        pa.field("query", pa.string()),
        pa.field("positive", pa.string()),
        pa.field("negative", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
        *_PROVENANCE,
        *_ACCOUNTING,
    ]
)

# The judge's verdict on the k samples of one example prompt (``example_id`` is the generations id).
JUDGMENTS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("example_id", pa.string()),
        pa.field("samples", pa.int64()),
        pa.field("best", pa.int64()),
        pa.field("worst", pa.int64()),
        pa.field("reason", pa.string()),
        pa.field("raw", pa.string()),
        pa.field("error", pa.string()),
        *_PROVENANCE,
        *_ACCOUNTING,
    ]
)

EXAMPLES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("instruction", pa.string()),
        pa.field("query", pa.string()),
        pa.field("positive", pa.string()),
        pa.field("negative", pa.string()),
        pa.field("task_type", pa.string()),
        pa.field("topic", pa.string()),
        *_PROVENANCE,
        *_ACCOUNTING,
    ]
)

# The embedding training set in the sentence-transformers convention: every column is a text the
# trainer embeds (SentenceTransformerTrainer feeds all columns to the loss), so nothing else is here.
# ``anchor`` carries the task instruction (``Instruct: {instruction}\nQuery: {query}``); an empty
# ``negative`` means the row has none.
TRIPLETS = pa.schema(
    [
        pa.field("anchor", pa.string()),
        pa.field("positive", pa.string()),
        pa.field("negative", pa.string()),
    ]
)

# What the retriever found for each example (``synth/neighbours``): the score and rank of the row's own
# positive among the corpus (rank 1: nothing scores higher), and the top-k corpus texts by cosine with
# their scores, best first.
NEIGHBOURS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("positive_score", pa.float64()),
        pa.field("rank", pa.int64()),
        pa.field("candidates", pa.list_(pa.string())),
        pa.field("scores", pa.list_(pa.float64())),
    ]
)

# The examples the quality filters kept (``synth/filtered``): ``negative`` is the row's own negative
# where the filters kept it (else null), ``mined_negatives`` the hard negatives mined for it, and
# ``rank`` its positive's rank for its query (null when nothing ranked the corpus).
FILTERED = pa.schema(
    [
        *EXAMPLES,
        pa.field("mined_negatives", pa.list_(pa.string())),
        pa.field("rank", pa.int64()),
    ]
)


def triplets_schema(negatives: int) -> pa.Schema:
    """TRIPLETS, or for rows with more than one negative sentence-transformers' ``negative_1`` ..
    ``negative_n`` columns (an empty one: the row has fewer)."""
    if negatives <= 1:
        return TRIPLETS
    names = ["anchor", "positive", *(f"negative_{i}" for i in range(1, negatives + 1))]
    return pa.schema([pa.field(n, pa.string()) for n in names])


# Documents of a corpus: what crops are cut from (``embed``) and what grounded queries are written for
# and mined from (``synth/documents``).
DOCUMENTS = pa.schema(
    [pa.field("id", pa.string(), nullable=False), pa.field("text", pa.string(), nullable=False)]
)

# Grounded queries (``synth/queries``): one row per chunk of a document, with the query the generator
# wrote for each kind (null where not asked or invalid).
QUERY_KINDS = ("keyword", "question", "paraphrase")
QUERIES = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("sample", pa.int64()),
        pa.field("doc_id", pa.string()),
        pa.field("text", pa.string()),
        pa.field("raw", pa.string()),
        *(pa.field(kind, pa.string()) for kind in QUERY_KINDS),
        pa.field("error", pa.string()),
        *_PROVENANCE,
        *_ACCOUNTING,
    ]
)

# A chat as TRL's conversational datasets hold it: a list of {role, content} messages.
MESSAGES = pa.list_(pa.struct([pa.field("role", pa.string()), pa.field("content", pa.string())]))

# Preference pairs in TRL's conversational preference format (DPOTrainer takes them as they are and
# applies the chat template itself): ``prompt`` the chat, ``chosen`` and ``rejected`` one assistant
# message each. ``id`` and ``reason`` are provenance, which TRL drops (remove_unused_columns).
PREFERENCE_PAIRS = pa.schema(
    [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt", MESSAGES),
        pa.field("chosen", MESSAGES),
        pa.field("rejected", MESSAGES),
        pa.field("reason", pa.string()),
    ]
)


def error_kind(error: str) -> str:
    """The kind of an ``error`` (the column of TASKS, GENERATIONS and JUDGMENTS): its first words,
    without the details (``invalid JSON``, ``best and worst are the same output``, ``missing or empty
    field``)."""
    return re.sub(r"\s*\(.*$", "", error.split(":")[0].split("'")[0]).strip()


# The anchor of a training row and a decoder's query (SPEED/E5 §3.3): the task instruction, then the
# query; documents carry none.


def query_prefix(instruction: str) -> str:
    return f"Instruct: {instruction}\nQuery: "


def instructed_query(instruction: str | None, query: str) -> str:
    """``Instruct: {instruction}\nQuery: {query}`` (SPEED/E5); the bare query without an instruction."""
    return query_prefix(instruction) + query if instruction else query


def split_query(text: str) -> tuple[str | None, str]:
    """(instruction, query) of an ``instructed_query`` text; (None, text) for a text without one."""
    head, sep, query = text.partition("\nQuery: ")
    if sep and head.startswith("Instruct: ") and len(head) > len("Instruct: "):
        return head.removeprefix("Instruct: "), query
    return None, text


def assistant(text: str) -> list[dict[str, str]]:
    """A completion as TRL's conversational datasets hold it: one assistant message."""
    return [{"role": "assistant", "content": text}]


def cast_rows(rows: list[dict[str, Any]], schema: pa.Schema) -> pa.Table:
    """Rows (dicts) -> a table of exactly ``schema``: missing columns become null; an extra column or
    a value of the wrong type is a ValueError that names the column."""
    extra = {k for r in rows for k in r} - set(schema.names)
    if extra:
        raise ValueError(f"columns not in the schema: {sorted(extra)}")
    columns = []
    for field in schema:
        try:
            columns.append(pa.array([r.get(field.name) for r in rows], type=field.type))
        except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
            raise ValueError(f"column {field.name}: expected {field.type} values ({e})") from None
    return pa.Table.from_arrays(columns, schema=schema)


def validate_table(table: pa.Table, schema: pa.Schema, source: str) -> pa.Table:
    missing = [n for n in schema.names if n not in table.column_names]
    if missing:
        raise ValueError(f"{source}: missing columns {missing} (expected the {schema.names} schema)")
    return table.select(schema.names).cast(schema)


def write_stage(
    out_dir: Path, tables: Iterable[pa.Table], schema: pa.Schema, extra: dict[str, Any], started: float
) -> dict:
    """Write ``tables`` (streamed, one shard each) as ``shard_00000.parquet``..., then the manifest.

    ``started`` is the stage's start time (``time.time()``): the manifest records the duration.
    """
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        files = [write_shard(tmp / shard_name(i), table, schema) for i, table in enumerate(tables)]
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out_dir, ignore_errors=True)
    tmp.rename(out_dir)
    return write_manifest(out_dir, schema, files, extra, started)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


def write_shard(path: Path, table: pa.Table, schema: pa.Schema) -> dict[str, Any]:
    """Write one shard whole or not at all (temp file, then rename); returns its manifest entry."""
    with replacing(path) as tmp:
        # zstd: small files, fast to read; one row group per shard, the shards are small.
        pq.write_table(validate_table(table, schema, path.name), tmp, compression="zstd")
    return {"name": path.name, "num_rows": table.num_rows, "sha256": sha256_file(path)}


def write_manifest(
    out_dir: Path, schema: pa.Schema, files: list[dict[str, Any]], extra: dict[str, Any], started: float
) -> dict:
    """The manifest marks the stage finished, so it is written last."""
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "schema": schema.names,
        "num_rows": sum(f["num_rows"] for f in files),
        "files": files,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "duration_s": round(time.time() - started, 2),
        **extra,
    }
    write_json_atomic(out_dir / MANIFEST, manifest)
    return manifest


@contextlib.contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temp path beside ``path`` to write to: renamed over ``path`` when the block ends, removed if
    it fails (a full disk, a kill signal turned exception), so ``path`` is whole or untouched."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_text_atomic(path: Path, text: str) -> None:
    with replacing(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, default=str))


def read_manifest(stage_dir: Path) -> dict | None:
    path = stage_dir / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def finished_manifest(stage_dir: Path) -> dict:
    """The manifest of a finished stage; raises if the stage has none."""
    manifest = read_manifest(stage_dir)
    if manifest is None:
        raise FileNotFoundError(
            f"{stage_dir}: no {MANIFEST}: that step has not finished; run its stage first"
        )
    return manifest


def read_stage(stage_dir: Path, schema: pa.Schema) -> pa.Table:
    """All shards of a finished stage, validated; raises if the stage has no manifest."""
    manifest = finished_manifest(stage_dir)
    tables = [
        validate_table(pq.read_table(stage_dir / f["name"]), schema, f["name"]) for f in manifest["files"]
    ]
    return pa.concat_tables(tables) if tables else schema.empty_table()


def stage_shards(stage_dir: Path, schema: pa.Schema, columns: list[str] | None = None) -> Iterator[pa.Table]:
    """The shards of a finished stage one at a time (only ``columns``, when given), validated; for
    readers that must not hold a whole step."""
    for f in finished_manifest(stage_dir)["files"]:
        table = pq.read_table(stage_dir / f["name"], columns=columns)
        yield validate_table(
            table, pa.schema([schema.field(c) for c in columns]) if columns else schema, f["name"]
        )


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
