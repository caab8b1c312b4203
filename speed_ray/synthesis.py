"""Pure logic of the synth stage: request rows, parsing of generated batches, example selection and
preference pairs. No Ray, no model: the Ray side is ``speed_ray.pipeline.synth``.

Row ids and seeds are hashes of (run seed, round, inputs), so a rerun builds the same rows.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray import prompts
from speed_ray.parsing import parse_task_list, to_triplet
from speed_ray.schemas import EXAMPLES, GENERATIONS, PREFERENCE_PAIRS, TASKS, cast_rows


def stable_id(*parts: object) -> str:
    return hashlib.sha1("|".join(map(str, parts)).encode()).hexdigest()[:16]


def stable_seed(*parts: object) -> int:
    return int(stable_id(*parts)[:8], 16)


def load_topics(topics: list[str], topics_file: str | None, num_topics: int, seed: int) -> list[str]:
    """Topic paths (file or inline), truncated per SPEED App. D.1, deduplicated, seeded shuffle, first N."""
    if topics_file is not None:
        lines = Path(topics_file).read_text().splitlines()
        topics = [t for t in (line.strip() for line in lines) if t and not t.startswith("#")]
        if not topics:
            raise ValueError(f"{topics_file}: no topics (expected one A/B/C path per line)")
    unique = list(dict.fromkeys(prompts.truncate_topic(t) for t in topics))
    random.Random(seed).shuffle(unique)
    return unique[:num_topics]


def task_requests(
    topics: list[str], task_types: list[str], seed: int, max_chars: int
) -> list[dict[str, Any]]:
    """One brainstorm request per (topic, task type); STS has no brainstorm (it takes the topic)."""
    rows = []
    for topic in topics:
        for task_type in task_types:
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
            {
                "id": r["id"],
                "topic": r["topic"],
                "task_type": r["task_type"],
                "kind": r["kind"],
                "task": tasks[0] if tasks else None,
                "raw": r["raw"],
                "error": err,
                "generator": r["generator"],
                "prompt_id": r["id"],
                "seed": r["seed"],
                "round": "tasks",
                "num_input_tokens": r["num_input_tokens"],
                "num_output_tokens": r["num_output_tokens"],
            }
        )
    return cast_rows(out, TASKS)


def sts_tasks(rows: list[dict[str, Any]]) -> pa.Table:
    """STS rows need no model call: the task is the topic itself."""
    out = [
        {k: r[k] for k in ("id", "topic", "task_type", "kind", "task", "seed")}
        | {"prompt_id": r["id"], "round": "tasks", "num_input_tokens": 0, "num_output_tokens": 0}
        for r in rows
    ]
    return cast_rows(out, TASKS)


def example_requests(tasks: list[dict[str, Any]], seed: int, max_chars: int) -> list[dict[str, Any]]:
    """One synthesis request per valid task, with seeded placeholders."""
    rows = []
    for t in tasks:
        if t["error"] is not None or not t["task"]:
            continue
        rid = stable_id(seed, "examples", t["id"])
        rng = random.Random(stable_seed(seed, rid))
        msgs = prompts.synthesis_prompt(t["kind"], t["task"], rng)
        rows.append(
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
    return rows


def parse_generations(batch: pa.Table) -> pa.Table:
    """Generated examples -> GENERATIONS rows with (instruction, query, positive, negative) or an error."""
    out = []
    for r in batch.to_pylist():
        fields, err = to_triplet(r["kind"], r["task"], r["raw"])
        out.append(
            {
                k: r[k]
                for k in (
                    "id",
                    "sample",
                    "topic",
                    "task_type",
                    "kind",
                    "task",
                    "messages",
                    "raw",
                    "generator",
                )
            }
            | {"instruction": None, "query": None, "positive": None, "negative": None}
            | fields
            | {
                "error": err,
                "prompt_id": r["id"],
                "seed": r["seed"],
                "round": "examples",
                "num_input_tokens": r["num_input_tokens"],
                "num_output_tokens": r["num_output_tokens"],
            }
        )
    return cast_rows(out, GENERATIONS)


def pick_examples(generations: pa.Table) -> pa.Table:
    """The training rows: per prompt, the valid sample with the lowest sample index."""
    best: dict[str, dict[str, Any]] = {}
    for r in sorted(generations.to_pylist(), key=lambda r: (r["id"], r["sample"])):
        if r["error"] is None and r["id"] not in best:
            best[r["id"]] = r
    keep = set(EXAMPLES.names)
    return cast_rows([{k: v for k, v in r.items() if k in keep} for r in best.values()], EXAMPLES)


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


def preference_pairs(generations: pa.Table) -> pa.Table:
    """(prompt, chosen=best, rejected=worst) per prompt; prompts whose samples tie give no pair."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in generations.to_pylist():
        groups[r["id"]].append(r)
    out = []
    for rid, rows in sorted(groups.items()):
        rows.sort(key=lambda r: (-quality_score(r), r["sample"]))
        best, worst = rows[0], rows[-1]
        if quality_score(best) == quality_score(worst):
            continue
        out.append(
            {
                "id": rid,
                "messages": best["messages"],
                "chosen": best["raw"],
                "rejected": worst["raw"],
                "reason": f"rule score {quality_score(best):.3f} > {quality_score(worst):.3f}"
                + (f" ({worst['error']})" if worst["error"] else ""),
            }
        )
    return cast_rows(out, PREFERENCE_PAIRS)
