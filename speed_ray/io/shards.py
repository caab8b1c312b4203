"""Resumable stage output: fixed shards of input rows, laid out on disk first and written as their
outputs complete.

A generation step's input rows (each with a stable ``id``) are cut, in order, into shards of
``shard_rows`` (``lay_out``). Rows that need a model call go to ``_requests/shard_NNNNN.parquet`` with
their shard number; Ray Data reads those files on the workers, so the driver never holds the whole
input, and ``_plan.json`` records the layout. Outputs stream back in any order; when every output of
a shard has arrived, the shard is sorted by (id, sample) and written whole as ``shard_NNNNN.parquet``
(temp file, then rename), then its entry (rows, SHA-256, accounting) as ``_done/shard_NNNNN.json``.
The manifest comes last.

A killed run leaves finished shards and no manifest. The rerun checks the plan, keeps every shard
whose file still has its recorded checksum, byte for byte, and sends only the other shards' rows to
the engine: a shard that is missing, truncated or corrupted is generated again, so no row is lost or
written twice. Totals cover the shards of earlier, killed runs too.

Steps after generation are derived shard by shard: shard ``s`` of such a step is made from shard
``s`` of the steps it reads (``write_derived``), on a worker, and written with the same record. A
generation step writes all outputs of an input row into that row's shard, so every sample of a prompt
lies in one shard, and a step that needs a prompt's samples together (the judge, the pairs, the
drafts) finds them there: grouping by prompt id needs no shuffle across shards. No Ray here.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import shutil
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speed_ray.io.schemas import (
    replacing,
    sha256_file,
    shard_name,
    validate_table,
    write_json_atomic,
    write_manifest,
    write_shard,
)

logger = logging.getLogger(__name__)

PLAN = "_plan.json"
REQUESTS = "_requests"
DONE = "_done"


@dataclass
class Layout:
    """What ``lay_out`` found and wrote: the size of every shard, the shards already finished, the
    request files of the others, and their rows that need no model call (with their shard)."""

    sizes: list[int]
    done: set[int]
    request_files: list[str] = field(default_factory=list)
    ready: list[dict[str, Any]] = field(default_factory=list)


def lay_out(
    out_dir: Path,
    rows: Iterable[dict[str, Any]],
    shard_rows: int,
    ready: Callable[[dict[str, Any]], bool] | None = None,
) -> Layout:
    """Stream ``rows`` into shards: the unfinished shards' model-call rows into request files, their
    ``ready`` rows into memory (they are few: STS tasks). Refuses a plan that differs from the one an
    unfinished earlier run recorded."""
    requests = out_dir / REQUESTS
    layout = Layout(sizes=[], done=start_requests(out_dir))
    ids_hash = hashlib.sha256()
    it = iter(rows)
    for s in itertools.count():
        chunk = list(itertools.islice(it, shard_rows))
        if not chunk:
            break
        ids_hash.update(unique_ids(chunk, f"{out_dir.name}: input row", s))
        layout.sizes.append(len(chunk))
        if s in layout.done:
            continue
        calls: list[dict[str, Any]] = []
        for r in chunk:  # ``ready`` is asked once per row
            (layout.ready if ready is not None and ready(r) else calls).append(r | {"shard": s})
        if calls:
            path = requests / shard_name(s)
            pq.write_table(pa.Table.from_pylist(calls), path)
            layout.request_files.append(str(path))
    plan = {
        "shard_rows": shard_rows,
        "num_shards": len(layout.sizes),
        "num_input_rows": sum(layout.sizes),
        "ids_sha256": ids_hash.hexdigest(),
    }
    _keep_plan(out_dir, plan)
    return layout


def start_requests(out_dir: Path) -> set[int]:
    """Make the step folder and an empty request folder (requests left by a killed run are made
    again); the shards an earlier run finished."""
    out_dir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(out_dir / REQUESTS, ignore_errors=True)
    (out_dir / REQUESTS).mkdir()
    return finished_shards(out_dir)


def unique_ids(rows: list[dict[str, Any]], what: str, s: int) -> bytes:
    """The ids of one shard's rows, one per line (what the plan hashes); a repeated id is an error
    naming ``what`` and the shard."""
    ids = [r["id"] for r in rows]
    if len(set(ids)) != len(ids):
        dup = next(i for i in ids if ids.count(i) > 1)
        raise ValueError(f"{what} id {dup!r} appears twice (shard {s})")
    return ("\n".join(ids) + "\n").encode()


def _keep_plan(out_dir: Path, plan: dict[str, Any]) -> None:
    """Record the step's shard plan, or refuse one that differs from an unfinished earlier run's."""
    path = out_dir / PLAN
    if not path.is_file():
        write_json_atomic(path, plan)
        return
    old = json.loads(path.read_text())
    if old != plan:
        raise ValueError(
            f"{out_dir}: an unfinished earlier run of this step had other inputs "
            f"({old['num_input_rows']} rows in {old['num_shards']} shards, now "
            f"{plan['num_input_rows']} in {plan['num_shards']}); delete {out_dir} "
            "to start the step over, or restore the earlier config"
        )


def finished_shards(out_dir: Path) -> set[int]:
    """Shards written by an earlier run whose file still has the checksum recorded when it was
    written. Any other shard file (truncated, corrupted, or written without its record) is removed."""
    done = set()
    for path in sorted(out_dir.glob("shard_*.parquet")):
        record = record_path(out_dir, path)
        ok = record.is_file() and json.loads(record.read_text())["sha256"] == sha256_file(path)
        if ok:
            done.add(int(path.stem.split("_")[1]))
        else:
            logger.warning(
                f"{out_dir.name}: {path.name} does not match its recorded checksum; generating it again"
            )
            path.unlink()
    return done


def record_path(out_dir: Path, shard: Path) -> Path:
    """Where a written shard's record (rows, SHA-256, accounting) lies."""
    return out_dir / DONE / (shard.stem + ".json")


