"""Near-duplicate removal by MinHash LSH: pure hashing functions plus one Ray Data ``dedup`` pass.

Why: the revised SPEED paper (arXiv 2410.18634) removes near-duplicates from its synthetic data
with MinHash but names no parameters. Defaults here: word 3-gram shingles, 128 permutations, Jaccard
0.8. The texts are short (a query plus a passage of some tens of words): with 5-grams one edited
word changes 5 of only ~35 shingles, with 3-grams 3, so 3-grams keep the Jaccard of a light edit
well above the threshold, while unrelated texts still share almost no 3-gram.

LSH math: P[minhash_i(A) == minhash_i(B)] = J(A, B), so with ``bands`` bands of ``rows`` values two
texts share at least one band bucket with probability 1 - (1 - J**rows)**bands, an S-curve that
``lsh_params`` centres on the threshold. A band collision only nominates a pair: every candidate is
kept as an edge only when its estimated Jaccard (share of equal signature values) >= threshold.

Scaling: signatures, band keys, the shuffle by band key, the pairwise check inside each bucket and
the final filter run as Ray Data tasks. Only the verified edges come back to the driver (one row per
duplicate pair: each pair is emitted by the first band where it collides, and rows with identical
signatures are linked to one member as a star), and the union-find over them runs there. That list is
small next to the data unless most rows are near-duplicates of each other. The removed ids go back to
the workers in the filter's ``fn_kwargs`` (Ray Data puts the map function in the object store once).
The shuffle carries the signature in every band row: bands * (8 * num_perm + ~40) bytes per input row,
about 9.6 KB at the defaults (9 bands), so 1M rows shuffle about 10 GB (Ray spills to disk if needed).
"""

from __future__ import annotations

import functools
import hashlib
import re
from collections.abc import Hashable, Iterable
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

MERSENNE61 = (1 << 61) - 1
EMPTY = np.iinfo(np.uint64).max
"""Signature value of an empty shingle set; real values are below MERSENNE61."""
_P = np.uint64(MERSENNE61)
_WORD = re.compile(r"\w+")


def shingles(text: str, size: int) -> set[str]:
    """Word ``size``-grams of ``text``, lowercased; words are runs of Unicode ``\\w`` (punctuation splits).

    A text with fewer than ``size`` words gives one shingle of all its words; one with no word gives
    the empty set. Example: ``shingles("The cat, the HAT!", 2) == {"the cat", "cat the", "the hat"}``.
    """
    words = _WORD.findall(text.lower())
    if len(words) <= size:
        return {" ".join(words)} if words else set()
    return {" ".join(words[i : i + size]) for i in range(len(words) - size + 1)}


@functools.lru_cache(maxsize=8)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``(a, b)`` of the ``num_perm`` hash functions ``h(x) = (a*x + b) mod (2**61 - 1)``.

    Drawn from numpy's PCG64 stream for ``seed`` (cached, read-only): every worker of one run must
    use the same numpy, which a Ray cluster built from one image does.
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MERSENNE61, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MERSENNE61, size=num_perm, dtype=np.uint64)
    a.flags.writeable = b.flags.writeable = False
    return a, b


def _mod61(x: np.ndarray) -> np.ndarray:
    """``x mod (2**61 - 1)`` for any uint64 ``x``: 2**61 = 1 (mod p) folds the top 3 bits down."""
    x = (x & _P) + (x >> np.uint64(61))
    return np.where(x >= _P, x - _P, x)


