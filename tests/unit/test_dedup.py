"""MinHash LSH pieces of `speed_ray.synth.dedup`, checked by hand and against exact arithmetic (no Ray)."""

from __future__ import annotations

import hashlib

import numpy as np
import pyarrow as pa
import pytest

from speed_ray.synth.dedup import (
    EMPTY,
    MERSENNE61,
    band_keys,
    bucket_pairs,
    components,
    drop_ids,
    estimate_jaccard,
    lsh_params,
    minhash,
    permutations,
    shingles,
    signature_rows,
)


def test_shingles_by_hand():
    assert shingles("The cat, the HAT!", 2) == {"the cat", "cat the", "the hat"}
    assert shingles("a b c d", 3) == {"a b c", "b c d"}
    assert shingles("one two three", 3) == {"one two three"}
    assert shingles("Hello,   world!", 3) == {"hello world"}  # shorter than size: one shingle
    assert shingles("it's\tA-OK", 5) == {"it s a ok"}  # punctuation and tabs split words
    assert shingles("", 3) == set()
    assert shingles(" ?! ...", 3) == set()


def reference_minhash(items: list[str], num_perm: int, seed: int) -> list[int]:
    """min over shingles of (a*x + b) mod (2**61 - 1), in Python integers, x = blake2b-64(s) mod p."""
    a, b = permutations(num_perm, seed)
    xs = [int.from_bytes(hashlib.blake2b(s.encode(), digest_size=8).digest(), "little") for s in items]
    return [
        min((int(ai) * (x % MERSENNE61) + int(bi)) % MERSENNE61 for x in xs)
        for ai, bi in zip(a, b, strict=True)
    ]


def test_minhash_matches_exact_integer_arithmetic():
    items = sorted(shingles("the quick brown fox jumps over the lazy dog near the river bank", 3))
    sig = minhash(items, 64, seed=3)
    assert sig.dtype == np.uint64 and sig.shape == (64,)
    assert sig.tolist() == reference_minhash(items, 64, seed=3)


def test_minhash_deterministic_and_order_free():
    items = [f"w{i} w{i + 1} w{i + 2}" for i in range(30)]
    sig = minhash(items, 128, seed=0)
    assert np.array_equal(sig, minhash(items, 128, seed=0))
    assert np.array_equal(sig, minhash(list(reversed(items)), 128, seed=0))
    assert np.array_equal(sig, minhash(set(items), 128, seed=0))
    assert not np.array_equal(sig, minhash(items, 128, seed=1))
    assert (sig < MERSENNE61).all()
    assert (minhash(set(), 8, seed=0) == EMPTY).all()


@pytest.mark.parametrize(
    ("a", "b", "jaccard"),
    [
        (range(0, 100), range(100, 200), 0.0),
        (range(0, 150), range(50, 200), 0.5),  # 100 shared of 200
        (range(0, 80), range(20, 100), 0.6),  # 60 shared of 100
        (range(0, 100), range(0, 100), 1.0),
    ],
)
def test_estimate_jaccard_close_to_true(a, b, jaccard):
    sig_a = minhash({f"tok{i}" for i in a}, 256, seed=0)
    sig_b = minhash({f"tok{i}" for i in b}, 256, seed=0)
    assert abs(estimate_jaccard(sig_a, sig_b) - jaccard) <= 0.1


def test_lsh_params():
    # Same optimum as datasketch's _optimal_param (scipy quad), checked when this was written.
    assert lsh_params(0.8, 128) == (9, 13)
    assert lsh_params(0.5, 128) == (25, 5)
    for threshold, num_perm in [(0.8, 128), (0.5, 128), (0.9, 256), (0.7, 64)]:
        b, r = lsh_params(threshold, num_perm)
        assert b * r <= num_perm
    # The S-curve of (9, 13) nominates a pair at J = 0.95 almost surely and at J = 0.5 almost never.
    assert 1 - (1 - 0.95**13) ** 9 > 0.99
    assert 1 - (1 - 0.5**13) ** 9 < 0.01


