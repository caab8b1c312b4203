"""The run report's synthesis section: per model-calling step its engine, calls, rows, errors, tokens
and cost; the training rows (revised, deduplicated, by task type, degenerate), the errors by kind and
the preference pairs; the teacher's use against the paper's budget; and the plot of rows and tokens
per step."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig

# The synth steps; the model-calling ones, in order; the paper's teacher budget (SPEED §4.5, Table 5).
SYNTH_STEPS = (
    *("documents", "queries"),  # grounded in a corpus
    *("tasks", "generations", "judgments", "pairs", "drafts", "revisions"),  # SPEED
    *("examples", "neighbours", "filtered", "train"),
)
CALL_STEPS = ("tasks", "generations", "queries", "judgments", "revisions")
PAPER_TEACHER = {"calls": 45_000, "tokens": 32_000_000}


def degenerate_rows(rows: list[dict[str, Any]]) -> dict[str, int]:
    """How many training rows a generator got wrong in ways that still parse: the positive repeats
    the query, the negative repeats the positive, or the query has fewer than 3 words (a placeholder
    such as "S1"). A classification positive is a label, so its length is not counted."""
    counts = {
        "positive = query": sum(r["positive"] == r["query"] for r in rows),
        "negative = positive": sum(bool(r["negative"]) and r["negative"] == r["positive"] for r in rows),
        "query under 3 words": sum(len((r["query"] or "").split()) < 3 for r in rows),
    }
    return {why: n for why, n in counts.items() if n}


def accounted_steps(m: dict[str, Any]) -> list[str]:
    """The model-calling steps that ran, with their accounting."""
    return [k for k in CALL_STEPS if m.get(k) is not None and "accounting" in m[k]]


def synth_lines(cfg: SpeedRayConfig, m: dict[str, Any]) -> list[str]:
    """The synthesis section: per-step accounting, parse failures, dedup and the teacher budget."""
    lines = [
        "",
        "## Synthesis",
        "",
        "| step | engine | calls | rows | errors | error rate | tokens in | tokens out | rows/s | cost USD |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [_call_row(key, m[key]) for key in accounted_steps(m)]
    lines.append("")
    if m["examples"] is not None:
        lines += _example_lines(m)
    if m.get("filtered") is not None:
        lines += filter_lines(m["filtered"], m.get("neighbours"))
    if m["pairs"] is not None:
        p = m["pairs"]
        lines.append(
            f"- preference pairs: {p['num_rows']} ({p['judged']} from the judge, "
            f"{p['rule_scored']} rule-scored where no usable verdict)"
        )
    lines.append(_teacher_line(m))
    return lines


def _call_row(key: str, man: dict[str, Any]) -> str:
    """A model-calling step's row of the accounting table."""
    a = man["accounting"]
    rate = a["errors"] / max(man["num_rows"], 1)
    return (
        f"| {key} | {man['engine']}:`{man['model']}` | {a['calls']} | {man['num_rows']} | {a['errors']} "
        f"| {rate:.1%} | {a['input_tokens']} | {a['output_tokens']} | {a['rows_per_s']} | {a['cost_usd']} |"
    )


def _example_lines(m: dict[str, Any]) -> list[str]:
    """The training rows: from how many drafts, revised, deduplicated, by task type, degenerate; and
    the error rows of tasks and generations by kind."""
    ex, docs = m["examples"], m.get("documents")
    if docs is not None and "queries" in ex:
        lines = [
            f"- documents: {docs['documents']} read, {docs['excluded']} excluded by id, {docs['chunks']} chunks "
            f"({docs['chunks_too_short']} too short for a query)",
            f"- training rows: {ex['num_rows']} from {ex['queries']} queries of {ex['chunks']} chunks "
            f"({ex.get('copied_example', 0)} more repeated the prompt's worked example and were dropped)",
        ]
    else:
        lines = [f"- training rows: {ex['num_rows']} from {ex.get('drafts', ex['num_rows'])} drafts"]
    if "revised" in ex:
        lines.append(f"- revised: {ex['revised']} of {ex['drafts']} (the rest kept their draft)")
    if "dedup" in ex:
        d = ex["dedup"]
        lines.append(
            f"- MinHash dedup (threshold {d['threshold']}, {d['num_perm']} permutations, "
            f"{d['shingle_size']}-word shingles): removed {d['removed']} of {d['input_rows']}"
        )
    lines.append(f"- rows by task type: {json.dumps(m.get('examples_by_type', {}))}")
    if m.get("degenerate"):
        n = ex["num_rows"]
        lines.append(
            "- degenerate rows (kept; they teach the embedder nothing or the wrong thing): "
            + ", ".join(f"{why} {k} of {n}" for why, k in m["degenerate"].items())
        )
    for key, kinds in m.get("error_kinds", {}).items():
        lines.append(f"- {key} errors by kind: {json.dumps(kinds) if kinds else 'none'}")
    return lines


