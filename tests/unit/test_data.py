"""The Debian files read as published: counts, fields, checksums, and clear errors for bad rows."""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from speed_ray.io.data import locate, nested_sample, read_beir, read_labelled, verify_checksums
from tests.conftest import DEBIAN


def test_retrieval_set_as_published():
    corpus, queries, qrels = read_beir(DEBIAN / "retrieval")
    assert (len(corpus), len(queries), len(qrels)) == (5000, 1000, 1000)
    assert queries[0] == {"id": "q:postgresql-15-pgextwlist", "text": "PostgreSQL Extension Whitelisting"}
    assert qrels["q:postgresql-15-pgextwlist"] == {"postgresql-15-pgextwlist": 1}
    ids = {d["id"] for d in corpus}
    assert all(set(rel) <= ids for rel in qrels.values())


def test_labelled_set_as_published():
    rows = read_labelled(DEBIAN / "labelled.jsonl.gz")
    assert len(rows) == 18357
    assert rows[0]["id"] == "0ad" and rows[0]["label"] == "games"


def test_checksums(tmp_path):
    assert verify_checksums(DEBIAN / "retrieval") == [
        "retrieval/corpus.jsonl",
        "retrieval/queries.jsonl",
        "retrieval/qrels/test.tsv",
    ]
    copy = tmp_path / "debian"
    shutil.copytree(DEBIAN, copy)
    queries = copy / "retrieval" / "queries.jsonl.gz"
    queries.chmod(0o644)
    with gzip.open(queries, "at") as f:
        f.write('{"_id": "q:extra", "text": "x"}\n')
    with pytest.raises(ValueError, match="queries.jsonl.gz: SHA-256 differs"):
        verify_checksums(copy / "retrieval")
    assert verify_checksums(tmp_path) == []  # no SHA256SUMS: a user's own data


def test_bad_rows_are_named(tmp_path):
    (tmp_path / "l.jsonl").write_text('{"id": "a", "text": "t", "label": "x"}\n{"id": "b", "text": "t"}\n')
    with pytest.raises(ValueError, match=r"l.jsonl:2: missing keys \['label'\]"):
        read_labelled(tmp_path / "l.jsonl")
    (tmp_path / "l.jsonl").write_text("{not json\n")
    with pytest.raises(ValueError, match="l.jsonl:1: not valid JSON"):
        read_labelled(tmp_path / "l.jsonl")


def test_nested_samples_keep_input_order_and_lie_inside_larger_ones():
    rows = [f"r{i}" for i in range(50)]
    small, large = nested_sample(rows, 8, seed=3), nested_sample(rows, 20, seed=3)
    assert len(small) == 8 and len(large) == 20
    assert set(small) <= set(large)  # the scaling curve's sizes are nested
    assert small == sorted(small, key=rows.index) and large == sorted(large, key=rows.index)
    assert nested_sample(rows, 8, seed=3) == small  # reproducible
    assert nested_sample(rows, 8, seed=4) != small
    assert nested_sample(rows, 0, seed=3) == rows == nested_sample(rows, 60, seed=3)


def test_builtin_names_locate_the_shipped_files():
    assert locate("builtin:debian/retrieval") == DEBIAN / "retrieval"
    assert locate("builtin:debian/labelled") == DEBIAN / "labelled.jsonl.gz"
    assert locate("some/file.jsonl") == Path("some/file.jsonl")
    with pytest.raises(
        ValueError,
        match=r"builtin:debian/labeled: no such built-in data set \(closest: builtin:debian/labelled",
    ):
        locate("builtin:debian/labeled")


def test_plain_and_gzipped_files_read_alike(tmp_path):
    rows = [{"id": "a", "text": "first", "label": "x"}, {"id": "b", "text": "zweite é", "label": "y"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    (tmp_path / "l.jsonl").write_text(text, encoding="utf-8")
    with gzip.open(tmp_path / "l.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(text)
    assert read_labelled(tmp_path / "l.jsonl") == read_labelled(tmp_path / "l.jsonl.gz") == rows


def test_no_file_refers_outside_the_repository():
    """The project stands alone: nothing tracked points at a folder beside the checkout."""
    import subprocess

    from tests.conftest import REPO

    needle = "../" + "shared"  # spelled in two parts so that this test does not find itself
    hits = subprocess.run(["git", "grep", "-n", "-F", needle], cwd=REPO, capture_output=True, text=True)
    assert hits.returncode == 1 and hits.stdout == "", hits.stdout
