"""Experiments: several training runs of one config (variants), scored side by side by the eval stage,
written up as a markdown section with plots. Pure functions; ``eval/experiment.py`` drives them.

An experiment config is a run config plus an ``experiment`` section:

    experiment:
      title: "A. Crops vs dropout"
      variants:                       # one embed run each: overrides of this config
        crops: {embed.data.pair_mode: crops}
        dropout: {embed.data.pair_mode: dropout}
      evals:                          # one eval run each: overrides; a model named like a variant
        main: {eval.models: [base, crops, dropout, tfidf]}    # is that variant's trained model
      reference: crops                # share of gain = (variant - base) / (reference - base)
      curves: [crops, dropout]        # score the snapshots (embed.snapshot_steps) against steps
      paper: "..."                    # the papers' figures, shown beside ours
"""

from __future__ import annotations

import json
import statistics
import textwrap
from pathlib import Path
from typing import Any

from speed_ray.eval.stats import paired_difference, signed_with_se, with_se

SCORE_COLUMNS = {
    "retrieval": [("ndcg_at_10", "nDCG@10"), ("recall_at_10", "recall@10")],
    "knn": [("accuracy", "kNN accuracy"), ("f1", "macro-F1")],
    "clustering": [("v_measure", "V-measure")],
    "mteb": [("main_score", "main score")],
}
"""The scores the reports show per task kind (mteb's keys, then the name shown); the first is the main one."""
MAIN_SCORES = {kind: columns[0][0] for kind, columns in SCORE_COLUMNS.items()}
SCORE_NAMES = dict(column for columns in SCORE_COLUMNS.values() for column in columns)
SE_NOTE = (
    "± one standard error: over queries for retrieval (stdev / sqrt(n)), sqrt(p(1-p)/n) over the rows "
    "scored for kNN accuracy; macro-F1, V-measure and mteb's own tasks have none. vs base: the mean "
    "difference from base on the same queries (rows) ± its paired standard error (stdev of the "
    "differences / sqrt(n)); a gain under twice it may be the queries' luck."
)


def override_args(overrides: dict[str, Any]) -> list[str]:
    """``{"embed.steps": 30}`` -> ``["embed.steps=30"]`` (values as JSON, which the YAML reader reads)."""
    return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]


def variant_models(models: list[str], variant_dirs: dict[str, Path]) -> list[str]:
    """Eval model entries with each variant name replaced by ``name=<its run>/embed/model``."""
    return [f"{m}={variant_dirs[m] / 'embed' / 'model'}" if m in variant_dirs else m for m in models]


def snapshot_models(name: str, run_dir: Path, final_step: int) -> list[tuple[int, str]]:
    """[(step, eval model entry)] for a variant's snapshots and its final model, by step."""
    out = []
    for folder in sorted((run_dir / "embed" / "snapshots").glob("step_*")):
        if not folder.name.removeprefix("step_").isdigit():  # step_N.tmp: an export cut short
            continue
        step = int(folder.name.removeprefix("step_"))
        out.append((step, f"{name}@{step}={folder}"))
    out.append((final_step, f"{name}@{final_step}={run_dir / 'embed' / 'model'}"))
    return out


def gain_share(base: float, score: float, reference: float) -> float | None:
    """The part of the reference's gain over the base that ``score`` keeps; None when the reference
    does not gain (every main score is higher-is-better, and a share of a loss means nothing)."""
    gain = reference - base
    return None if gain < 1e-12 else (score - base) / gain


def main_score(scores: dict[str, Any], kind: str) -> float:
    return float(scores[MAIN_SCORES[kind]])


def score_cell(scores: dict[str, Any], key: str, scale: float = 1.0, digits: int = 4) -> str:
    """A score with its standard error when it has one: ``0.6543 ± 0.0123``."""
    return with_se(scores[key], scores.get(f"{key}_se"), scale, digits)


def difference(ev: dict[str, Any], label: str, task: str, base: str = "base") -> dict[str, Any] | None:
    """``{"difference", "se", "n"}`` of ``label``'s main score on ``task`` less ``base``'s: the mean
    paired difference over the queries (rows) both scored, with its standard error, when both kept
    per-item scores; else the difference of the scores alone (se and n None). None when either did
    not score the task."""
    scores = ev["scores"]
    if task not in scores.get(base, {}) or task not in scores[label]:
        return None
    key = MAIN_SCORES[ev["tasks"][task]]
    mine, theirs = scores[label][task], scores[base][task]
    if key in mine.get("per_item", {}) and key in theirs.get("per_item", {}):
        return paired_difference(mine["per_item"][key], theirs["per_item"][key])
    return {"difference": float(mine[key]) - float(theirs[key]), "se": None, "n": None}