def filter_lines(f: dict[str, Any], neighbours: dict[str, Any] | None) -> list[str]:
    """``synth/filtered``: rows kept, a table of what was dropped by reason (the row, or only its
    negative) with a few dropped rows each, and the negatives mined."""
    lines = ["", f"Quality filters: kept {f['num_rows']} of {f.get('rows_in', f['num_rows'])} rows.", ""]
    drops = [(why, n, "row") for why, n in f.get("dropped", {}).items()]
    drops += [(why, n, "negative") for why, n in f.get("negatives_dropped", {}).items()]
    if drops:
        lines += ["| reason | dropped | count | e.g. (query / positive / negative) |", "|---|---|---:|---|"]
        for why, n, what in sorted(drops, key=lambda d: -d[1]):
            shown = "; ".join(_shown(r) for r in f.get("samples", {}).get(why, []))
            lines.append(f"| {why} | {what} | {n} | {shown} |")
        lines.append("")
    if neighbours is not None:
        lines.append(
            f"- retriever `{neighbours['model']}` ({neighbours['pooling']} pooling) ranked "
            f"{neighbours['corpus']} corpus texts; {f.get('mined', 0)} hard negatives mined; rows by "
            f"number of negatives: {json.dumps(f.get('negatives_per_row', {}), sort_keys=True)}"
        )
    return lines


def _shown(row: dict[str, Any]) -> str:
    """A dropped row in a table cell: its texts cut short, pipes escaped."""
    texts = [(row.get(k) or "")[:40] for k in ("query", "positive", "negative")]
    return " / ".join(f"`{t}`" if t else "-" for t in texts).replace("|", "\\|")


def _teacher_line(m: dict[str, Any]) -> str:
    """The HTTP teacher's (``openai`` engine's) calls and tokens against the paper's budget."""
    calls = tokens = 0
    for key in accounted_steps(m):
        a = m[key]["accounting"]
        if m[key]["engine"] == "openai":
            calls += a["calls"]
            tokens += a["input_tokens"] + a["output_tokens"]
    return (
        f"- teacher (HTTP) use: {calls} calls, {tokens} tokens; the paper's "
        f"budget is {PAPER_TEACHER['calls']} calls / {PAPER_TEACHER['tokens']} tokens "
        f"({calls / PAPER_TEACHER['calls']:.2%} / {tokens / PAPER_TEACHER['tokens']:.2%})"
    )


def plot_synth(m: dict[str, Any], path: Path) -> str | None:
    """Per model-calling step: rows kept and error rows (left), tokens in and out (right)."""
    steps = accounted_steps(m)
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    acc = [m[k]["accounting"] for k in steps]
    errors = [a["errors"] for a in acc]
    ok = [m[k]["num_rows"] - e for k, e in zip(steps, errors, strict=True)]
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.2))
    left.bar(steps, ok, label="parsed")
    left.bar(steps, errors, bottom=ok, label="error rows")
    left.set_title("rows per step")
    left.legend()
    xs = range(len(steps))
    right.bar([x - 0.2 for x in xs], [a["input_tokens"] for a in acc], width=0.4, label="tokens in")
    right.bar([x + 0.2 for x in xs], [a["output_tokens"] for a in acc], width=0.4, label="tokens out")
    right.set_xticks(list(xs), steps)
    right.set_title("tokens per step")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name
