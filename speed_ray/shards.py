"""Resumable stage output: fixed shards of input rows, written as their outputs complete.

A generation step's input rows (each with a stable ``id``) are cut, in order, into shards of
``shard_rows``. Outputs stream back in any order; when every output of a shard has arrived, the shard
is sorted by (id, sample) and written whole as ``shard_NNNNN.parquet`` (temp file, then rename). The
manifest comes last. A killed run leaves finished shards and no manifest; the rerun reads
``_plan.json``, keeps those shards byte for byte and sends only the other shards' rows to the engine,
so no row is lost or written twice.

Each shard's manifest entry carries its accounting (calls, tokens, errors), so totals cover the shards
of earlier, killed runs too. No Ray here: the caller streams tables in.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from speed_ray.pipeline.common import log
from speed_ray.schemas import sha256_file, shard_name, write_json_atomic, write_manifest, write_shard

PLAN = "_plan.json"


class ShardedWriter:
    def __init__(
        self, out_dir: Path, schema: pa.Schema, ids: list[str], shard_rows: int, outputs_per_id: int
    ) -> None:
        self.out_dir, self.schema, self.outputs_per_id = out_dir, schema, outputs_per_id
        self.shards = [ids[i : i + shard_rows] for i in range(0, len(ids), shard_rows)]
        self.shard_of = {rid: s for s, shard in enumerate(self.shards) for rid in shard}
        if len(self.shard_of) != len(ids):
            raise ValueError(f"{out_dir.name}: input row ids are not unique")
        self.buffers: dict[int, dict[tuple[str, int], dict[str, Any]]] = defaultdict(dict)
        self.written_now = 0
        self.entries: dict[int, dict[str, Any]] = {}
        """Manifest entries of the shards this run wrote (earlier runs' shards are read back at the end)."""
        self._check_plan(shard_rows, ids)
        self.done = {s for s in range(len(self.shards)) if (out_dir / shard_name(s)).is_file()}

    def _check_plan(self, shard_rows: int, ids: list[str]) -> None:
        plan = {
            "shard_rows": shard_rows,
            "num_shards": len(self.shards),
            "num_input_rows": len(ids),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest(),
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / PLAN
        if path.is_file():
            old = json.loads(path.read_text())
            if old != plan:
                raise ValueError(
                    f"{self.out_dir}: an unfinished earlier run of this step had other inputs "
                    f"({old['num_input_rows']} rows in shards of {old['shard_rows']}, now "
                    f"{plan['num_input_rows']} in shards of {plan['shard_rows']}); delete {self.out_dir} "
                    "to start the step over, or restore the earlier config"
                )
        else:
            write_json_atomic(path, plan)

    def pending_ids(self) -> set[str]:
        """Ids whose shard is not written yet (all of them on a fresh run)."""
        return {rid for s, shard in enumerate(self.shards) if s not in self.done for rid in shard}

    def add(self, table: pa.Table) -> None:
        """Buffer a table of outputs; write every shard that is now complete."""
        touched = set()
        for row in table.to_pylist():
            s = self.shard_of.get(row["id"])
            if s is None or s in self.done:
                raise ValueError(f"{self.out_dir.name}: output for unexpected row id {row['id']!r}")
            # Keyed by (id, sample): a batch that Ray retried replaces its first copy.
            self.buffers[s][(row["id"], row.get("sample", 0))] = row
            touched.add(s)
        for s in sorted(touched):
            if len(self.buffers[s]) == len(self.shards[s]) * self.outputs_per_id:
                self._write(s)

    def _write(self, s: int) -> None:
        rows = [row for _, row in sorted(self.buffers.pop(s).items())]
        table = pa.Table.from_pylist(rows, schema=self.schema)
        self.entries[s] = write_shard(self.out_dir / shard_name(s), table, self.schema) | accounting(table)
        self.done.add(s)
        self.written_now += len(rows)
        log(f"{self.out_dir.name}: shard {s + 1}/{len(self.shards)} written ({len(self.done)} done)")

    def finish(self, extra: dict[str, Any], started: float, prices: tuple[float, float] = (0, 0)) -> dict:
        """Check that every shard is written, then write the manifest with per-shard accounting."""
        missing = [s for s in range(len(self.shards)) if s not in self.done]
        if missing:
            short = {s: len(self.buffers[s]) for s in missing[:5]}
            raise RuntimeError(
                f"{self.out_dir.name}: the engine returned no output for some rows of shards {missing[:5]} "
                f"(outputs so far: {short}); rerun to retry them, finished shards are kept"
            )
        files = [
            self.entries[s] if s in self.entries else shard_entry(self.out_dir / shard_name(s))
            for s in range(len(self.shards))
        ]
        elapsed = max(time.time() - started, 1e-9)
        accounting = totals(files, prices) | {"rows_per_s": round(self.written_now / elapsed, 2)}
        return write_manifest(self.out_dir, self.schema, files, extra | {"accounting": accounting}, started)


def shard_entry(path: Path) -> dict[str, Any]:
    """A written shard's manifest entry: size, checksum and accounting read back from the file."""
    table = pq.read_table(path)
    entry = {"name": path.name, "num_rows": table.num_rows, "sha256": sha256_file(path)}
    return entry | accounting(table)


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
