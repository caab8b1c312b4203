"""The run report's evaluation sections: a table per task (models as rows, the task's scores as
columns) and the layer analysis (kNN accuracy per layer and model)."""

from __future__ import annotations

from typing import Any

from speed_ray.eval.experiments import SCORE_COLUMNS


def eval_lines(ev: dict[str, Any]) -> list[str]:
    """One table per task (models as rows, the task's scores as columns), then the layer analysis."""
    lines: list[str] = []
    for task, kind in ev["tasks"].items():
        lines += _task_table(ev, task, kind)
    if ev.get("layers"):
        lines += layer_lines(ev["layers"])
    return lines


def _task_table(ev: dict[str, Any], task: str, kind: str) -> list[str]:
    """The scores of every model that scored ``task``."""
    cols = SCORE_COLUMNS[kind]
    rows = [(label, s[task]) for label, s in ev["scores"].items() if task in s]
    lines = [
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
    return lines


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
