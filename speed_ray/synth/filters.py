"""Quality filters for example rows, and the ``synth/filtered`` shard: pure functions, no Ray.

A small generator writes rows that parse but teach nothing or the wrong thing (docs/results.md,
experiment C: about half of SmolLM2-135M's queries are placeholders such as "S1", "a task", "the
document"; a quarter of its negatives repeat the positive). Each rule below names its reason, and
``synth/filtered`` counts every drop by reason in its manifest:

- a query or positive that is a placeholder or a key name (``placeholder``): the row is dropped;
- the positive equal to the query (case and blanks aside): dropped;
- a query under ``min_query_words`` words or ``min_query_chars`` characters: dropped;
- a negative that is a placeholder, or equal to the positive or the query: only the negative is
  dropped (the query and positive still make a pair, and mining can give it another negative);
- round trip (Promptagator, arXiv 2209.11755; InPars, arXiv 2202.05144): a row whose positive the
  retriever does not rank within the top ``round_trip_k`` of the corpus for its query is dropped.

Each row is dropped for its first reason in that order.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import pyarrow as pa

from speed_ray.io.schemas import FILTERED, cast_rows
from speed_ray.synth.mining import hard_negatives, normalised

# Field and schema names a generator copies into a value instead of writing one: SPEED's JSON keys,
# their parts, and the words a prompt uses for them. Matched whole, after ``_key``.
KEY_NAMES = frozenset(
    {
        "query",
        "user query",
        "positive",
        "negative",
        "document",
        "positive document",
        "negative document",
        "hard negative",
        "hard negative document",
        "passage",
        "text",
        "input",
        "input text",
        "output",
        "sentence",
        "instruction",
        "task",
        "label",
        "misleading label",
        "answer",
        "question",
        "example",
        "topic",
        "title",
        "content",
        "string",
        "str",
        "value",
        "field",
        "placeholder",
        "none",
        "null",
        "nil",
        "na",
        "tbd",
        "todo",
        "",
    }
)
# Words that are real labels of classification tasks (sentiment): never placeholders there.
LABEL_WORDS = frozenset({"positive", "negative", "neutral", "label", "question", "answer", "text"})
NUMBERED = re.compile(r"[a-z]\d{1,2}")  # "S1", "q2": SPEED's STS keys and their like
TEMPLATE = re.compile(r"\s*(<[^<>]*>|\{[^{}]*\}|\[[^\[\]]*\])\s*")  # "<query>", "{document}", "[text]"
ARTICLE = re.compile(r"^(a|an|the|your|my|some)\s+")

ROW_REASONS = (
    "query placeholder",
    "positive placeholder",
    "positive = query",
    "query too short",
    "round trip",
)
NEGATIVE_REASONS = ("negative placeholder", "negative = positive", "negative = query")
SAMPLES_PER_SHARD = 2
"""Dropped rows kept as examples per reason and shard (the manifest keeps 3 per reason)."""


def _key(text: str) -> str:
    """``text`` lowercased, with ``_``/``-`` as blanks, punctuation gone and a leading article off."""
    words = re.sub(r"[^\w\s]", "", text.casefold().replace("_", " ").replace("-", " "))
    return ARTICLE.sub("", " ".join(words.split()))


def placeholder(text: str | None, label: bool = False) -> bool:
    """Whether ``text`` is a placeholder or a key name rather than a value: empty, a template
    (``<query>``), a numbered key (``S1``), a null word (``N/A``) or a key name (``the document``,
    ``hard_negative_document``). ``label``: the text is a classification label, where words such as
    "positive" are real labels."""
    if text is None or TEMPLATE.fullmatch(text):
        return True
    key = _key(text)
    if NUMBERED.fullmatch(key):
        return True
    return key in KEY_NAMES and not (label and key in LABEL_WORDS)


def row_reason(row: dict[str, Any], min_query_words: int, min_query_chars: int) -> str | None:
    """Why the rule filters drop ``row`` (an EXAMPLES row), or None to keep it."""
    label = row.get("task_type") == "classification"  # its positive is a label, its length no matter
    query, positive = row["query"] or "", row["positive"] or ""
    if placeholder(query):
        return "query placeholder"
    if placeholder(positive, label):
        return "positive placeholder"
    if normalised(positive) == normalised(query):
        return "positive = query"
    if len(query.split()) < min_query_words or len(query.strip()) < min_query_chars:
        return "query too short"
    return None


def negative_reason(row: dict[str, Any]) -> str | None:
    """Why the row's own negative is dropped (the row is kept), or None: no negative, or a good one."""
    negative = row["negative"]
    if not negative:
        return None
    if placeholder(negative, row.get("task_type") == "classification"):
        return "negative placeholder"
    if normalised(negative) == normalised(row["positive"]):
        return "negative = positive"
    if normalised(negative) == normalised(row["query"]):
        return "negative = query"
    return None