def test_band_keys():
    sig = np.arange(12, dtype=np.uint64)
    other = sig.copy()
    other[5] = 99  # band 1 of (3 bands x 4 rows)
    keys, other_keys = band_keys(sig, 3, 4), band_keys(other, 3, 4)
    assert [k[:4] for k in keys] == ["000:", "001:", "002:"]
    assert len(set(keys)) == 3
    assert [k == o for k, o in zip(keys, other_keys, strict=True)] == [True, False, True]


def test_components_smallest_id_wins():
    edges = [(5, 3), (3, 9), (10, 11), (12, 11), (20, 21), (9, 1)]
    expected = {1: 1, 3: 1, 5: 1, 9: 1, 10: 10, 11: 10, 12: 10, 20: 20, 21: 20}
    assert components(edges) == expected
    assert components(reversed(edges)) == expected
    assert components([("b", "c"), ("c", "a")]) == {"a": "a", "b": "a", "c": "a"}


def bucket(band: int, rows: list[tuple[int, list[int]]]) -> pa.Table:
    sigs = np.array([s for _, s in rows], dtype=np.uint64)
    return pa.table(
        {
            "band_key": [f"{band:03d}:x"] * len(rows),
            "band": pa.array([band] * len(rows), pa.int32()),
            "id": pa.array([i for i, _ in rows], pa.int64()),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(sigs.ravel()), sigs.shape[1]),
        }
    )


S1 = [1, 2, 3, 4, 5, 6, 7, 8]
S2 = [1, 2, 3, 4, 50, 60, 70, 80]  # band 0 equal to S1, estimate 0.5
S4 = [1, 2, 3, 4, 5, 6, 7, 99]  # estimate 7/8 with S1, first agreeing band 0
S5 = [9, 2, 3, 4, 5, 6, 7, 8]  # estimate 7/8 with S1, first agreeing band 1


def pairs(table: pa.Table) -> set[tuple[int, int]]:
    return set(zip(table.column("a").to_pylist(), table.column("b").to_pylist(), strict=True))


def test_bucket_pairs_verifies_and_emits_each_pair_once():
    """Buckets of 2 bands x 4 rows, threshold 0.8: a band collision alone (S1, S2) is no pair."""
    group = bucket(0, [(7, S1), (3, S2), (9, S1), (4, S4)])
    assert pairs(bucket_pairs(group, 0.8, 2, 4)) == {(7, 9), (4, 7)}
    # Seen again in band 1: the identical pair and (4, 7) were already emitted from band 0.
    assert pairs(bucket_pairs(bucket(1, [(7, S1), (9, S1), (4, S4)]), 0.8, 2, 4)) == set()
    assert pairs(bucket_pairs(bucket(1, [(7, S1), (2, S5)]), 0.8, 2, 4)) == {(2, 7)}
    assert pairs(bucket_pairs(bucket(0, [(7, S1)]), 0.8, 2, 4)) == set()
    assert bucket_pairs(bucket(0, [(7, S1)]), 0.8, 2, 4).schema.field("a").type == pa.int64()


def test_signature_rows_and_drop_ids():
    batch = pa.table({"id": ["x", "y", "z"], "q": ["Alpha beta gamma", None, ""], "p": ["delta", "", None]})
    out = signature_rows(batch, ["q", "p"], "id", num_perm=16, seed=0, shingle_size=3, bands=4, rows=4)
    assert out.column("id").to_pylist() == ["x"] * 4  # "y" and "z" have no word
    assert out.column("band").to_pylist() == [0, 1, 2, 3]
    sig = minhash(shingles("alpha beta gamma delta", 3), 16, 0)
    assert out.column("signature")[0].as_py() == sig.tolist()
    assert out.column("band_key").to_pylist() == band_keys(sig, 4, 4)
    assert drop_ids(batch, "id", pa.array(["y", "w"])).column("id").to_pylist() == ["x", "z"]
