"""A ``synth.source: pairs`` run through ``speed_ray.synth.driver.run`` with all-MiniLM-L6-v2 as the
retriever: the pairs file becomes ``synth/examples``, the rule filters and the round trip drop rows by
reason, ``synth/neighbours`` ranks the corpus on a Ray actor pool, and ``synth/train`` carries the
mined negatives in ``negative_1`` .. ``negative_n``. No engine is configured or started."""

from __future__ import annotations

import json

import datasets
import pytest

from speed_ray.config import load_config
from speed_ray.io.data import read_pairs
from speed_ray.io.schemas import FILTERED, read_manifest, read_stage
from speed_ray.synth import driver

PAIRS = [
    ("how do I compress a folder into a tar.gz archive", "tar and gzip pack and compress files and folders."),
    (
        "rotate and delete old log files automatically",
        "logrotate rotates, compresses and removes old log files.",
    ),
    ("check how much disk space is free", "df reports the free and used disk space of each file system."),
    ("play mp3 music from the terminal", "mpg123 is a console audio player for MP3 files."),
    ("edit text files in the terminal", "vim is a modal text editor for the console."),
    ("synchronise files with a remote server", "rsync copies and synchronises files over ssh."),
    ("S1", "A placeholder query."),  # dropped: query placeholder
    ("find which process uses a port", "find which process uses a port"),  # dropped: positive = query
    ("schedule a job to run every night", "the document"),  # dropped: positive placeholder
    # dropped by the round trip: the rsync text above answers this query better than its own positive
    ("copy files to a remote machine keeping them in sync", "A recipe for banana bread with walnuts."),
]


# About 80 s on 2 busy CPUs (two actor pools loading MiniLM, the train step's sort): past the budget
# of the default suite.
@pytest.mark.slow
def test_pairs_run_filters_and_mines_negatives(tmp_path, model_cache, ray_session):
    path = tmp_path / "pairs.jsonl"
    rows = [{"anchor": q, "positive": p} for q, p in PAIRS]
    rows[4]["negative"] = rows[4]["positive"]  # negative = positive: only the negative goes
    rows[0]["anchor"] = f"Instruct: Find the command\nQuery: {rows[0]['anchor']}"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=mine",
            "run.stages=[synth]",
            "synth.source=pairs",
            f"synth.pairs={path}",
            "synth.shard_rows=4",
            "synth.filters.round_trip_k=1",
            "synth.mining.negatives=2",
            "synth.mining.top_k=5",
            "embed.model=all-minilm-l6-v2",
            "embed.pooling=mean",
        ],
    )
    assert cfg.engines() == {}  # nothing generates: no engine checked or started
    m = driver.run(cfg)
    synth = tmp_path / "mine" / "synth"

    assert m["examples"]["num_rows"] == 10 and len(m["examples"]["files"]) == 3
    assert m["neighbours"]["corpus"] == 10 and m["neighbours"]["model"] == "all-minilm-l6-v2"
    f = read_manifest(synth / "filtered")
    assert f["rows_in"] == 10 and f["num_rows"] == 6
    assert f["dropped"] == {
        "query placeholder": 1,
        "positive = query": 1,
        "positive placeholder": 1,
        "round trip": 1,
    }
    assert f["negatives_dropped"] == {"negative = positive": 1}
    assert f["samples"]["round trip"][0]["positive"] == "A recipe for banana bread with walnuts."

    kept = read_stage(synth / "filtered", FILTERED).to_pylist()
    assert sorted(r["query"] for r in kept) == sorted(q for q, _ in PAIRS[:6])
    assert all(r["rank"] == 1 and r["negative"] is None for r in kept)
    assert [r["instruction"] for r in kept].count("Find the command") == 1
    for r in kept:  # two mined negatives each: other rows' positives, never the row's own
        assert len(r["mined_negatives"]) == 2 and r["positive"] not in r["mined_negatives"]
        assert set(r["mined_negatives"]) <= {p for _, p in PAIRS}
    assert f["mined"] == 12 and f["negatives_per_row"] == {"2": 6}

    # train: the anchor keeps the instruction; negative_1, negative_2 as sentence-transformers reads them
    train = datasets.load_dataset("parquet", data_files=str(synth / "train" / "*.parquet"), split="train")
    assert train.column_names == ["anchor", "positive", "negative_1", "negative_2"] and len(train) == 6
    assert f"Instruct: Find the command\nQuery: {PAIRS[0][0]}" in train["anchor"]
    assert all(len(p["negatives"]) == 2 for p in read_pairs(synth / "train"))
