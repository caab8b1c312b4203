"""The training data on disk, and each worker's share of it.

The driver streams its input once, a row at a time, into parquet shards under ``<run>/embed/data``
(``write_rows``, ``write_docs``): the rows of a synth run's training set or of a user's pairs file
(``TRAIN_ROWS``: ``embed.data.max_rows`` of them, in input order), or the documents of a corpus that
give a pair (``CORPUS_DOCS``, the held-out and excluded ones left out), or both (``mix``: rows with
a corpus's crop pairs, in one shuffle or the crops first each epoch). Neither the driver nor a worker holds the
whole set: a worker reads, one shard at a time, only the rows its slices of the next window of
global batches take (``WorkerBatches``), and crops a corpus document when its pair is needed, anew
each epoch. Global batch ``s`` is a function of the step alone (``speed_ray.embed.batches``), so a
resumed run takes exactly the batches an uninterrupted one takes.
"""

from __future__ import annotations

import bisect
import hashlib
import itertools
import json
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from speed_ray.embed.batches import batch_span, batch_start, epoch_batches, epoch_order
from speed_ray.embed.pairs import CropRule, build_pairs, sentence_crops
from speed_ray.io.schemas import DOCUMENTS

TRAIN_ROWS = pa.schema(
    [
        pa.field("instruction", pa.string()),
        pa.field("query", pa.string(), nullable=False),
        pa.field("positive", pa.string(), nullable=False),
        pa.field("negatives", pa.list_(pa.string()), nullable=False),
    ]
)
CORPUS_DOCS = DOCUMENTS
SHARD_ROWS = 50_000
"""Rows per shard of ``<run>/embed/data``: what a worker holds while it takes its rows from one."""
BATCH_ROWS = 4096
"""Rows the driver holds as Python objects while it writes a shard."""
WINDOW_ROWS = 32_768
"""Rows a worker reads ahead: its slices of as many global batches as make about this many."""


@dataclass(frozen=True)
class Shard:
    """One parquet shard of the training data: its file, its rows and what they are."""

    path: str
    rows: int
    kind: str
    """rows (``TRAIN_ROWS``) | docs (``CORPUS_DOCS``, a pair cropped from each, anew each epoch)."""


@dataclass(frozen=True)
class TrainingData:
    """The training data's shards as the workers see them (small: Ray pickles it to each)."""

    shards: tuple[Shard, ...]
    """In order: a row's index runs over the shards' rows in turn (a corpus's documents first)."""
    pair_mode: str = "crops"
    rule: CropRule = CropRule()
    seed: int = 0
    max_negatives: int = 0
    """The most hard negatives any row has."""
    order: str = "mixed"
    """mixed (docs and rows shuffled into the same batches) | first (each epoch takes every doc's
    pair, then every row: ``embed.data.crops_order``)."""

    def __len__(self) -> int:
        return sum(s.rows for s in self.shards)

    @property
    def counts(self) -> tuple[int, ...]:
        """Rows of each shard, in order."""
        return tuple(s.rows for s in self.shards)

    def count(self, kind: str) -> int:
        """Rows of the shards of ``kind`` (rows | docs)."""
        return sum(s.rows for s in self.shards if s.kind == kind)

    @property
    def parts(self) -> tuple[int, ...]:
        """``epoch_order``'s parts: the docs, then the rows, for order first; none for mixed."""
        return (self.count("docs"), self.count("rows")) if self.order == "first" else ()

    def read(self, epoch: int, indices: Iterable[int]) -> dict[int, dict[str, Any]]:
        """{index: row} of the rows at ``indices`` in the trainer's form (``instruction``, ``query``,
        ``positive``, ``negatives``), a shard at a time; a corpus document as epoch ``epoch``'s pair."""
        wanted, start = sorted(set(indices)), 0
        out: dict[int, dict[str, Any]] = {}
        for shard in self.shards:
            lo, hi = bisect.bisect_left(wanted, start), bisect.bisect_left(wanted, start + shard.rows)
            if hi > lo:
                table = pq.read_table(shard.path)
                rows = table.take([i - start for i in wanted[lo:hi]]).to_pylist()
                out |= {
                    i: self._trainer_row(r, shard.kind, epoch)
                    for i, r in zip(wanted[lo:hi], rows, strict=True)
                }
            start += shard.rows
        return out

    def all_rows(self, epoch: int = 0) -> list[dict[str, Any]]:
        """Every row in order (epoch ``epoch``'s pairs of a corpus): for tests and small sets only."""
        rows = self.read(epoch, range(len(self)))
        return [rows[i] for i in range(len(self))]

    def _trainer_row(self, row: dict[str, Any], kind: str, epoch: int) -> dict[str, Any]:
        if kind == "rows":
            return row
        # the draw for a document depends only on (seed, epoch, id): as if the whole corpus were cropped.
        # No hard negatives: the trainer masks the missing ones (``batch_texts``).
        pair = build_pairs([row], self.pair_mode, self.rule, self.seed, epoch)[0][0]
        return {"instruction": None, "query": pair["anchor"], "positive": pair["positive"], "negatives": []}


