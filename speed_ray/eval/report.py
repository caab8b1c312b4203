"""report: ``<run>/report.md``, the same as a page (``report.html``) and the plots, from the
manifests the other stages wrote.

Reads only the run directory, so ``speed-ray report CONFIG`` (or ``speed-ray report RUN_DIR``, which
reads the run's saved config) can re-render a finished run.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.eval.html import write_report
from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    JUDGMENTS,
    TASKS,
    error_kind,
    read_manifest,
    read_stage,
)

logger = logging.getLogger(__name__)


def run(cfg: SpeedRayConfig) -> dict:
    run_dir = cfg.run_dir
    m = collect(run_dir)
    plot = plot_training(m, run_dir / "training.png")
    synth_plot = plot_synth(m, run_dir / "synth.png")
    embed_plot = plot_embed(m, run_dir / "embed.png")
    text = render(cfg, m, plot)
    if embed_plot:
        text = text.replace(
            "\n## Embedding model\n", f"\n## Embedding model\n\n![embedding training]({embed_plot})\n", 1
        )
    if synth_plot:
        text = text.replace("\n## Synthesis\n", f"\n## Synthesis\n\n![synthesis steps]({synth_plot})\n", 1)
    if m["eval"] is not None and m["eval"].get("tasks"):
        from speed_ray.eval.experiments import plot_scores

        plot_scores(m["eval"], f"{cfg.run.name}: scores against the baselines", run_dir / "eval.png")
        text = text.replace("\n## Evaluation: ", "\n![scores](eval.png)\n\n## Evaluation: ", 1)
    path = run_dir / "report.md"
    write_report(path, text)
    logger.info(f"report: {path} (and report.html)")
    return {"report": str(path)}


def collect(run_dir: Path) -> dict[str, Any]:
    """Every stage's manifest (None where the stage has not run), plus synth counts."""
    names = {
        **{k: f"synth/{k}" for k in SYNTH_STEPS},
        **{f"align/{k}": f"align/{k}" for k in ALIGN_STEPS},
        "embed": "embed/model",
        "eval": "eval",
    }
    m: dict[str, Any] = {k: read_manifest(run_dir / v) for k, v in names.items()}
    m["align_drops"] = {
        k: error_kinds(read_stage(run_dir / "align" / k, schema))
        for k, schema in ALIGN_CALL_STEPS.items()
        if m[f"align/{k}"] is not None and "accounting" in m[f"align/{k}"]
    }
    if m["examples"] is not None:
        examples = read_stage(run_dir / "synth/examples", EXAMPLES)
        m["examples_by_type"] = dict(Counter(examples["task_type"].to_pylist()))
        m["degenerate"] = degenerate_rows(examples.to_pylist())
        m["error_kinds"] = {
            k: error_kinds(read_stage(run_dir / f"synth/{k}", schema))
            for k, schema in (("tasks", TASKS), ("generations", GENERATIONS))
        }
    return m


# Model-calling steps, in order, and the paper's teacher budget (SPEED §4.5, Table 5).
SYNTH_STEPS = ("tasks", "generations", "judgments", "pairs", "drafts", "revisions", "examples", "train")
CALL_STEPS = ("tasks", "generations", "judgments", "revisions")
PAPER_TEACHER = {"calls": 45_000, "tokens": 32_000_000}
ALIGN_STEPS = ("tasks", "seed", "junior", "root", "judgments", "pairs", "senior", "revisions", "revisor")
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


def error_kinds(table) -> dict[str, int]:
    """Error rows by the error's first words (``invalid JSON``, ``missing or empty field``...)."""
    return dict(Counter(error_kind(e) for e in table["error"].to_pylist() if e))


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


