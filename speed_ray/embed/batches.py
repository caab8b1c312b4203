"""The training data of a step: which rows make global batch ``s``, and the texts a batch embeds.

Every worker holds the rows (``Rows``) or the corpus (``CorpusPairs``, re-cropped each epoch) and takes
its slice of global batch ``s`` from an order seeded by (seed, epoch), so the data of a step depends on
the step alone: a run resumed from a checkpoint takes exactly the batches an uninterrupted run takes.
"""

from __future__ import annotations

import functools
import random
from dataclasses import dataclass, field
from typing import Any

import torch

from speed_ray.embed.model import format_query
from speed_ray.embed.pairs import CropRule, build_pairs


@dataclass
class Rows:
    """Fixed training rows ``{instruction, query, positive, negatives}`` (synth examples, user pairs)."""

    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, epoch: int) -> list[dict[str, Any]]:
        return self.rows


@dataclass
class CorpusPairs:
    """Self-supervised pairs from an unlabelled corpus, drawn anew each epoch (the crops paper)."""

    docs: list[dict[str, Any]]
    mode: str
    rule: CropRule
    seed: int
    size: int = 0
    _cache: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.size:
            self.size = len(build_pairs(self.docs, self.mode, self.rule, self.seed, 0)[0])

    def __len__(self) -> int:
        return self.size

    def epoch(self, epoch: int) -> list[dict[str, Any]]:
        if epoch not in self._cache:
            pairs, _ = build_pairs(self.docs, self.mode, self.rule, self.seed, epoch)
            self._cache = {
                epoch: [
                    {"instruction": None, "query": p["anchor"], "positive": p["positive"], "negatives": []}
                    for p in pairs
                ]
            }
        return self._cache[epoch]


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch (computed once per epoch, not per step: millions of rows)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def global_batch(data: Rows | CorpusPairs, step: int, size: int, seed: int) -> tuple[int, list[dict]]:
    """(epoch, rows) of global batch ``step`` (1-based): epochs of ``len(data) // size`` batches, each
    epoch in an order seeded by (seed, epoch); the last partial batch of an epoch is dropped."""
    per_epoch = len(data) // size
    if per_epoch == 0:
        raise ValueError(f"{len(data)} training rows, fewer than one global batch of {size}")
    epoch, b = divmod(step - 1, per_epoch)
    order = epoch_order(len(data), seed, epoch)
    rows = data.epoch(epoch)
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
