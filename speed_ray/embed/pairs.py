"""Self-supervised positive pairs from unlabelled text: sentence crops or dropout. Pure Python.

The crops paper (arXiv 2508.03453 §1.1, the authors' ``MultOverlappingSentencesPairDataset``):
split a document on ".", keep the pieces of 100-250 characters ("valid sentences"), and make a crop
from every run of ``n`` consecutive valid sentences (invalid ones in between are skipped), joined with
". ". A document needs at least 2 crops; a pair is two different crops drawn anew on every visit.
Dropout (SimCSE-like, ``SameSentencePairDataset``): one such crop, twice; the model's own dropout
makes the two views differ. Documents with too few crops are returned as skipped, with the reason.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CropRule:
    min_chars: int = 100
    """Shortest valid sentence (characters of the raw piece between periods)."""
    max_chars: int = 250
    sentences_per_crop: int = 2
    min_crops: int = 2
    """Documents with fewer crops give no pair (2 = at least 3 valid sentences at n = 2)."""


def sentence_crops(text: str, rule: CropRule = CropRule()) -> list[str]:
    """Every crop of ``rule.sentences_per_crop`` consecutive valid sentences, in document order."""
    valid = [s for s in text.split(".") if rule.min_chars <= len(s) <= rule.max_chars]
    n = rule.sentences_per_crop
    return [". ".join(valid[i : i + n]) for i in range(len(valid) - n + 1)]


def build_pairs(
    docs: list[dict[str, Any]], mode: str, rule: CropRule = CropRule(), seed: int = 0, epoch: int = 0
) -> tuple[list[dict[str, str]], list[dict[str, str]]]:
    """(pairs [{id, anchor, positive}], skipped [{id, reason}]) for one epoch over ``docs``.

    ``mode`` is ``crops`` (two different crops) or ``dropout`` (one crop twice). The draw for a
    document depends only on (seed, epoch, document id), so reruns and workers agree.
    """
    if mode not in ("crops", "dropout"):
        raise ValueError(f"pair mode: expected 'crops' or 'dropout', got {mode!r}")
    pairs, skipped = [], []
    for doc in docs:
        crops = sentence_crops(doc["text"], rule)
        if len(crops) < rule.min_crops:
            skipped.append({"id": doc["id"], "reason": f"{len(crops)} crops, need {rule.min_crops}"})
            continue
        rng = random.Random(f"{seed}:{epoch}:{doc['id']}")
        if mode == "crops":
            anchor, positive = rng.sample(crops, 2)
        else:
            anchor = positive = rng.choice(crops)
        pairs.append({"id": doc["id"], "anchor": anchor, "positive": positive})
    return pairs, skipped
