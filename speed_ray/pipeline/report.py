"""report: ``<run>/report.md`` (and ``training.png``) from the manifests the other stages wrote.

Reads only the run directory, so ``speed-ray report CONFIG`` can re-render a finished run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.pipeline.common import log
from speed_ray.schemas import EXAMPLES, GENERATIONS, TASKS, read_manifest, read_stage


def run(cfg: SpeedRayConfig) -> dict:
    run_dir = cfg.run_dir
    m = collect(run_dir)
    plot = plot_training(m, run_dir / "training.png")
    text = render(cfg, m, plot)
    path = run_dir / "report.md"
    path.write_text(text)
    log(f"report: {path}")
    return {"report": str(path)}


def collect(run_dir: Path) -> dict[str, Any]:
    """Every stage's manifest (None where the stage has not run), plus synth counts."""
    names = {
        "tasks": "synth/tasks",
        "generations": "synth/generations",
        "examples": "synth/examples",
        "pairs": "align/pairs",
        "junior": "align/junior",
        "senior": "align/senior",
        "embed": "embed/model",
        "eval": "eval",
    }
    m: dict[str, Any] = {k: read_manifest(run_dir / v) for k, v in names.items()}
    if m["generations"] is not None:
        m["synth_stats"] = synth_stats(
            read_stage(run_dir / "synth/tasks", TASKS),
            read_stage(run_dir / "synth/generations", GENERATIONS),
            read_stage(run_dir / "synth/examples", EXAMPLES),
        )
    return m


def synth_stats(tasks, gens, examples) -> dict[str, Any]:
    def total(t, col: str) -> int:
        return sum(v or 0 for v in t[col].to_pylist())

    by_type: dict[str, int] = {}
    for v in examples["task_type"].to_pylist():
        by_type[v] = by_type.get(v, 0) + 1
    return {
        "task_rows": tasks.num_rows,
        "task_errors": tasks.num_rows - tasks["error"].null_count,
        "generation_rows": gens.num_rows,
        "generation_errors": gens.num_rows - gens["error"].null_count,
        "tokens_in": total(tasks, "num_input_tokens") + total(gens, "num_input_tokens"),
        "tokens_out": total(tasks, "num_output_tokens") + total(gens, "num_output_tokens"),
        "examples_by_type": by_type,
        "errors": sorted({e.split(":")[0] for e in gens["error"].to_pylist() if e}),
    }


def render(cfg: SpeedRayConfig, m: dict[str, Any], plot: str | None) -> str:
    lines = [f"# speed-ray run `{cfg.run.name}`", ""]
    lines += ["| stage | step | rows | seconds |", "|---|---|---:|---:|"]
    for stage, key in [
        ("synth", "tasks"),
        ("synth", "generations"),
        ("synth", "examples"),
        ("align", "pairs"),
        ("align", "junior"),
        ("align", "senior"),
        ("embed", "embed"),
        ("eval", "eval"),
    ]:
        man = m[key]
        if man is None:
            lines.append(f"| {stage} | {key} | not run | |")
        else:
            rows = man.get("num_rows", man.get("pairs", man.get("train_rows", "")))
            lines.append(f"| {stage} | {key} | {rows} | {man.get('duration_s', '')} |")
    if "synth_stats" in m:
        s = m["synth_stats"]
        lines += [
            "",
            "## Synthesis",
            "",
            f"- generator: `{cfg.synth.engine.model}` on vLLM, {cfg.synth.sampling.samples_per_prompt} samples per prompt",
            f"- tasks: {s['task_rows']} ({s['task_errors']} unparsable)",
            f"- generations: {s['generation_rows']} ({s['generation_errors']} rejected: {', '.join(s['errors']) or 'none'})",
            f"- training examples by type: {json.dumps(s['examples_by_type'])}",
            f"- tokens: {s['tokens_in']} in, {s['tokens_out']} out",
        ]
    for key, title in [
        ("junior", "Junior generator (SFT)"),
        ("senior", "Senior generator (DPO)"),
        ("embed", "Embedding model"),
    ]:
        man = m[key]
        if man is None:
            continue
        losses = ", ".join(f"{h['loss']:.4f}" for h in man["history"])
        lines += [
            "",
            f"## {title}",
            "",
            f"- base: `{man['base_model']}`, {man['steps']} steps, loss per step: {losses}",
        ]
    if m["eval"] is not None:
        ev = m["eval"]
        lines += [
            "",
            f"## Evaluation: {ev['task']} (mteb)",
            "",
            "| model | nDCG@10 | recall@10 | seconds |",
            "|---|---:|---:|---:|",
        ]
        for label, s in ev["scores"].items():
            lines.append(f"| {label} | {s['ndcg_at_10']:.4f} | {s['recall_at_10']:.4f} | {s['seconds']} |")
    if plot:
        lines += ["", f"![training losses]({plot})"]
    lines += [
        "",
        "Resolved config: `config.yaml`. Stage outputs and `_manifest.json` files sit beside this report.",
        "",
    ]
    return "\n".join(lines)


def plot_training(m: dict[str, Any], path: Path) -> str | None:
    """Loss against step for every trained model; returns the file name, or None if nothing trained."""
    curves = {k: m[k]["history"] for k in ("junior", "senior", "embed") if m[k] is not None}
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