def _mulmod61(a: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Exact ``a * x mod (2**61 - 1)`` for uint64 ``a, x < 2**61`` without 128-bit integers.

    With 32-bit halves, a*x = hi*2**64 + mid*2**32 + lo; modulo p, 2**64 = 8 and mid*2**32 folds to
    (mid >> 29) + (mid & (2**29 - 1)) * 2**32. Every term stays below 2**61, so the sum fits in 64 bits.
    """
    m32, s32 = np.uint64(0xFFFFFFFF), np.uint64(32)
    a_hi, a_lo, x_hi, x_lo = a >> s32, a & m32, x >> s32, x & m32
    mid = a_hi * x_lo + a_lo * x_hi  # < 2**62
    lo = a_lo * x_lo  # < 2**64
    total = (
        ((a_hi * x_hi) << np.uint64(3))
        + (mid >> np.uint64(29))
        + ((mid & np.uint64((1 << 29) - 1)) << s32)
        + (lo & _P)
        + (lo >> np.uint64(61))
    )
    return _mod61(total)


def minhash(shingle_set: Iterable[str], num_perm: int, seed: int) -> np.ndarray:
    """MinHash signature, shape ``(num_perm,)`` uint64: per hash function, the minimum over shingles.

    Each shingle is hashed with an 8-byte blake2b (stable across processes, unlike ``hash()``) and
    reduced mod 2**61 - 1. The empty set gives all ``EMPTY``.
    """
    digests = b"".join(hashlib.blake2b(s.encode(), digest_size=8).digest() for s in shingle_set)
    if not digests:
        return np.full(num_perm, EMPTY, dtype=np.uint64)
    x = _mod61(np.frombuffer(digests, dtype="<u8").astype(np.uint64))
    a, b = permutations(num_perm, seed)
    hashed = _mod61(_mulmod61(a[:, None], x[None, :]) + b[:, None])  # (num_perm, n_shingles)
    return hashed.min(axis=1)


def estimate_jaccard(sig_a: np.ndarray, sig_b: np.ndarray) -> float:
    """Share of equal signature values, an unbiased estimate of the Jaccard similarity."""
    return float(np.mean(sig_a == sig_b))


def lsh_params(
    threshold: float, num_perm: int, fp_weight: float = 0.5, fn_weight: float = 0.5
) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted false positive/negative area.

    As datasketch ``_optimal_param``: the false positive area is the integral over s in [0, threshold]
    of 1 - (1 - s**r)**b, the false negative area that of (1 - s**r)**b over [threshold, 1]. The
    integrals are taken with the trapezoid rule on 2001 points instead of scipy's ``quad``.
    """
    lo, hi = np.linspace(0.0, threshold, 2001), np.linspace(threshold, 1.0, 2001)
    best, best_err = (1, 1), float("inf")
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1.0 - (1.0 - lo**r) ** b, lo)
            fn = np.trapezoid((1.0 - hi**r) ** b, hi)
            err = float(fp_weight * fp + fn_weight * fn)
            if err < best_err:
                best, best_err = (b, r), err
    return best


def band_keys(sig: np.ndarray, bands: int, rows: int) -> list[str]:
    """One bucket key per band: ``"{band:03d}:"`` + a 12-byte blake2b of the band's values.

    The digest keeps keys short in the shuffle; a digest collision only adds a candidate pair, which
    the Jaccard check then rejects.
    """
    return [
        f"{i:03d}:" + hashlib.blake2b(sig[i * rows : (i + 1) * rows].tobytes(), digest_size=12).hexdigest()
        for i in range(bands)
    ]


class UnionFind:
    """Disjoint sets whose root is always the smallest member, so results do not depend on edge order."""

    def __init__(self) -> None:
        self.parent: dict[Any, Any] = {}

    def find(self, x: Hashable) -> Any:
        root = self.parent.setdefault(x, x)
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[x] != root:  # path compression
            self.parent[x], x = root, self.parent[x]
        return root

    def union(self, x: Hashable, y: Hashable) -> None:
        rx, ry = self.find(x), self.find(y)
        if rx != ry:
            lo, hi = (rx, ry) if rx < ry else (ry, rx)  # type: ignore[operator]
            self.parent[hi] = lo


def components(edges: Iterable[tuple[Any, Any]]) -> dict[Any, Any]:
    """Every id that appears in ``edges`` -> the smallest id of its connected component."""
    uf = UnionFind()
    for x, y in edges:
        uf.union(x, y)
    return {x: uf.find(x) for x in list(uf.parent)}


# ---- Ray Data batch functions (pure pyarrow; called by `dedup` inside Ray tasks) ----


def signature_rows(
    batch: pa.Table,
    text_columns: list[str],
    id_column: str,
    num_perm: int,
    seed: int,
    shingle_size: int,
    bands: int,
    rows: int,
) -> pa.Table:
    """One output row per (input row, band): ``band_key``, ``band``, ``id``, ``signature``.

    The text of a row is its non-null ``text_columns`` joined by a space. A row whose text has no
    word gives no output row, so it is never anyone's duplicate (two empty answers are failed
    generations, not copies of one example).
    """
    columns = [batch.column(c).to_pylist() for c in text_columns]
    ids = batch.column(id_column)
    take: list[int] = []
    keys: list[str] = []
    band: list[int] = []
    sigs: list[np.ndarray] = []
    for i, values in enumerate(zip(*columns, strict=True)):
        grams = shingles(" ".join(v for v in values if v is not None), shingle_size)
        if not grams:
            continue
        sig = minhash(grams, num_perm, seed)
        take += [i] * bands
        keys += band_keys(sig, bands, rows)
        band += range(bands)
        sigs += [sig] * bands
    flat = np.concatenate(sigs) if sigs else np.empty(0, dtype=np.uint64)
    return pa.table(
        {
            "band_key": pa.array(keys, pa.string()),
            "band": pa.array(band, pa.int32()),
            "id": ids.take(pa.array(take, pa.int64())),
            "signature": pa.FixedSizeListArray.from_arrays(pa.array(flat, pa.uint64()), num_perm),
        }
    )


