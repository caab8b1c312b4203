"""The run report's evaluation sections: a table per task (models as rows, the task's scores ± their
standard errors as columns, and the main score's paired difference from the base model) and the
layer analysis (kNN accuracy per layer and model)."""

from __future__ import annotations

from typing import Any

from speed_ray.eval.experiments import (
    SCORE_COLUMNS,
    SCORE_NAMES,
    SE_NOTE,
    difference,
    difference_cell,
    score_cell,
)

BASE = "base"  # the untouched encoder, which every other model is compared with


def eval_lines(ev: dict[str, Any]) -> list[str]:
    """One table per task (models as rows, the task's scores as columns), then the layer analysis."""
    lines: list[str] = []
    for task, kind in ev["tasks"].items():
        lines += _task_table(ev, task, kind)
    if ev.get("layers"):
        lines += layer_lines(ev["layers"])
    return lines


def _task_table(ev: dict[str, Any], task: str, kind: str) -> list[str]:
    """The scores of every model that scored ``task``, each ± its standard error where it has one,
    and the paired difference of the main score from the base model's when the base scored it."""
    cols = SCORE_COLUMNS[kind]
    rows = [(label, s[task]) for label, s in ev["scores"].items() if task in s]
    vs_base = task in ev["scores"].get(BASE, {})
    head = [name for _, name in cols] + ([f"{SCORE_NAMES[cols[0][0]]} vs {BASE}"] if vs_base else [])
    lines = [
        "",
        f"## Evaluation: {task} ({kind}, mteb)",
        "",
        "| model | " + " | ".join(head) + " | seconds |",
        "|---|" + "---:|" * (len(head) + 1),
    ]
    for label, s in rows:
        cells = [score_cell(s, key) for key, _ in cols]
        if vs_base:
            cells.append(difference_cell(difference(ev, label, task, BASE)) if label != BASE else "")
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {s['seconds']} |")
    return lines + ["", SE_NOTE]


def layer_lines(layers: dict[str, dict[str, float]]) -> list[str]:
    """The layer analysis: ``layers`` is {model: {layer: kNN accuracy}}; the plot is ``eval/layers.png``."""
    labels = list(layers)
    depth = max(len(v) for v in layers.values())
    lines = [
        "",
        "## Layer analysis: kNN accuracy of each layer's pooled hidden states",
        "",
        "| layer | " + " | ".join(labels) + " |",
        "|---:|" + "---:|" * len(labels),
    ]
    for layer in range(depth):
        cells = [layers[lb].get(str(layer)) for lb in labels]
        lines.append(f"| {layer} | " + " | ".join("" if c is None else f"{c:.4f}" for c in cells) + " |")
    return lines + ["", "![layer analysis](eval/layers.png)"]
