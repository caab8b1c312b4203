"""Pure logic of the synth stage: request rows, parsing of generated batches, example selection and
preference pairs. No Ray, no model: the Ray side is ``speed_ray.synth.loop`` and
``speed_ray.synth.driver``.

Row ids and seeds are hashes of (run seed, round, inputs), so a rerun builds the same rows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    JUDGMENTS,
    PREFERENCE_PAIRS,
    TASKS,
    assistant,
    cast_rows,
    error_kind,
)
from speed_ray.synth import prompts
from speed_ray.synth.parsing import parse_judgment, parse_revision, parse_task_list, to_triplet


def stable_id(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def stable_seed(*parts: object) -> int:
    return int(stable_id(*parts)[:8], 16)


def load_topics(
    path: str | None, inline: list[str], num_topics: int, seed: int, key: str = "synth.num_topics"
) -> list[str]:
    """Topic paths (inline, a file, or the built-in taxonomy), truncated per SPEED App. D.1,
    deduplicated, shuffled with ``seed``; the first ``num_topics``."""
    from speed_ray.synth import taxonomy

    paths = inline or taxonomy.read_taxonomy(path or taxonomy.default_topics_path())
    unique = list(dict.fromkeys(taxonomy.truncate(t) for t in paths))
    if num_topics > len(unique):
        source = "synth.taxonomy.topics" if inline else (path or "the built-in taxonomy")
        raise ValueError(
            f"{key}: {num_topics} asked for, but {source} has {len(unique)} distinct topics "
            "(lower num_topics, or raise synth.examples_per_task for more rows per topic)"
        )
    random.Random(seed).shuffle(unique)
    return unique[:num_topics]


def assign_task_types(topics: list[str], mix: dict[str, float], seed: int) -> list[tuple[str, str]]:
    """One task type per topic in the ``mix`` proportions (largest remainder), in a seeded order."""
    weights = {t: w for t, w in sorted(mix.items()) if w > 0}
    total = sum(weights.values())
    quotas = {t: len(topics) * w / total for t, w in weights.items()}
    counts = {t: int(q) for t, q in quotas.items()}
    by_remainder = sorted(weights, key=lambda t: (counts[t] - quotas[t], t))
    for t in by_remainder[: len(topics) - sum(counts.values())]:
        counts[t] += 1
    types = [t for t in weights for _ in range(counts[t])]
    random.Random(stable_seed(seed, "mix")).shuffle(types)
    return list(zip(topics, types, strict=True))


def task_requests(
    topics: list[str], mix: dict[str, float], seed: int, max_chars: int
) -> list[dict[str, Any]]:
    """One brainstorm request per topic for its assigned task type; STS has no brainstorm (it takes
    the topic)."""
    rows = []
    for topic, task_type in assign_task_types(topics, mix, seed):
        rid = stable_id(seed, "tasks", topic, task_type)
        rng = random.Random(stable_seed(seed, rid))
        kind = prompts.kinds_for(task_type, rng)
        row = {
            "id": rid,
            "topic": topic,
            "task_type": task_type,
            "kind": kind,
            "seed": stable_seed(seed, rid, 0),
        }
        if kind == "sts":
            row.update(messages="", json_schema="", task=topic)
        else:
            msgs = prompts.brainstorm_prompt(kind, topic, rng)
            row.update(
                messages=json.dumps(msgs), json_schema=json.dumps(prompts.brainstorm_schema(max_chars))
            )
        rows.append(row)
    return rows


def parse_tasks(batch: pa.Table) -> pa.Table:
    """Brainstorm outputs -> TASKS rows, keeping the first task of each list (SPEED: 1 task per topic)."""
    out = []
    for r in batch.to_pylist():
        tasks, err = parse_task_list(r["raw"])
        out.append(
            {k: r[k] for k in ("id", "topic", "task_type", "kind", "raw")}
            | {"task": tasks[0] if tasks else None}
            | outcome(r, err, "tasks")
        )
    return cast_rows(out, TASKS)


def outcome(r: dict[str, Any], err: str | None, round_: str, prompt_id: str | None = None) -> dict[str, Any]:
    """The columns every parsed engine output carries: its error (the engine's own comes first),
    provenance and token accounting."""
    return {
        "error": r.get("engine_error") or err,
        "generator": r["generator"],
        "prompt_id": prompt_id or r["id"],
        "seed": r["seed"],
        "round": round_,
        "num_input_tokens": r["num_input_tokens"],
        "num_output_tokens": r["num_output_tokens"],
    }


def is_sts(row: dict[str, Any]) -> bool:
    """A brainstorm row that needs no model call (``sts_tasks`` answers it)."""
    return row["kind"] == "sts"


def sts_tasks(rows: list[dict[str, Any]]) -> pa.Table:
    """STS rows need no model call: the task is the topic itself."""
    out = [
        {k: r[k] for k in ("id", "topic", "task_type", "kind", "task", "seed")}
        | {"prompt_id": r["id"], "round": "tasks", "num_input_tokens": 0, "num_output_tokens": 0}
        for r in rows
    ]
    return cast_rows(out, TASKS)


def example_requests(
    tasks: list[dict[str, Any]], seed: int, max_chars: int, per_task: int = 1
) -> Iterator[dict[str, Any]]:
    """``per_task`` synthesis requests per valid task, each with its own seeded placeholders, made as
    they are consumed (a million prompts never sit in one list)."""
    for t, j in itertools.product(tasks, range(per_task)):
        if t["error"] is not None or not t["task"]:
            continue
        rid = stable_id(seed, "examples", t["id"], *([j] if j else []))
        rng = random.Random(stable_seed(seed, rid))
        msgs = prompts.synthesis_prompt(t["kind"], t["task"], rng)
        yield (
            {
                "id": rid,
                "topic": t["topic"],
                "task_type": t["task_type"],
                "kind": t["kind"],
                "task": t["task"],
                "messages": json.dumps(msgs),
                "json_schema": json.dumps(prompts.synthesis_schema(t["kind"], max_chars)),
                "seed": stable_seed(seed, rid, 0),
            }
        )


def parse_generations(batch: pa.Table) -> pa.Table:
    """Generated examples -> GENERATIONS rows with (instruction, query, positive, negative) or an error."""
    out = []
    for r in batch.to_pylist():
        fields, err = to_triplet(r["kind"], r["task"], r["raw"])
        out.append(
            {k: r[k] for k in ("id", "sample", "topic", "task_type", "kind", "task", "messages", "raw")}
            | {"instruction": None, "query": None, "positive": None, "negative": None}
            | fields
            | outcome(r, err, "examples")
        )
    return cast_rows(out, GENERATIONS)


def group_samples(generations: pa.Table) -> dict[str, list[dict[str, Any]]]:
    """Generation rows by example prompt id, each list ordered by sample index."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in sorted(generations.to_pylist(), key=lambda r: (r["id"], r["sample"])):
        groups[r["id"]].append(r)
    return groups


def judge_requests(
    groups: dict[str, list[dict[str, Any]]], seed: int, max_chars: int
) -> list[dict[str, Any]]:
    """One judge request per example prompt with at least two samples: the data prompt and its outputs."""
    rows = []
    for gid, samples in sorted(groups.items()):
        if len(samples) < 2:
            continue
        data_prompt = json.loads(samples[0]["messages"])[-1]["content"]
        rid = stable_id(seed, "judge", gid)
        rows.append(
            {
                "id": rid,
                "example_id": gid,
                "samples": len(samples),
                "messages": json.dumps(prompts.judge_prompt(data_prompt, [s["raw"] for s in samples])),
                "json_schema": json.dumps(prompts.judge_schema(len(samples), max_chars)),
                "seed": stable_seed(seed, rid, 0),
            }
        )
    return rows


def parse_judgments(batch: pa.Table) -> pa.Table:
    """Judge outputs -> JUDGMENTS rows (best, worst, reason) or an error."""
    out = []
    for r in batch.to_pylist():
        verdict, err = parse_judgment(r["raw"], r["samples"])
        out.append(
            {k: r[k] for k in ("id", "example_id", "samples", "raw")}
            | {"best": None, "worst": None, "reason": None}
            | verdict
            | outcome(r, err, "judge")
        )
    return cast_rows(out, JUDGMENTS)


def pick_drafts(groups: dict[str, list[dict[str, Any]]], judgments: pa.Table | None = None) -> pa.Table:
    """One draft per example prompt: the judge's best sample if it parsed, else the first valid one.

    Returns GENERATIONS rows; prompts with no valid sample give no draft (the counts show them).
    """
    best = {}
    if judgments is not None:
        best = {j["example_id"]: j["best"] for j in judgments.to_pylist() if j["error"] is None}
    out = []
    for gid, samples in sorted(groups.items()):
        valid = [s for s in samples if s["error"] is None]
        judged = samples[best[gid]] if gid in best and best[gid] < len(samples) else None
        pick = judged if judged is not None and judged["error"] is None else (valid[0] if valid else None)
        if pick is not None:
            out.append(pick)
    return cast_rows(out, GENERATIONS)


def revise_requests(drafts: list[dict[str, Any]], seed: int, max_chars: int) -> list[dict[str, Any]]:
    """One reviser request per draft: its data prompt and the example in the generator's own keys."""
    rows = []
    for d in drafts:
        keys = prompts.FIELDS[d["kind"]]
        example = {k: d[name] for k, name in zip(keys, ("query", "positive", "negative"), strict=True) if k}
        data_prompt = json.loads(d["messages"])[-1]["content"]
        rid = stable_id(seed, "revise", d["id"])
        rows.append(
            {k: d[k] for k in ("topic", "task_type", "kind", "task", "sample")}
            | {
                "id": rid,
                "draft_id": d["id"],
                "messages": json.dumps(prompts.revise_prompt(data_prompt, json.dumps(example))),
                "json_schema": json.dumps(prompts.revise_schema(d["kind"], max_chars)),
                "seed": stable_seed(seed, rid, 0),
            }
        )
    return rows


def parse_revisions(batch: pa.Table) -> pa.Table:
    """Reviser outputs -> GENERATIONS rows (id = the draft's id, round ``revision``) or an error."""
    out = []
    for r in batch.to_pylist():
        fields, err = parse_revision(r["kind"], r["task"], r["raw"])
        out.append(
            {k: r[k] for k in ("id", "topic", "task_type", "kind", "task", "messages", "raw")}
            | {
                "sample": 0,
                "instruction": None,
                "query": None,
                "positive": None,
                "negative": None,
                "reason": None,
            }
            | fields
            | outcome(r, err, "revision", prompt_id=r["draft_id"])
        )
    return cast_rows(out, GENERATIONS)


def final_rows(drafts: pa.Table, revisions: pa.Table | None) -> pa.Table:
    """EXAMPLES rows: each draft's revision when it parsed, else the draft itself (one row per draft).

    A revised row keeps the draft's id and task, and names the reviser as its generator.
    """
    revised = {}
    if revisions is not None:
        revised = {r["prompt_id"]: r for r in revisions.to_pylist() if r["error"] is None}
    keep = set(EXAMPLES.names)
    out = []
    for d in drafts.to_pylist():
        r = revised.get(d["id"])
        row = (
            d if r is None else d | {k: r[k] for k in ("query", "positive", "negative", "generator", "round")}
        )
        out.append({k: v for k, v in row.items() if k in keep})
    return cast_rows(out, EXAMPLES)


def training_triplets(examples: pa.Table, negatives: int = 1) -> pa.Table:
    """The embedding training set (TRIPLETS), one row per example: the anchor is the query with its
    task instruction as SPEED and E5 train it (``Instruct: {instruction}\nQuery: {query}``), the
    negative '' where the example has none. Filtered examples (FILTERED) bring their mined negatives
    after their own; with ``negatives`` > 1 they go to ``negative_1`` .. ``negative_n``
    (``triplets_schema``), '' where a row has fewer."""
    from speed_ray.io.schemas import instructed_query, triplets_schema

    mined = examples["mined_negatives"].to_pylist() if "mined_negatives" in examples.column_names else None
    schema = triplets_schema(negatives)
    out = []
    for i, r in enumerate(examples.select(["instruction", "query", "positive", "negative"]).to_pylist()):
        negs = [n for n in [r["negative"], *(mined[i] if mined else [])] if n]
        negs += [""] * (len(schema) - 2 - len(negs))
        out.append(
            {"anchor": instructed_query(r["instruction"], r["query"]), "positive": r["positive"]}
            | dict(zip(schema.names[2:], negs, strict=False))
        )
    return cast_rows(out, schema)


def quality_score(row: dict[str, Any]) -> float:
    """Rule-based preference for the thin run (the teacher judge replaces it): higher is better.

    0 for an unparsable sample. Otherwise 1, plus the share of letters and spaces in its fields (a
    crude fluency signal that separates text from symbol soup), plus 1 each for a positive that differs
    from the query and a hard negative that differs from the positive.
    """
    if row["error"] is not None:
        return 0.0
    fields = [row[k] for k in ("query", "positive", "negative") if row[k]]
    text = "".join(fields)
    fluency = sum(c.isascii() and (c.isalpha() or c == " ") for c in text) / max(1, len(text))
    score = 1.0 + fluency
    score += float(row["positive"].strip().lower() != row["query"].strip().lower())
    score += float(
        row["negative"] is None or row["negative"].strip().lower() != row["positive"].strip().lower()
    )
    return score


def preference_pairs(
    groups: dict[str, list[dict[str, Any]]], judgments: pa.Table | None = None, fallback: bool = True
) -> tuple[pa.Table, dict[str, int]]:
    """(prompt, chosen=best, rejected=worst) per prompt (SPEED's D_DPO) in TRL's conversational
    preference format, and the dropped prompts by reason.

    The judge decides where its verdict parsed. Elsewhere (no judge, or an unusable verdict) the
    rule-based ``quality_score`` decides when ``fallback`` is on (prompts whose samples tie under it
    give no pair), and the prompt is dropped when it is off. The ``reason`` column says which decided.
    """
    verdicts, failed = {}, {}
    if judgments is not None:
        for j in judgments.to_pylist():
            if j["error"] is None:
                verdicts[j["example_id"]] = j
            else:
                failed[j["example_id"]] = f"judge: {error_kind(j['error'])}"
    out: list[dict[str, Any]] = []
    dropped: Counter[str] = Counter()
    for gid, samples in sorted(groups.items()):
        j = verdicts.get(gid)
        if j is not None and j["samples"] == len(samples):
            best, worst, reason = samples[j["best"]], samples[j["worst"]], f"judge: {j['reason']}"
        elif not fallback:
            dropped[failed.get(gid, "fewer than 2 samples" if len(samples) < 2 else "no verdict")] += 1
            continue
        else:
            ranked = sorted(samples, key=lambda r: (-quality_score(r), r["sample"]))
            best, worst = ranked[0], ranked[-1]
            if quality_score(best) == quality_score(worst):
                dropped["rule scores tie"] += 1
                continue
            reason = f"rule score {quality_score(best):.3f} > {quality_score(worst):.3f}" + (
                f" ({worst['error']})" if worst["error"] else ""
            )
        out.append(
            {
                "id": gid,
                "prompt": json.loads(best["messages"]),
                "chosen": assistant(best["raw"]),
                "rejected": assistant(worst["raw"]),
                "reason": reason,
            }
        )
    return cast_rows(out, PREFERENCE_PAIRS), dict(dropped)


# ---- One shard at a time: the steps after generation run these on the workers, each over shard s
# of the steps it reads (``speed_ray.synth.stage``). A prompt's samples all lie in one shard. ----


def judge_shard(generations: pa.Table, seed: int, max_chars: int) -> list[dict[str, Any]]:
    """The judge's requests for one shard of samples."""
    return judge_requests(group_samples(generations), seed, max_chars)


def pairs_shard(
    generations: pa.Table, judgments: pa.Table | None = None, fallback: bool = True
) -> tuple[pa.Table, dict[str, Any]]:
    """One shard's preference pairs, and how many prompts came in, were judged or rule-scored, or
    were dropped (by reason)."""
    groups = group_samples(generations)
    table, dropped = preference_pairs(groups, _verdicts_for(judgments, groups), fallback=fallback)
    judged = sum(r.startswith("judge: ") for r in table["reason"].to_pylist())
    counts = {"rows_in": len(groups), "judged": judged, "rule_scored": table.num_rows - judged}
    return table, counts | {"dropped": dropped}


def drafts_shard(generations: pa.Table, judgments: pa.Table | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """One shard's drafts (``pick_drafts``) and its number of prompts."""
    groups = group_samples(generations)
    return pick_drafts(groups, _verdicts_for(judgments, groups)), {"prompts": len(groups)}


def revise_shard(rows: pa.Table, seed: int, max_chars: int, pick: bool = False) -> list[dict[str, Any]]:
    """The reviser's requests for one shard of drafts, or with ``pick`` of samples (the first valid
    sample of each prompt is its draft)."""
    drafts = pick_drafts(group_samples(rows)) if pick else rows
    return revise_requests(drafts.to_pylist(), seed, max_chars)


def final_shard(drafts: pa.Table, revisions: pa.Table | None = None) -> tuple[pa.Table, dict[str, Any]]:
    """One shard's final rows (``final_rows``), with the number of drafts and of those revised."""
    rows = final_rows(drafts, revisions)
    counts = {"drafts": rows.num_rows}
    if revisions is not None:
        counts["revised"] = rows.num_rows - sum(r == "examples" for r in rows["round"].to_pylist())
    return rows, counts


def write_triplets_part(examples: pa.Table, out_dir: Path, negatives: int = 1) -> pa.Table:
    """One block of examples (sorted by id) written as a part of the training set, named by its first
    id; returns its manifest entry and that id (none for an empty block)."""
    from speed_ray.io.schemas import triplets_schema, write_shard

    schema = pa.schema([("name", pa.string()), ("num_rows", pa.int64()), ("sha256", pa.string())])
    schema = schema.append(pa.field("first_id", pa.string()))
    if examples.num_rows == 0:
        return schema.empty_table()
    first = examples["id"][0].as_py()
    table = training_triplets(examples, negatives)
    entry = write_shard(out_dir / f"part_{first}.parquet", table, triplets_schema(negatives))
    return pa.Table.from_pylist([entry | {"first_id": first}], schema=schema)


def _verdicts_for(judgments: pa.Table | None, groups: dict[str, list[dict[str, Any]]]) -> pa.Table | None:
    """``judgments``, checked to judge the prompts of ``groups`` (the same shard of the samples)."""
    if judgments is not None:
        strays = set(judgments["example_id"].to_pylist()) - set(groups)
        if strays:
            raise ValueError(
                f"judgments of prompts not in this shard of samples ({sorted(strays)[:3]}): the two "
                "steps come from different runs; delete the judgments folder to judge again"
            )
    return judgments
