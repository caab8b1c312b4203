"""Rows mixed with a corpus's crop pairs (``embed.data.crops``): what is read back, the two orders
(``crops_order``: mixed | first), the documents left out (``embed.data.exclude``) and the batches a
resumed worker takes."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from speed_ray.embed.data import WorkerBatches, mix, rows_digest, write_docs, write_rows
from speed_ray.embed.pairs import CropRule, build_pairs
from speed_ray.io.data import read_labelled
from tests.conftest import DEBIAN

DOCS = read_labelled(DEBIAN / "labelled.jsonl.gz")[:60]


def row(i: int) -> dict:
    return {"instruction": None, "query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"]}


def mixed(tmp_path, monkeypatch, order: str, rows: int = 7, excluded: frozenset[str] = frozenset()):
    """(data, crop pairs of epoch 0, rows, info): ``rows`` rows and DOCS's crop pairs written as shards
    of 5 (so a batch spans shards of both kinds)."""
    from speed_ray.embed import data as embed_data

    monkeypatch.setattr(embed_data, "SHARD_ROWS", 5)
    pairs = [{"anchor": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"]} for i in range(rows)]
    written = write_rows(tmp_path / "rows", iter(pairs), rows, 0, seed=3)
    docs, info = write_docs(tmp_path / "crops", iter(DOCS), set(), "crops", CropRule(), 3, excluded)
    kept = [d for d in DOCS if d["id"] not in excluded]
    crops = [
        {"instruction": None, "query": p["anchor"], "positive": p["positive"], "negatives": []}
        for p in build_pairs(kept, "crops", CropRule(), 3, 0)[0]
    ]
    return mix(docs, written, order), crops, [row(i) for i in range(rows)], info


def test_mixed_data_reads_back_exactly_the_crop_pairs_then_the_rows(tmp_path, monkeypatch):
    data, crops, rows, info = mixed(tmp_path, monkeypatch, "mixed")
    assert data.all_rows(0) == crops + rows and info["pairs"] == len(crops) > 10
    assert data.count("docs") == len(crops) and data.count("rows") == 7 and data.max_negatives == 1
    assert data.counts[-2:] == (5, 2) and {s.kind for s in data.shards} == {"docs", "rows"}
    assert data.parts == ()  # mixed: one shuffle over both


def test_exclude_leaves_out_exactly_the_listed_documents(tmp_path, monkeypatch):
    short = {s["id"] for s in build_pairs(DOCS, "crops", CropRule(), 3, 0)[1]}
    usable = [d["id"] for d in DOCS if d["id"] not in short]
    listed = frozenset([usable[0], usable[5], "not-in-this-corpus"])
    data, crops, _, info = mixed(tmp_path, monkeypatch, "mixed", excluded=listed)
    shards = [s for s in data.shards if s.kind == "docs"]
    ids = [i for s in shards for i in pq.read_table(s.path)["id"].to_pylist()]
    assert ids == [i for i in usable if i not in listed]
    assert info["excluded"] == 2 and info["documents"] == len(DOCS) - 2
    assert data.all_rows(0)[: len(crops)] == crops


@pytest.mark.parametrize("world,per_worker", [(1, 4), (2, 3)])
def test_crops_first_takes_only_crop_batches_then_only_row_batches(tmp_path, monkeypatch, world, per_worker):
    """size 4: a corpus of P pairs and 7 rows give P // 4 crop batches, then 7 // 4 = 1 row batch per
    epoch (each part's last partial batch dropped); size 6: P // 6 and 1."""
    data, crops, rows, _ = mixed(tmp_path, monkeypatch, "first")
    size = world * per_worker
    crop_batches, per_epoch = len(crops) // size, len(crops) // size + 7 // size
    assert data.parts == (len(crops), 7)
    ranks = [WorkerBatches(data, per_worker, world, r, seed=3) for r in range(world)]
    for epoch in range(3):
        seen = []
        for b in range(per_epoch):
            step = epoch * per_epoch + b + 1
            slices = [rank(step) for rank in ranks]
            batch = [r for e, mine in slices for r in mine]
            assert {e for e, _ in slices} == {epoch} and len(batch) == size
            if b < crop_batches:
                assert all(r["negatives"] == [] for r in batch)
                seen += [r["query"] for r in batch]
            else:
                assert all(r in rows for r in batch)
        pairs = {p["query"] for p in data.all_rows(epoch)[: len(crops)]}
        assert len(set(seen)) == len(seen) == crop_batches * size and set(seen) <= pairs


@pytest.mark.parametrize("order", ["mixed", "first"])
def test_a_fresh_worker_takes_the_batches_of_an_uninterrupted_one(tmp_path, monkeypatch, order):
    from speed_ray.embed import data as embed_data

    data, _, _, _ = mixed(tmp_path, monkeypatch, order)
    monkeypatch.setattr(embed_data, "WINDOW_ROWS", 6)
    whole = WorkerBatches(data, 3, 2, 1, seed=3)
    walked = [rows_digest(whole(s)[1]) for s in range(1, 31)]
    resumed = WorkerBatches(data, 3, 2, 1, seed=3)  # started at a checkpoint's step 17
    assert [rows_digest(resumed(s)[1]) for s in range(17, 31)] == walked[16:]
    assert len(set(walked)) > 10  # the walk moves on


def test_training_data_mixes_a_pairs_file_with_a_corpus_s_crops(tmp_path):
    from speed_ray.config import load_config
    from speed_ray.embed.driver import dataset_name, training_data

    pairs, corpus, exclude = tmp_path / "pairs.jsonl", tmp_path / "corpus.jsonl", tmp_path / "eval.jsonl"
    pairs.write_text("".join(json.dumps({"anchor": f"q{i}", "positive": f"p{i}"}) + "\n" for i in range(9)))
    corpus.write_text("".join(json.dumps({"id": d["id"], "text": d["text"]}) + "\n" for d in DOCS))
    exclude.write_text("".join(json.dumps({"id": d["id"], "text": "x"}) + "\n" for d in DOCS[:4]))
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            *("embed.data.source=pairs", f"embed.data.path={pairs}", f"embed.data.crops={corpus}"),
            *("embed.data.crops_order=first", f"embed.data.exclude={exclude}"),
        ],
    )
    data, info = training_data(cfg)
    kept = [d for d in DOCS if d not in DOCS[:4]]
    want = build_pairs(kept, "crops", CropRule(), 0, 0)[0]
    assert [r["query"] for r in data.all_rows(0)] == [p["anchor"] for p in want] + [f"q{i}" for i in range(9)]
    assert data.parts == (len(want), 9) and info["rows"] == 9 and info["crops_order"] == "first"
    assert info["crops"]["excluded"] == 4 and info["crops"]["pairs"] == len(want)
    assert dataset_name(info) == "pairs.jsonl + corpus.jsonl (crops pairs, first)"
