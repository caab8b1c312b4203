"""`dedup` on 40 hand-built rows: exact outcome, independent of blocks, equal to a brute-force reference.

Texts are 40 distinct words drawn from VOCAB (so a text has exactly 38 word 3-grams). The margins are
wide: duplicates have Jaccard 1.0, 0.95 (last word changed: 37/39) or 0.90 (first and last: 36/40);
the intermediate pair shares its first 27 words (25/51 = 0.49); unrelated texts share nothing.
"""

from __future__ import annotations

import itertools
import random

import pytest

from speed_ray.synth.dedup import dedup, shingles

WORDS = """
river mountain forest desert ocean island valley canyon glacier volcano meadow prairie swamp lagoon
harbor bridge tunnel castle temple market village city tower garden orchard vineyard farm barn mill
engine motor piston turbine battery circuit signal sensor cable switch valve pump gear lever pulley
violin piano guitar trumpet drum flute cello harp choir opera ballet poem novel story chapter verse
apple banana cherry grape lemon mango melon orange peach pear plum berry carrot onion potato tomato
doctor nurse teacher farmer baker painter sailor pilot judge lawyer miner tailor hunter writer singer
winter summer autumn spring morning evening midnight sunrise sunset storm thunder rain snow fog wind
copper silver gold iron steel glass marble granite clay sand salt sugar flour butter honey cheese
bicycle wagon train rocket canoe sled tractor truck ferry carriage balloon subway scooter trolley
physics algebra geometry biology chemistry history grammar logic ethics music theatre sculpture
kettle blanket lantern mirror ladder basket bucket candle pillow carpet curtain drawer shelf
whale eagle tiger rabbit turtle falcon otter badger beaver salmon lizard spider beetle parrot camel
"""
VOCAB = WORDS.split()
BASE = [random.Random(k).sample(VOCAB, 40) for k in range(40)]


def row(
    i: int, words: list[str] | None = None, query: str | None = None, positive: str | None = None
) -> dict:
    if words is not None:
        query, positive = " ".join(words[:10]), " ".join(words[10:])
    return {"id": i, "query": query, "positive": positive, "task": f"task-{i % 4}"}


def build_rows() -> list[dict]:
    rows = [row(i, BASE[i]) for i in range(20)]
    loud = [w.upper() + "," for w in BASE[7]]
    rows += [
        row(20, BASE[3]),  # exact copies of 3
        row(21, BASE[3]),
        row(22, query=" ".join(loud[:5]) + "!", positive=" ".join(loud[5:]) + "?"),  # 7, shouted
        row(23, BASE[5][:-1] + ["zebra"]),  # 5 with its last word changed
        row(24, ["yak"] + BASE[5][1:-1] + ["zebra"]),  # 23 with its first word changed
        row(25, BASE[9][:27] + BASE[25][:13]),  # shares 27 words with 9: kept
        row(26, BASE[26]),
        row(27, query="", positive=""),  # no words: never duplicates
        row(28, query="", positive=""),
        row(29),
        row(30, query="!!!", positive="... ?"),
        row(31, query="Hello world"),  # shorter than a shingle
        row(32, positive="hello, WORLD."),
        row(33, positive=" ".join(BASE[27][10:])),
    ]
    rows[11] = row(11, BASE[26][:-1] + ["koala"])  # 11 is a near copy of 26 and keeps the lower id
    rows += [row(i, BASE[i]) for i in range(34, 40)]
    return rows


EXPECTED_REMOVED = {20: 3, 21: 3, 22: 7, 23: 5, 24: 5, 26: 11, 32: 31}


def text(r: dict) -> str:
    return " ".join(v for v in (r["query"], r["positive"]) if v is not None)


def brute_force(rows: list[dict], threshold: float, size: int) -> dict[int, int]:
    """Exact Jaccard over all pairs of non-empty shingle sets, then connected components by search."""
    sets = {r["id"]: shingles(text(r), size) for r in rows}
    sets = {i: s for i, s in sets.items() if s}
    links: dict[int, set[int]] = {i: set() for i in sets}
    for x, y in itertools.combinations(sets, 2):
        jaccard = len(sets[x] & sets[y]) / len(sets[x] | sets[y])
        assert jaccard >= 0.89 or jaccard <= 0.5, (x, y, jaccard)  # no pair near the threshold
        if jaccard >= threshold:
            links[x].add(y)
            links[y].add(x)
    removed, seen = {}, set()
    for start in sorted(sets):
        if start in seen:
            continue
        group, todo = {start}, [start]
        while todo:
            for n in links[todo.pop()] - group:
                group.add(n)
                todo.append(n)
        seen |= group
        removed |= {m: min(group) for m in group if m != min(group)}
    return removed


@pytest.fixture(scope="module")
def results(ray_session):
    rows = build_rows()
    out = {}
    for blocks in (1, 7):
        ds = ray_session.data.from_items(rows).repartition(blocks)
        kept, stats, removed = dedup(ds, ["query", "positive"], num_partitions=4)
        out[blocks] = (sorted(kept.take_all(), key=lambda r: r["id"]), stats, removed)
    return rows, out


def test_exact_outcome(results):
    rows, out = results
    kept, stats, removed = out[7]
    assert removed == EXPECTED_REMOVED
    assert [r["id"] for r in kept] == [i for i in range(40) if i not in EXPECTED_REMOVED]
    assert kept == [r for r in rows if r["id"] not in EXPECTED_REMOVED]  # rows pass through untouched
    assert stats == {
        "input_rows": 40,
        "removed": 7,
        "kept": 33,
        "threshold": 0.8,
        "num_perm": 128,
        "bands": 9,
        "rows_per_band": 13,
        "shingle_size": 3,
        "duplicate_groups": 5,
    }


def test_same_result_for_1_and_7_blocks(results):
    _, out = results
    assert out[1] == out[7]


def test_equals_brute_force_reference(results):
    rows, out = results
    assert brute_force(rows, 0.8, 3) == EXPECTED_REMOVED == out[7][2]
