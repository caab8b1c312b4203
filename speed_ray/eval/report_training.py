"""The run report's sections on the trained models (the junior, senior and revisor generators and the
embedding model): base model and loss per step, the embedding trainer's set-up and throughput, and
their plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The trained models, by their manifest's key, and their section titles.
TRAINED = {
    "align/junior": "Junior generator (SFT)",
    "align/senior": "Senior generator (DPO)",
    "align/revisor": "Revisor (SFT)",
    "embed": "Embedding model",
}


def training_lines(m: dict[str, Any]) -> list[str]:
    """A section per trained model: its base, steps and loss per step; the embedding model's also
    has ``embed_lines``."""
    lines: list[str] = []
    for key, title in TRAINED.items():
        man = m[key]
        if man is None:
            continue
        lines += [
            "",
            f"## {title}",
            "",
            f"- base: `{man['base_model']}`, {man['steps']} steps, loss per step: {_losses(man['history'])}",
        ]
        if key == "embed":
            lines += embed_lines(man)
    return lines


def _losses(hist: list[dict[str, Any]]) -> str:
    """``step: loss`` of every step, or of the first and last three past 12 steps."""
    shown = hist if len(hist) <= 12 else hist[:3] + hist[-3:]
    return ", ".join(f"{h.get('step', i + 1)}: {h['loss']:.4f}" for i, h in enumerate(shown))


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
    corpus = data if data["source"] == "corpus" else data.get("crops")
    if corpus:
        lines.append(
            f"- {corpus['documents']} documents -> {corpus['pairs']} {corpus['pair_mode']} pairs per epoch; "
            f"{sum(corpus['skipped'].values())} documents too short for a pair: {corpus['skipped']}"
            + (f"; {corpus['excluded']} excluded ({corpus['exclude']})" if corpus.get("exclude") else "")
        )
    rows = data.get("rows", man["train_rows"])
    if data.get("crops"):
        order = "in the same shuffled batches" if data["crops_order"] == "mixed" else "first each epoch"
        lines.append(f"- {rows} rows from {data['source']}, the crop pairs {order}")
    if data["source"] != "corpus" and data.get("rows_available", rows) > rows:
        lines.append(f"- a seeded sample of {rows} of the {data['rows_available']} rows")
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
    curves = {
        k.removeprefix("align/"): m[k]["history"] for k in TRAINED if m[k] is not None and m[k]["history"]
    }
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