class ShardedWriter:
    def __init__(self, out_dir: Path, schema: pa.Schema, layout: Layout, outputs_per_id: int) -> None:
        self.out_dir, self.schema, self.outputs_per_id = out_dir, schema, outputs_per_id
        self.sizes, self.done = layout.sizes, set(layout.done)
        self.buffers: dict[int, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
        self.written_now = 0
        (out_dir / DONE).mkdir(exist_ok=True)
        for s, size in enumerate(self.sizes):  # a shard with no input row is complete already
            if size == 0 and s not in self.done:
                self._write(s)

    def add(self, table: pa.Table) -> None:
        """Buffer a table of outputs (each row with its ``shard``); write every shard now complete."""
        touched = set()
        for row in table.to_pylist():
            s = row["shard"]
            if not 0 <= s < len(self.sizes) or s in self.done:
                raise ValueError(
                    f"{self.out_dir.name}: output {row['id']!r} for shard {s}, which is not pending"
                )
            # Keyed by (id, sample): a batch that Ray retried replaces its first copy.
            self.buffers[s][(row["id"], row.get("sample", 0))] = row
            touched.add(s)
        for s in sorted(touched):
            expected = self.sizes[s] * self.outputs_per_id
            if len(self.buffers[s]) > expected:
                raise ValueError(
                    f"{self.out_dir.name}: shard {s} got {len(self.buffers[s])} distinct outputs, "
                    f"expected {expected}"
                )
            if len(self.buffers[s]) == expected:
                self._write(s)

    def _write(self, s: int) -> None:
        rows = [row for _, row in sorted(self.buffers.pop(s, {}).items())]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        write_record(self.out_dir, s, table, self.schema, accounting(table))
        self.done.add(s)
        self.written_now += len(rows)
        logger.info(f"{self.out_dir.name}: shard {s + 1}/{len(self.sizes)} written ({len(self.done)} done)")

    def finish(self, extra: dict[str, Any], started: float, prices: tuple[float, float] = (0, 0)) -> dict:
        """Check that every shard is written, then write the manifest with per-shard accounting and
        remove the request files. The shard records stay: if a shard is damaged later, the step is
        done again for that shard alone."""
        missing = [s for s in range(len(self.sizes)) if s not in self.done]
        if missing:
            short = {s: len(self.buffers[s]) for s in missing[:5]}
            raise RuntimeError(
                f"{self.out_dir.name}: the engine returned no output for some rows of shards {missing[:5]} "
                f"(outputs so far: {short}); rerun to retry them, finished shards are kept"
            )
        files = records(self.out_dir, len(self.sizes))
        elapsed = max(time.time() - started, 1e-9)
        accounting = totals(files, prices) | {"rows_per_s": round(self.written_now / elapsed, 2)}
        manifest = write_manifest(
            self.out_dir, self.schema, files, extra | {"accounting": accounting}, started
        )
        shutil.rmtree(self.out_dir / REQUESTS, ignore_errors=True)
        return manifest


def write_record(out_dir: Path, s: int, table: pa.Table, schema: pa.Schema, extra: dict[str, Any]) -> dict:
    """Write shard ``s`` of a step whole, then its record (rows, SHA-256 and ``extra``): a shard without
    its record is not finished (``finished_shards``)."""
    path = out_dir / shard_name(s)
    entry = write_shard(path, table, schema) | extra
    write_json_atomic(record_path(out_dir, path), entry)
    return entry


def records(out_dir: Path, num_shards: int) -> list[dict[str, Any]]:
    """The records of shards ``0..num_shards-1``, all written."""
    return [json.loads(record_path(out_dir, out_dir / shard_name(s)).read_text()) for s in range(num_shards)]


def read_shard(step_dir: Path, s: int, schema: pa.Schema) -> pa.Table:
    """Shard ``s`` of a finished step, checked against ``schema``."""
    path = step_dir / shard_name(s)
    return validate_table(pq.read_table(path), schema, f"{step_dir.name}/{path.name}")


def write_derived(
    out_dir: Path,
    s: int,
    reads: list[tuple[Path, pa.Schema]],
    fn: Callable[..., tuple[pa.Table, dict[str, Any]]],
    schema: pa.Schema,
    kwargs: dict[str, Any],
) -> int:
    """Shard ``s`` of a derived step: ``fn`` over shard ``s`` of each step in ``reads`` (in order, then
    ``kwargs``) gives the rows and their counts, written with the counts in the shard's record.
    Returns the rows written."""
    table, counts = fn(*(read_shard(d, s, sc) for d, sc in reads), **kwargs)
    write_record(out_dir, s, table, schema, {"counts": counts})
    return table.num_rows


def finish_derived(
    out_dir: Path, schema: pa.Schema, num_shards: int, extra: dict[str, Any], started: float, written: int
) -> dict:
    """The manifest of a derived step whose shards are all written: its files, and the shards' counts
    summed (``add_counts``) beside ``extra``."""
    files = records(out_dir, num_shards)
    counts: dict[str, Any] = {}
    for f in files:
        counts = add_counts(counts, f.pop("counts", {}))
    elapsed = max(time.time() - started, 1e-9)
    extra = counts | extra | {"rows_per_s": round(written / elapsed, 2)}
    return write_manifest(out_dir, schema, files, extra, started)


def add_counts(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """``a`` + ``b`` key by key: numbers add, nested dicts (counts by reason) add the same way, lists
    (a few sample rows) join."""
    out = dict(a)
    for k, v in b.items():
        out[k] = add_counts(out.get(k, {}), v) if isinstance(v, dict) else out.get(k, type(v)()) + v
    return out


def requests_plan(out_dir: Path, sizes: list[int], id_hashes: list[str], done: set[int]) -> Layout:
    """The layout of a generation step whose request files were written per input shard on the
    workers (``_requests/shard_s.parquet``, none for an empty shard): the plan recorded (or checked
    against an unfinished earlier run's) from each shard's size and ids' SHA-256."""
    plan = {
        "shard_rows": None,  # one shard per shard of the step read
        "num_shards": len(sizes),
        "num_input_rows": sum(sizes),
        "ids_sha256": hashlib.sha256("".join(id_hashes).encode()).hexdigest(),
    }
    _keep_plan(out_dir, plan)
    files = [str(out_dir / REQUESTS / shard_name(s)) for s, n in enumerate(sizes) if n and s not in done]
    return Layout(sizes=sizes, done=done, request_files=files)


def write_requests(
    out_dir: Path,
    s: int,
    reads: list[tuple[Path, pa.Schema]],
    fn: Callable[..., list[dict[str, Any]]],
    kwargs: dict[str, Any],
    done: set[int],
) -> tuple[int, str]:
    """The engine requests made by ``fn`` from shard ``s`` of ``reads``, written (with their shard) to
    the step's request file unless shard ``s`` is finished. Returns their number and ids' SHA-256."""
    rows = fn(*(read_shard(d, s, sc) for d, sc in reads), **kwargs)
    ids = unique_ids(rows, f"{out_dir.name}: request", s)
    if rows and s not in done:
        path = out_dir / REQUESTS / shard_name(s)
        with replacing(path) as tmp:
            pq.write_table(pa.Table.from_pylist([r | {"shard": s} for r in rows]), tmp)
    return len(rows), hashlib.sha256(ids).hexdigest()


def with_shard(outputs: pa.Table, inputs: pa.Table) -> pa.Table:
    """``outputs`` with the ``shard`` of the input row each came from (by id), when inputs carry one."""
    if "shard" not in inputs.column_names:
        return outputs
    shard_of = dict(zip(inputs["id"].to_pylist(), inputs["shard"].to_pylist(), strict=True))
    return outputs.append_column(
        "shard", pa.array([shard_of[i] for i in outputs["id"].to_pylist()], pa.int64())
    )


def accounting(table: pa.Table) -> dict[str, int]:
    """Calls (distinct requests that reached an engine), tokens in and out, and error rows of one
    table of engine outputs. Rows without a ``generator`` needed no call (STS takes its topic)."""

    def total(col: str) -> int:
        return int(pc.sum(table[col]).as_py() or 0) if col in table.column_names else 0

    called = table.filter(pc.is_valid(table["generator"])) if "generator" in table.column_names else table
    return {
        "calls": len(set(called["id"].to_pylist())),
        "input_tokens": total("num_input_tokens"),
        "output_tokens": total("num_output_tokens"),
        "errors": table.num_rows - table["error"].null_count if "error" in table.column_names else 0,
    }


def totals(files: list[dict[str, Any]], prices: tuple[float, float]) -> dict[str, Any]:
    """Sum the shards' accounting; cost at (input, output) USD per million tokens."""
    out = {k: sum(f.get(k, 0) for f in files) for k in ("calls", "input_tokens", "output_tokens", "errors")}
    out["cost_usd"] = round((out["input_tokens"] * prices[0] + out["output_tokens"] * prices[1]) / 1e6, 4)
    return out
