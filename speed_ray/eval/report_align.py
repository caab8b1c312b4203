"""The run report's alignment section (SPEED §3.2): per step who made its rows, rows in and out, rows
dropped and why, tokens, teacher calls and time; then the teacher's use against SPEED's budget."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.io.schemas import GENERATIONS, JUDGMENTS, TASKS

ALIGN_STEPS = ("tasks", "seed", "junior", "root", "judgments", "pairs", "senior", "revisions", "revisor")
# The model-calling steps and the schema of their rows (the report counts their error rows by kind).
ALIGN_CALL_STEPS = {
    "tasks": TASKS,
    "seed": GENERATIONS,
    "root": GENERATIONS,
    "judgments": JUDGMENTS,
    "revisions": GENERATIONS,
}
# SPEED §4.5: the teacher calls and tokens behind each trained model.
PAPER_ALIGN = {
    "seed": (25_000, 10_000_000),
    "judgments": (10_000, 12_000_000),
    "revisions": (10_000, 10_000_000),
}


def align_lines(cfg: SpeedRayConfig, m: dict[str, Any]) -> list[str]:
    """The alignment section: per step rows in and out, rows dropped and why, tokens, teacher calls
    and time; then the teacher's use against SPEED's budget."""
    lines = [
        "",
        "## Alignment (SPEED §3.2)",
        "",
        "| step | by | rows in | rows out | dropped (why) | tokens in | tokens out | teacher calls | seconds |",
        "|---|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    for key in ALIGN_STEPS:
        man = m.get(f"align/{key}")
        if man is not None:
            lines.append(_step_row(key, man, m))
    return lines + _budget_lines(cfg, m)


def _step_row(key: str, man: dict[str, Any], m: dict[str, Any]) -> str:
    """One step's row of the table."""
    by, rows_in, rows_out, drops = _step_rows(key, man, m)
    tok_in, tok_out, calls = _step_use(key, man)
    why = ", ".join(f"{n} {k}" for k, n in sorted(drops.items(), key=lambda kv: -kv[1])) if drops else ""
    return (
        f"| {key} | {by} | {rows_in} | {rows_out} | {why} | {tok_in} | {tok_out} | {calls} "
        f"| {man.get('duration_s', '')} |"
    )


def _step_rows(key: str, man: dict[str, Any], m: dict[str, Any]) -> tuple[str, Any, Any, dict[str, int]]:
    """(who made the step's rows, rows in, rows out, rows dropped by why)."""
    if "accounting" in man:  # a model-calling step
        a = man["accounting"]
        by = f"{man['engine']}:`{man['model']}`"
        return (
            by,
            man.get("rows_in", a["calls"]),
            man["num_rows"] - a["errors"],
            m["align_drops"].get(key, {}),
        )
    if "source" in man:  # the user's own data
        return f"your file `{Path(man['source']).name}`", man["num_rows"], man["num_rows"], {}
    if key == "pairs":
        by = f"judge: {man['judged']}, rule score: {man['rule_scored']}"
        return by, man["rows_in"], man["num_rows"], man["dropped"]
    # a trained model
    by = f"TRL {man['kind'].upper()} from `{Path(man['base_model']).name}`"
    return by, man["rows_in"], f"model ({man['steps']} steps on {man['rows_used']} rows)", man["dropped"]


def _step_use(key: str, man: dict[str, Any]) -> tuple[Any, Any, Any]:
    """(tokens in, tokens out, teacher calls) of a model-calling step (no teacher calls for root);
    blanks for the others."""
    if "accounting" not in man:
        return "", "", ""
    a = man["accounting"]
    return a["input_tokens"], a["output_tokens"], a["calls"] if key != "root" else 0


def _budget_lines(cfg: SpeedRayConfig, m: dict[str, Any]) -> list[str]:
    """The teacher, and its calls and tokens per step against SPEED's budget."""
    teacher = cfg.align.teacher
    lines = ["", f"Teacher: {teacher.kind} `{teacher.model}`. Against SPEED's budget (§4.5):", ""]
    for key, (calls, tokens) in PAPER_ALIGN.items():
        man = m.get(f"align/{key}")
        if man is None or "accounting" not in man:
            continue
        a = man["accounting"]
        used = a["input_tokens"] + a["output_tokens"]
        lines.append(
            f"- {key}: {a['calls']} calls of the paper's {calls:,} ({a['calls'] / calls:.2%}), "
            f"{used:,} tokens of {tokens:,} ({used / tokens:.2%})"
        )
    return lines