def mix(docs: TrainingData, rows: TrainingData, order: str) -> TrainingData:
    """A corpus's crop pairs (``docs``) and ``rows`` as one training set (``embed.data.crops``): the
    documents first, in ``order`` (mixed | first)."""
    return replace(docs, shards=docs.shards + rows.shards, max_negatives=rows.max_negatives, order=order)


class WorkerBatches:
    """This rank's slice of each global batch: rank ``r`` takes rows ``[r * per_worker, (r + 1) *
    per_worker)`` of global batch ``s``, read a window of batches at a time, so the worker holds at
    most ``WINDOW_ROWS`` rows (and one shard while reading), whatever the data's size."""

    def __init__(self, data: TrainingData, per_worker: int, world: int, rank: int, seed: int) -> None:
        self.data, self.per_worker, self.world, self.rank, self.seed = data, per_worker, world, rank, seed
        self.window = max(1, WINDOW_ROWS // per_worker)
        self._key: tuple[int, int] | None = None
        self._rows: dict[int, dict[str, Any]] = {}
        self.reads = 0
        """Windows read so far (each a pass over the shards)."""

    def __call__(self, step: int) -> tuple[int, list[dict[str, Any]]]:
        """(epoch, this rank's rows) of global batch ``step`` (1-based)."""
        n, parts = len(self.data), self.data.parts
        epoch, b = batch_span(n, step, self.per_worker * self.world, parts)
        order = epoch_order(n, self.seed, epoch, parts)
        if self._key != (epoch, b // self.window):
            self._key = (epoch, b // self.window)
            first = self._key[1] * self.window
            last = min(epoch_batches(n, self.per_worker * self.world, parts), first + self.window)
            self._rows = {}  # the last window goes before the next is read
            self._rows = self.data.read(
                epoch, (int(i) for c in range(first, last) for i in self._slice(order, c))
            )
            self.reads += 1
        return epoch, [self._rows[int(i)] for i in self._slice(order, b)]

    def _slice(self, order, b: int):
        start = batch_start(b, self.per_worker * self.world, self.data.parts) + self.rank * self.per_worker
        return order[start : start + self.per_worker]


def rows_digest(rows: list[dict[str, Any]]) -> str:
    """A short digest of a batch's rows (the history records each step's, rank 0's slice): two runs
    that took the same batches have the same digests."""
    return hashlib.sha1(json.dumps(rows, sort_keys=True).encode()).hexdigest()[:12]


def chunks(
    rows: Iterable[dict[str, Any]], schema: pa.Schema, shard_rows: int | None = None
) -> Iterator[pa.Table]:
    """``rows`` as tables of ``shard_rows``, one shard each, turned into Arrow ``BATCH_ROWS`` at a time
    (a shard's worth of Python rows at once would be the driver's biggest buffer)."""
    it, shard_rows = iter(rows), shard_rows or SHARD_ROWS
    batches: list[pa.RecordBatch] = []
    filled = 0
    while batch := list(itertools.islice(it, min(BATCH_ROWS, shard_rows - filled))):
        batches.append(pa.RecordBatch.from_pylist(batch, schema=schema))
        filled += len(batch)
        if filled == shard_rows:
            yield pa.Table.from_batches(batches, schema)
            batches, filled = [], 0
    if batches:
        yield pa.Table.from_batches(batches, schema)


def write_rows(
    folder: Path, rows: Iterable[dict[str, Any]], total: int, max_rows: int, seed: int
) -> TrainingData:
    """Write ``rows`` (``{anchor, positive, negatives}``) as ``TRAIN_ROWS`` shards: all, or the
    ``max_rows`` of ``speed_ray.io.data.nested_sample`` in input order, which needs their number
    ``total`` (read only when ``max_rows`` is set)."""
    from speed_ray.io.data import nested_sample
    from speed_ray.io.schemas import split_query, write_stage

    keep = set(nested_sample(range(total), max_rows, seed)) if max_rows and max_rows < total else None
    most = [0]

    def kept() -> Iterator[dict[str, Any]]:
        for i, r in enumerate(rows):
            if keep is None or i in keep:
                # An anchor in SPEED/E5 form carries its instruction: the trainer applies it as it applies
                # every instruction (decoders see it, encoders the bare query: ``embed.model.format_query``).
                instruction, query = split_query(r["anchor"])
                most[0] = max(most[0], len(r["negatives"]))
                yield {"instruction": instruction, "query": query} | {
                    "positive": r["positive"],
                    "negatives": r["negatives"],
                }

    manifest = write_stage(folder, chunks(kept(), TRAIN_ROWS), TRAIN_ROWS, {"kind": "rows"}, time.time())
    return TrainingData(shards(folder, manifest, "rows"), max_negatives=most[0], seed=seed)


def write_docs(
    folder: Path,
    docs: Iterable[dict[str, Any]],
    held_out: set[str],
    mode: str,
    rule: CropRule,
    seed: int,
    excluded: frozenset[str] | set[str] = frozenset(),
) -> tuple[TrainingData, dict[str, Any]]:
    """Write the documents of ``docs`` that are neither held out nor ``excluded`` (``embed.data.exclude``)
    and give a pair (``rule.min_crops`` crops) as ``CORPUS_DOCS`` shards; returns the data and what
    was made of the corpus (documents trained on, pairs per epoch, documents skipped by reason with
    the first 100 ids, documents held out and excluded)."""
    from speed_ray.io.schemas import write_stage

    trained, left_out, reasons, skipped_ids = [0], [0], Counter[str](), list[str]()

    def usable() -> Iterator[dict[str, Any]]:
        for doc in docs:
            if doc["id"] in held_out:
                continue
            if doc["id"] in excluded:
                left_out[0] += 1
                continue
            trained[0] += 1
            crops = len(sentence_crops(doc["text"], rule))
            if crops < rule.min_crops:
                reasons[f"{crops} crops, need {rule.min_crops}"] += 1
                if len(skipped_ids) < 100:
                    skipped_ids.append(doc["id"])
                continue
            yield doc

    manifest = write_stage(folder, chunks(usable(), CORPUS_DOCS), CORPUS_DOCS, {"kind": "docs"}, time.time())
    data = TrainingData(shards(folder, manifest, "docs"), mode, rule, seed)
    info = {
        "documents": trained[0],
        "pairs": len(data),
        "skipped": dict(reasons),
        "skipped_ids": skipped_ids,
        "held_out": len(held_out),
        "excluded": left_out[0],
    }
    return data, info


def shards(folder: Path, manifest: dict[str, Any], kind: str) -> tuple[Shard, ...]:
    """The shards of a step's ``manifest`` in ``folder``, all of ``kind``."""
    return tuple(Shard(str(folder / f["name"]), f["num_rows"], kind) for f in manifest["files"])
