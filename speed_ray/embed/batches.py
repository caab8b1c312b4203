"""Which rows make global batch ``s``, and the texts a batch embeds.

Epochs of ``n // size`` global batches, each epoch in an order seeded by (seed, epoch): the data of a
step depends on the step alone, so a run resumed from a checkpoint takes exactly the batches an
uninterrupted run takes. Workers read their slices from disk (``speed_ray.embed.data.WorkerBatches``);
``global_batch`` is the same walk over rows in memory.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from speed_ray.embed.model import format_query


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int, parts: tuple[int, ...] = ()) -> np.ndarray:
    """The row order of one epoch (computed once per epoch, not per step; 8 bytes a row). ``parts``
    (sizes that sum to ``n``): the rows of each part in turn, each part shuffled on its own and
    taken whole before the next (``embed.data.crops_order: first``); none: all rows shuffled together."""
    if not parts:
        order = list(range(n))
        random.Random(f"{seed}:{epoch}").shuffle(order)
        return np.array(order, dtype=np.int64)
    orders, start = [], 0
    for i, size in enumerate(parts):
        part = list(range(start, start + size))
        random.Random(f"{seed}:{epoch}:{i}").shuffle(part)
        orders.append(np.array(part, dtype=np.int64))
        start += size
    return np.concatenate(orders)


def epoch_batches(n: int, size: int, parts: tuple[int, ...] = ()) -> int:
    """Global batches per epoch: ``n // size``, the last partial batch dropped (each part's, with
    ``parts``: a batch never holds rows of two parts)."""
    return sum(p // size for p in parts) if parts else n // size


def batch_span(n: int, step: int, size: int, parts: tuple[int, ...] = ()) -> tuple[int, int]:
    """(epoch, batch within it) of global batch ``step`` (1-based) over ``n`` rows (``epoch_batches``
    per epoch)."""
    per_epoch = epoch_batches(n, size, parts)
    if per_epoch == 0:
        raise ValueError(f"{n} training rows, fewer than one global batch of {size}")
    return divmod(step - 1, per_epoch)


def batch_start(b: int, size: int, parts: tuple[int, ...] = ()) -> int:
    """Where batch ``b`` of an epoch starts in ``epoch_order``'s order: each part gives only whole
    batches (``batch_span``)."""
    start = 0
    for p in parts:
        if b < p // size:
            break
        b, start = b - p // size, start + p
    return start + b * size


def global_batch(rows: Sequence[Any], step: int, size: int, seed: int) -> tuple[int, list[Any]]:
    """(epoch, rows) of global batch ``step`` over rows held in memory."""
    epoch, b = batch_span(len(rows), step, size)
    order = epoch_order(len(rows), seed, epoch)
    return epoch, [rows[i] for i in order[b * size : (b + 1) * size]]


def batch_texts(
    rows: list[dict[str, Any]], pooling: str, num_negatives: int
) -> tuple[list[str], list[str], list[str], torch.Tensor]:
    """Rows -> (queries, positives, negatives [B*K], mask [B, K]): each row's hard negatives padded to
    K = ``num_negatives`` with '' (masked out of the loss), so every worker gathers the same shapes."""
    queries = [format_query(r.get("instruction"), r["query"], pooling) for r in rows]
    negatives, mask = [], []
    for r in rows:
        negs = list(r.get("negatives") or [])[:num_negatives]
        mask.append([True] * len(negs) + [False] * (num_negatives - len(negs)))
        negatives += negs + [""] * (num_negatives - len(negs))
    return queries, [r["positive"] for r in rows], negatives, torch.tensor(mask, dtype=torch.bool)