def bucket_pairs(group: pa.Table, threshold: float, bands: int, rows: int) -> pa.Table:
    """Verified duplicate pairs ``(a, b)``, a < b, among the rows of one band bucket.

    Rows with identical signatures are linked to their smallest id (a star, emitted from band 0 only:
    identical signatures meet there first). The smallest ids of the distinct signatures are compared
    pairwise; a pair is kept when its estimated Jaccard >= ``threshold`` and this bucket's band is the
    first band where the two signatures agree, so no pair is emitted twice over the bands.
    """
    ids = group.column("id").to_pylist()
    band = group.column("band")[0].as_py()
    sigs = group.column("signature").combine_chunks().flatten().to_numpy().reshape(len(ids), -1)
    classes: dict[bytes, list[int]] = {}
    for i, sig in enumerate(sigs):
        classes.setdefault(sig.tobytes(), []).append(i)
    pairs: list[tuple[Any, Any]] = []
    reps = []
    for members in classes.values():
        rep = min(members, key=lambda i: ids[i])
        reps.append(rep)
        if band == 0:
            pairs += [(ids[rep], ids[m]) for m in members if m != rep]
    pairs += _verified([ids[i] for i in reps], sigs[reps], threshold, band, bands, rows)
    id_type = group.schema.field("id").type
    return pa.table(
        {"a": pa.array([a for a, _ in pairs], id_type), "b": pa.array([b for _, b in pairs], id_type)}
    )


def _verified(
    ids: list[Any], sigs: np.ndarray, threshold: float, band: int, bands: int, rows: int
) -> list[tuple[Any, Any]]:
    """Pairs of (distinct) signatures whose first agreeing band is ``band`` and estimate >= threshold."""
    banded = sigs[:, : bands * rows].reshape(len(ids), bands, rows)
    out = []
    for i in range(len(ids) - 1):
        agree = (banded[i + 1 :] == banded[i]).all(axis=2)  # (later rows, bands)
        first = np.where(agree.any(axis=1), agree.argmax(axis=1), -1)
        estimate = (sigs[i + 1 :] == sigs[i]).mean(axis=1)
        for j in np.flatnonzero((first == band) & (estimate >= threshold)):
            x, y = ids[i], ids[i + 1 + j]
            out.append((x, y) if x < y else (y, x))
    return out


def drop_ids(batch: pa.Table, id_column: str, removed: pa.Array) -> pa.Table:
    """The rows of ``batch`` whose id is not in ``removed``."""
    return batch.filter(pc.invert(pc.is_in(batch.column(id_column), value_set=removed)))


def dedup(
    ds: Any,
    text_columns: list[str],
    id_column: str = "id",
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle_size: int = 3,
    seed: int = 0,
    num_partitions: int | None = None,
    num_cpus: float = 0.25,
) -> tuple[Any, dict[str, Any], dict[Any, Any]]:
    """Drop near-duplicate rows of a Ray dataset (SPEED's post-generation dedup).

    Two rows are linked when their texts' estimated Jaccard similarity is >= ``threshold``; in each
    connected component the row with the smallest id is kept, every other row removed (a chain A~B~C
    removes C even when A and C differ more). Rows with no word are kept. The outcome depends only on
    the rows, not on blocks or partitions. Ids are unique and comparable (all int or all str).
    ``ds`` runs more than once (signatures and ``count()`` here, the filter when ``kept`` is
    consumed): pass one that re-reads the same rows (parquet, or ``materialize()`` it first).

    ``text_columns``: the columns whose non-null values, joined by a space, are the text compared;
    ``num_perm``: MinHash permutations; ``shingle_size``: words per shingle; ``num_partitions``: of
    the shuffle by band key (None: Ray Data's default); ``num_cpus``: per map task.

    Returns ``(kept, stats, removed)``: ``kept`` is ``ds`` without the removed rows (lazy, same
    columns); ``stats`` the counts and parameters; ``removed`` maps each removed id to the id kept for
    its group. E.g. ``dedup(ray.data.read_parquet(path), ["query", "positive"])`` gives ``removed ==
    {"ex-0042": "ex-0007"}`` and ``stats["bands"], stats["rows_per_band"] == (9, 13)``.
    """
    removed, stats, dropping = near_duplicates(
        ds, text_columns, id_column, threshold, num_perm, shingle_size, seed, num_partitions, num_cpus
    )
    # [4] Ray Data: drop the removed ids; the id list travels in the task's fn_kwargs.
    kw = {"id_column": id_column, "removed": dropping}
    kept = (
        ds.map_batches(drop_ids, batch_format="pyarrow", num_cpus=num_cpus, fn_kwargs=kw) if removed else ds
    )
    return kept, stats, removed