def synth_lines(cfg: SpeedRayConfig, m: dict[str, Any]) -> list[str]:
    """The synthesis section: per-step accounting, parse failures, dedup and the teacher budget."""
    lines = [
        "",
        "## Synthesis",
        "",
        "| step | engine | calls | rows | errors | error rate | tokens in | tokens out | rows/s | cost USD |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    teacher = {"calls": 0, "tokens": 0}
    for key in CALL_STEPS:
        man = m.get(key)
        if man is None or "accounting" not in man:
            continue
        a = man["accounting"]
        rate = a["errors"] / max(man["num_rows"], 1)
        lines.append(
            f"| {key} | {man['engine']}:`{man['model']}` | {a['calls']} | {man['num_rows']} | {a['errors']} "
            f"| {rate:.1%} | {a['input_tokens']} | {a['output_tokens']} | {a['rows_per_s']} | {a['cost_usd']} |"
        )
        if man["engine"] == "openai":
            teacher["calls"] += a["calls"]
            teacher["tokens"] += a["input_tokens"] + a["output_tokens"]
    ex = m["examples"]
    lines.append("")
    if ex is not None:
        lines.append(f"- training rows: {ex['num_rows']} from {ex.get('drafts', ex['num_rows'])} drafts")
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
    if m["pairs"] is not None:
        p = m["pairs"]
        lines.append(
            f"- preference pairs: {p['num_rows']} ({p['judged']} from the judge, "
            f"{p['rule_scored']} rule-scored where no usable verdict)"
        )
    lines.append(
        f"- teacher (HTTP) use: {teacher['calls']} calls, {teacher['tokens']} tokens; the paper's "
        f"budget is {PAPER_TEACHER['calls']} calls / {PAPER_TEACHER['tokens']} tokens "
        f"({teacher['calls'] / PAPER_TEACHER['calls']:.2%} / {teacher['tokens'] / PAPER_TEACHER['tokens']:.2%})"
    )
    return lines


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
    teacher = cfg.align.teacher
    for key in ALIGN_STEPS:
        man = m.get(f"align/{key}")
        if man is None:
            continue
        by: str = ""
        tok_in: Any = ""
        tok_out: Any = ""
        calls: Any = ""
        rows_in: Any
        rows_out: Any
        drops: dict[str, int] = {}
        if "accounting" in man:  # a model-calling step
            a = man["accounting"]
            by = f"{man['engine']}:`{man['model']}`"
            rows_in, rows_out = man.get("rows_in", a["calls"]), man["num_rows"] - a["errors"]
            tok_in, tok_out = a["input_tokens"], a["output_tokens"]
            calls = a["calls"] if key != "root" else 0
            drops = m["align_drops"].get(key, {})
        elif "source" in man:  # the user's own data
            by, rows_in, rows_out = (
                f"your file `{Path(man['source']).name}`",
                man["num_rows"],
                man["num_rows"],
            )
        elif key == "pairs":
            by = f"judge: {man['judged']}, rule score: {man['rule_scored']}"
            rows_in, rows_out, drops = man["rows_in"], man["num_rows"], man["dropped"]
        else:  # a trained model
            by = f"TRL {man['kind'].upper()} from `{Path(man['base_model']).name}`"
            rows_in, rows_out = man["rows_in"], f"model ({man['steps']} steps on {man['rows_used']} rows)"
            drops = man["dropped"]
        why = ", ".join(f"{n} {k}" for k, n in sorted(drops.items(), key=lambda kv: -kv[1])) if drops else ""
        lines.append(
            f"| {key} | {by} | {rows_in} | {rows_out} | {why} | {tok_in} | {tok_out} | {calls} "
            f"| {man.get('duration_s', '')} |"
        )
    lines += ["", f"Teacher: {teacher.kind} `{teacher.model}`. Against SPEED's budget (§4.5):", ""]
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


def render(cfg: SpeedRayConfig, m: dict[str, Any], plot: str | None) -> str:
    lines = [f"# speed-ray run `{cfg.run.name}`", ""]
    lines += ["| stage | step | rows | seconds |", "|---|---|---:|---:|"]
    for stage, key in [
        *[("align", f"align/{k}") for k in ALIGN_STEPS],
        *[("synth", k) for k in SYNTH_STEPS],
        ("embed", "embed"),
        ("eval", "eval"),
    ]:
        man = m[key]
        name = key.removeprefix("align/")
        if man is None:
            lines.append(f"| {stage} | {name} | not run | |")
        else:
            rows = man.get("num_rows", man.get("rows_in", man.get("train_rows", "")))
            lines.append(f"| {stage} | {name} | {rows} | {man.get('duration_s', '')} |")
    if any(m[f"align/{k}"] is not None for k in ALIGN_STEPS):
        lines += align_lines(cfg, m)
    if m["generations"] is not None:
        lines += synth_lines(cfg, m)
    for key, title in [
        ("align/junior", "Junior generator (SFT)"),
        ("align/senior", "Senior generator (DPO)"),
        ("align/revisor", "Revisor (SFT)"),
        ("embed", "Embedding model"),
    ]:
        man = m[key]
        if man is None:
            continue
        hist = man["history"] if len(man["history"]) <= 12 else man["history"][:3] + man["history"][-3:]
        losses = ", ".join(f"{h.get('step', i + 1)}: {h['loss']:.4f}" for i, h in enumerate(hist))
        lines += [
            "",
            f"## {title}",
            "",
            f"- base: `{man['base_model']}`, {man['steps']} steps, loss per step: {losses}",
        ]
        if key == "embed":
            lines += embed_lines(man)
    if m["eval"] is not None:
        lines += eval_lines(m["eval"])
    if plot:
        lines += ["", f"![training losses]({plot})"]
    lines += [
        "",
        "Resolved config: `config.yaml`. Stage outputs and `_manifest.json` files sit beside this report.",
        "",
    ]
    return "\n".join(lines)


def eval_lines(ev: dict[str, Any]) -> list[str]:
    """One table per task (models as rows, the task's scores as columns), then the layer analysis."""
    from speed_ray.eval.experiments import SCORE_COLUMNS

    lines: list[str] = []
    for task, kind in ev["tasks"].items():
        cols = SCORE_COLUMNS[kind]
        rows = [(label, s[task]) for label, s in ev["scores"].items() if task in s]
        lines += [
            "",
            f"## Evaluation: {task} ({kind}, mteb)",
            "",
            "| model | " + " | ".join(name for _, name in cols) + " | seconds |",
            "|---|" + "---:|" * (len(cols) + 1),
        ]
        for label, s in rows:
            lines.append(
                f"| {label} | " + " | ".join(f"{s[key]:.4f}" for key, _ in cols) + f" | {s['seconds']} |"
            )
    if ev.get("layers"):
        labels = list(ev["layers"])
        depth = max(len(v) for v in ev["layers"].values())
        lines += [
            "",
            "## Layer analysis: kNN accuracy of each layer's pooled hidden states",
            "",
            "| layer | " + " | ".join(labels) + " |",
            "|---:|" + "---:|" * len(labels),
        ]
        for layer in range(depth):
            cells = [ev["layers"][lb].get(str(layer)) for lb in labels]
            lines.append(f"| {layer} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |")
        lines += ["", "![layer analysis](eval/layers.png)"]
    return lines


def embed_lines(man: dict[str, Any]) -> list[str]:
    """The embedding trainer's set-up and throughput, and what the data builder skipped."""
    hist = man["history"]
    rate = sorted(h["examples_per_s"] for h in hist)[len(hist) // 2]
    lines = [
        f"- {man['finetune']} fine-tuning, {man['trainable_params']:,} trainable parameters, {man['workers']} "
        f"worker(s), global batch {man['global_batch']} ({man['hard_negatives']} hard negative(s) per query), "
        f"{man['epochs']} epochs of {man['train_rows']} rows",
        f"- in-batch accuracy {hist[0]['accuracy']:.3f} -> {hist[-1]['accuracy']:.3f}, grad norm "
        f"{hist[0]['grad_norm']:.3g} -> {hist[-1]['grad_norm']:.3g}, median {rate:.1f} examples/s",
    ]
    data = man["data"]
    if data["source"] == "corpus":
        lines.append(
            f"- {data['documents']} documents -> {data['pairs']} {data['pair_mode']} pairs per epoch; "
            f"{sum(data['skipped'].values())} documents too short for a pair: {data['skipped']}"
        )
    elif data.get("rows_available", man["train_rows"]) > man["train_rows"]:
        lines.append(f"- a seeded sample of {man['train_rows']} of the {data['rows_available']} rows")
    if man.get("resumed_from_step"):
        lines.append(f"- resumed from the checkpoint of step {man['resumed_from_step']}")
    return lines


def plot_embed(m: dict[str, Any], path: Path) -> str | None:
    """The embedding trainer per step: loss, in-batch accuracy and examples per second."""
    man = m["embed"]
    if man is None or not man["history"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hist = man["history"]
    steps = [h["step"] for h in hist]
    panels = [
        ("loss", "InfoNCE loss", "loss"),
        ("accuracy", "in-batch accuracy", "share of queries"),
        ("examples_per_s", f"throughput ({man['workers']} worker(s))", "examples / s"),
    ]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.2))
    for ax, (key, title, unit) in zip(axes, panels, strict=True):
        ax.plot(steps, [h[key] for h in hist], marker="o" if len(hist) <= 40 else None)
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(unit)
    fig.suptitle(f"embedding model: {man['base_model']}, global batch {man['global_batch']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def plot_training(m: dict[str, Any], path: Path) -> str | None:
    """Loss against step for every trained model; returns the file name, or None if nothing trained."""
    keys = ("align/junior", "align/senior", "align/revisor", "embed")
    curves = {k.removeprefix("align/"): m[k]["history"] for k in keys if m[k] is not None and m[k]["history"]}
    if not curves:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (name, hist) in zip(axes[0], curves.items(), strict=True):
        ax.plot([h.get("step", i + 1) for i, h in enumerate(hist)], [h["loss"] for h in hist], marker="o")
        ax.set_title(f"{name} training loss")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.ticklabel_format(axis="y", useOffset=False)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path.name


def plot_synth(m: dict[str, Any], path: Path) -> str | None:
    """Per model-calling step: rows kept and error rows (left), tokens in and out (right)."""
    steps = [k for k in CALL_STEPS if m.get(k) is not None and "accounting" in m[k]]
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
