"""Crop and dropout pairs (arXiv 2508.03453 §1.1-1.2) on real Debian descriptions."""

from __future__ import annotations

import pytest

from speed_ray.embed.pairs import CropRule, build_pairs, sentence_crops
from speed_ray.io.data import read_labelled
from tests.conftest import DEBIAN


@pytest.fixture(scope="module")
def docs():
    return read_labelled(DEBIAN / "labelled.jsonl.gz")


def test_crops_of_a_real_document_by_hand(docs):
    zero_ad = docs[0]
    assert zero_ad["id"] == "0ad"
    # Split on ".", the pieces are '0 A', 'D', (1) ' (pronounced ... ancient warfare' (115 chars),
    # (2) ' In short, ... between 500 B' (169), 'C', ' and 500 A', 'D', (3) ' The project ... engine' (151), ''.
    # Only (1), (2), (3) have 100-250 chars; 2 consecutive valid sentences per crop -> (1,2) and (2,3).
    pieces = zero_ad["text"].split(".")
    s1, s2, s3 = pieces[2], pieces[3], pieces[7]
    assert sentence_crops(zero_ad["text"]) == [f"{s1}. {s2}", f"{s2}. {s3}"]
    assert sentence_crops(zero_ad["text"], CropRule(sentences_per_crop=3)) == [f"{s1}. {s2}. {s3}"]


def test_crop_pairs_on_the_debian_corpus(docs):
    pairs, skipped = build_pairs(docs, "crops")
    # Every document is either paired or reported; short Debian descriptions are the majority.
    assert len(pairs) + len(skipped) == len(docs) == 18357
    assert (len(pairs), len(skipped)) == (3758, 14599)
    assert {s["reason"] for s in skipped} == {"0 crops, need 2", "1 crops, need 2"}
    assert all(p["anchor"] != p["positive"] for p in pairs)
    by_id = {d["id"]: d["text"] for d in docs}
    assert all(p["anchor"] in sentence_crops(by_id[p["id"]]) for p in pairs[:200])


def test_pairs_are_redrawn_per_epoch_and_reproducible(docs):
    first, _ = build_pairs(docs[:2000], "crops", seed=1, epoch=0)
    again, _ = build_pairs(docs[:2000], "crops", seed=1, epoch=0)
    later, _ = build_pairs(docs[:2000], "crops", seed=1, epoch=1)
    assert first == again
    assert sum(a != b for a, b in zip(first, later, strict=True)) > len(first) // 4


def test_dropout_pairs_are_one_crop_twice(docs):
    pairs, skipped = build_pairs(docs, "dropout")
    crop_pairs, crop_skipped = build_pairs(docs, "crops")
    assert [p["id"] for p in pairs] == [p["id"] for p in crop_pairs]  # the same usable documents
    assert skipped == crop_skipped
    assert all(p["anchor"] == p["positive"] for p in pairs)


def test_unknown_mode():
    with pytest.raises(ValueError, match="expected 'crops' or 'dropout', got 'masks'"):
        build_pairs([], "masks")