def near_duplicates(
    ds: Any,
    text_columns: list[str],
    id_column: str = "id",
    threshold: float = 0.8,
    num_perm: int = 128,
    shingle_size: int = 3,
    seed: int = 0,
    num_partitions: int | None = None,
    num_cpus: float = 0.25,
) -> tuple[dict[Any, Any], dict[str, Any], pa.Array]:
    """``dedup``'s decision without the filter: ``(removed, stats, removed ids as an Arrow array)``,
    for a caller that drops the ids itself (synth drops them shard by shard)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"dedup: threshold must be in (0, 1], got {threshold}")
    edges = _edges(
        ds, text_columns, id_column, threshold, num_perm, shingle_size, seed, num_partitions, num_cpus
    )
    # [3] Driver: union-find over the edge list, streamed batch by batch.
    removed, id_type = removed_ids(edges.iter_batches(batch_format="pyarrow", batch_size=None))
    input_rows = ds.count()
    bands, rows = lsh_params(threshold, num_perm)
    params = {"threshold": threshold, "num_perm": num_perm, "bands": bands, "rows_per_band": rows}
    stats = {"input_rows": input_rows, "removed": len(removed), "kept": input_rows - len(removed)}
    stats |= params | {"shingle_size": shingle_size, "duplicate_groups": len(set(removed.values()))}
    return removed, stats, pa.array(sorted(removed), id_type)


def _edges(
    ds: Any,
    text_columns: list[str],
    id_column: str,
    threshold: float,
    num_perm: int,
    shingle_size: int,
    seed: int,
    num_partitions: int | None,
    num_cpus: float,
) -> Any:
    """The dataset of verified near-duplicate pairs ``(a, b)``, by LSH band buckets."""
    bands, rows = lsh_params(threshold, num_perm)
    # [1] Ray Data: signatures and band keys, one row per (input row, band).
    signing = {"text_columns": text_columns, "id_column": id_column, "num_perm": num_perm, "seed": seed}
    signing |= {"shingle_size": shingle_size, "bands": bands, "rows": rows}
    keyed = ds.map_batches(signature_rows, batch_format="pyarrow", num_cpus=num_cpus, fn_kwargs=signing)
    # [2] Ray Data: shuffle by band key; verified pairs inside each bucket.
    pairs = keyed.groupby("band_key", num_partitions=num_partitions).map_groups(
        bucket_pairs,
        batch_format="pyarrow",
        num_cpus=num_cpus,
        fn_kwargs={"threshold": threshold, "bands": bands, "rows": rows},
    )
    return pairs


def removed_ids(edges: Iterable[pa.Table]) -> tuple[dict[Any, Any], Any]:
    """Union-find over batches of ``(a, b)`` edges: each removed id -> the id kept for its group
    (the smallest), and the ids' Arrow type."""
    uf, id_type = UnionFind(), None
    for batch in edges:
        id_type = batch.schema.field("a").type
        for x, y in zip(batch.column("a").to_pylist(), batch.column("b").to_pylist(), strict=True):
            uf.union(x, y)
    return {x: uf.find(x) for x in list(uf.parent) if uf.find(x) != x}, id_type


def drop_shard(rows: pa.Table, removed: pa.Array) -> tuple[pa.Table, dict[str, Any]]:
    """One shard of rows without the ``removed`` ids (synth writes its examples so), and no counts."""
    return (drop_ids(rows, "id", removed) if len(removed) else rows), {}