def differences(ev: dict[str, Any], base: str = "base") -> dict[str, dict[str, dict[str, Any]]]:
    """{model: {task: ``difference``}} of every other model from ``base`` (empty without it)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for label in ev["scores"]:
        per_task = {t: difference(ev, label, t, base) for t in ev["tasks"]} if label != base else {}
        if found := {t: d for t, d in per_task.items() if d is not None}:
            out[label] = found
    return out


def difference_cell(d: dict[str, Any] | None, scale: float = 1.0, digits: int = 4) -> str:
    """``+0.0310 ± 0.0080``; empty for no difference."""
    if d is None or d["difference"] is None:
        return ""
    return signed_with_se(d["difference"], d["se"], scale, digits)


def score_table(ev: dict[str, Any], base: str = "base", reference: str | None = None) -> list[str]:
    """Markdown: one row per model, one column per task's main score ± its standard error (x100),
    one per task with the paired difference from ``base`` when it was scored, and with a reference
    model the share of its gain over ``base`` each other model reaches on each task."""
    tasks = list(ev["tasks"].items())
    vs_base = base in ev["scores"]
    share = reference is not None and reference in ev["scores"] and vs_base
    head = [f"{t} {SCORE_NAMES[MAIN_SCORES[k]]}" for t, k in tasks]
    if vs_base:
        head += [f"{t}: vs {base}" for t, _ in tasks]
    if share:
        head += [f"{t}: share of {reference}'s gain" for t, _ in tasks]
    lines = ["| model | " + " | ".join(head) + " |", "|---|" + "---:|" * len(head)]
    for label, per_task in ev["scores"].items():
        cells = [score_cell(per_task[t], MAIN_SCORES[k], 100, 1) if t in per_task else "" for t, k in tasks]
        if vs_base:
            cells += [
                difference_cell(difference(ev, label, t, base), 100, 1) if label != base else ""
                for t, _ in tasks
            ]
        if share:
            for t, k in tasks:
                g = None
                if t in per_task and label not in (base, reference):
                    g = gain_share(
                        main_score(ev["scores"][base][t], k),
                        main_score(per_task[t], k),
                        main_score(ev["scores"][reference][t], k),
                    )
                cells.append("" if g is None else f"{100 * g:.0f}%")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def training_table(runs: dict[str, dict[str, Any]]) -> list[str]:
    """Markdown: what each variant trained and how long it took (from its embed manifest)."""
    lines = [
        "| variant | trained | trainable params | steps x batch | first -> last loss | train seconds | median s/step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in runs.items():
        steps = m["history"]
        per_step = statistics.median(h["seconds"] for h in steps)  # robust to a busy machine
        what = m["data"].get("pair_mode", m["data"]["source"])
        if "rows_available" in m["data"]:
            rows = m["data"].get("rows", m["train_rows"])  # train_rows counts crop pairs too
            what += f", {rows} of {m['data']['rows_available']} rows"
        if "crops" in m["data"]:
            what += f" + {m['data']['crops']['pairs']} crop pairs ({m['data'].get('crops_order', 'mixed')})"
        if m.get("train_last_blocks"):
            what += f", last {m['train_last_blocks']} blocks"
        if m["data"].get("held_out"):
            what += f", {m['data']['held_out']} documents held out"
        lines.append(
            f"| {name} | {what} | {m['trainable_params']:,} | {m['steps']} x {m['global_batch']} | "
            f"{steps[0]['loss']:.3f} -> {steps[-1]['loss']:.3f} | {m['duration_s']:.0f} | {per_step:.1f} |"
        )
    return lines


def plot_scores(ev: dict[str, Any], title: str, path: Path) -> None:
    """One bar chart per task: each model's main score, with one standard error as its error bar."""
    plt = _pyplot()
    tasks = list(ev["tasks"].items())
    fig, axes = plt.subplots(1, len(tasks), figsize=(5 * len(tasks), 4), squeeze=False)
    for ax, (task, kind) in zip(axes[0], tasks, strict=True):
        labels = [lb for lb, s in ev["scores"].items() if task in s]
        values = [100 * main_score(ev["scores"][lb][task], kind) for lb in labels]
        ses = [ev["scores"][lb][task].get(f"{MAIN_SCORES[kind]}_se") for lb in labels]
        yerr = [100 * se if se is not None else 0.0 for se in ses]  # one standard error
        bars = ax.bar(range(len(labels)), values, color="tab:blue", yerr=yerr, capsize=3)
        ax.bar_label(bars, fmt="%.1f", fontsize=8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_ylabel(f"{SCORE_NAMES[MAIN_SCORES[kind]]} (%)")
        ax.set_title(task)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(textwrap.fill(title, int(9 * fig.get_figwidth())))  # about 9 characters an inch
    fig.tight_layout()
    _save(fig, path)


def series_points(
    series: dict[str, list[str]], ev: dict[str, Any], rows: dict[str, int], base: str = "base"
) -> dict[str, dict[str, list[tuple[int, float]]]]:
    """Score against training rows: series name -> task -> [(rows, main score)], one point per variant
    of the series (``rows``: variant -> its training rows), starting from the untrained ``base`` at 0
    rows when it was scored; for ``plot_curves``."""
    out: dict[str, dict[str, list[tuple[int, float]]]] = {}
    for name, variants in series.items():
        out[name] = {}
        for task, kind in ev["tasks"].items():
            points = [(rows[v], main_score(ev["scores"][v][task], kind)) for v in variants]
            if task in ev["scores"].get(base, {}):
                points.append((0, main_score(ev["scores"][base][task], kind)))
            out[name][task] = sorted(points)
    return out


def plot_curves(
    curves: dict[str, dict[str, list[tuple[int, float]]]],
    kinds: dict[str, str],
    title: str,
    path: Path,
    xlabel: str = "training step (batches)",
) -> None:
    """Score against training step (or ``xlabel``), one panel per task (``kinds``: task -> kind), one
    line per variant."""
    plt = _pyplot()
    tasks = sorted({t for per_task in curves.values() for t in per_task})
    fig, axes = plt.subplots(1, len(tasks), figsize=(5.5 * len(tasks), 4), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        for name, per_task in curves.items():
            points = sorted(per_task.get(task, []))
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=name)
        ax.set_title(task)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(f"{SCORE_NAMES[MAIN_SCORES[kinds[task]]]} (%)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(textwrap.fill(title, int(9 * fig.get_figwidth())))  # about 9 characters an inch
    fig.tight_layout()
    _save(fig, path)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig: Any, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    _pyplot().close(fig)