def filtered_shard(
    examples: pa.Table,
    neighbours: pa.Table | None = None,
    *,
    enabled: bool = True,
    min_query_words: int = 2,
    min_query_chars: int = 6,
    round_trip_k: int = 0,
    negatives: int = 0,
    max_ratio: float = 0.95,
) -> tuple[pa.Table, dict[str, Any]]:
    """One shard of ``synth/filtered`` from the same shard of ``synth/examples`` (and of
    ``synth/neighbours`` when the retriever ranked the corpus): the rows the filters keep (all with
    ``enabled`` false), each with ``negatives`` mined negatives. Counts: rows in, rows dropped and
    negatives dropped by reason, negatives mined, rows by number of negatives, and a few dropped
    rows per reason."""
    found = {r["id"]: r for r in neighbours.to_pylist()} if neighbours is not None else {}
    dropped: Counter[str] = Counter()
    cleared: Counter[str] = Counter()
    samples: dict[str, list[dict[str, Any]]] = {}
    kept = []
    for row in examples.to_pylist():
        near = found.get(row["id"])
        if neighbours is not None and near is None:
            raise ValueError(f"synth/neighbours has no row for example {row['id']}: delete it to rank again")
        why = _drop(row, near, enabled, min_query_words, min_query_chars, round_trip_k)
        if why is None and enabled:
            neg = negative_reason(row)
            if neg is not None:
                cleared[neg] += 1
                _sample(samples, neg, row)
                row = row | {"negative": None}
        if why is not None:
            dropped[why] += 1
            _sample(samples, why, row)
            continue
        kept.append(_with_mined(row, near, negatives, max_ratio))
    per_row = Counter(str(bool(r["negative"]) + len(r["mined_negatives"])) for r in kept)
    counts = {
        "rows_in": examples.num_rows,
        "dropped": dict(dropped),
        "negatives_dropped": dict(cleared),
        "mined": sum(len(r["mined_negatives"]) for r in kept),
        "negatives_per_row": dict(per_row),
        "samples": samples,
    }
    return cast_rows(kept, FILTERED), counts


def _drop(
    row: dict[str, Any], near: dict[str, Any] | None, enabled: bool, words: int, chars: int, k: int
) -> str | None:
    """The row's reason to be dropped: a rule's, then the round trip's (with ``k`` and a ranking)."""
    if not enabled:
        return None
    why = row_reason(row, words, chars)
    if why is None and k and near is not None and near["rank"] > k:
        why = "round trip"
    return why


def _with_mined(row: dict[str, Any], near: dict[str, Any] | None, n: int, max_ratio: float) -> dict:
    """``row`` as FILTERED holds it: its positive's rank and ``n`` hard negatives (none without a
    ranking), never its own negative again."""
    mined: list[str] = []
    if n and near is not None:
        mined = hard_negatives(
            row["query"],
            row["positive"],
            near["positive_score"],
            near["candidates"],
            near["scores"],
            n,
            max_ratio,
            exclude=(row["negative"],),
        )
    return row | {"mined_negatives": mined, "rank": near["rank"] if near else None}


def _sample(samples: dict[str, list[dict[str, Any]]], reason: str, row: dict[str, Any]) -> None:
    """Keep ``row`` (cut short) as an example of ``reason`` while the shard has few."""
    kept = samples.setdefault(reason, [])
    if len(kept) < SAMPLES_PER_SHARD:
        kept.append({k: (row[k] or "")[:120] for k in ("id", "query", "positive", "negative")})


def trim_samples(samples: dict[str, list[dict[str, Any]]], n: int = 3) -> dict[str, list[dict[str, Any]]]:
    """The first ``n`` sample rows per reason (the shards' samples, joined, for the manifest)."""
    return {reason: rows[:n] for reason, rows in samples.items()}
