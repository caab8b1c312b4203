"""report: ``<run>/report.md``, the same as a page (``report.html``) and the plots, from the
manifests the other stages wrote.

Reads only the run directory, so ``speed-ray report CONFIG`` (or ``speed-ray report RUN_DIR``, which
reads the run's saved config) can re-render a finished run. This module collects the manifests and
lays out the report: a table of every stage's steps, then a section per stage, each from its own
module (``report_align``, ``report_synth``, ``report_training``, ``report_eval``).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig
from speed_ray.eval.html import write_report
from speed_ray.eval.report_align import ALIGN_CALL_STEPS, ALIGN_STEPS, align_lines
from speed_ray.eval.report_eval import eval_lines
from speed_ray.eval.report_synth import SYNTH_STEPS, degenerate_rows, plot_synth, synth_lines
from speed_ray.eval.report_training import plot_embed, plot_training, training_lines
from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    QUERIES,
    TASKS,
    error_kind,
    read_manifest,
    stage_shards,
)

logger = logging.getLogger(__name__)


def run(cfg: SpeedRayConfig) -> dict:
    run_dir = cfg.run_dir
    m = collect(run_dir)
    plot = plot_training(m, run_dir / "training.png")
    synth_plot = plot_synth(m, run_dir / "synth.png")
    embed_plot = plot_embed(m, run_dir / "embed.png")
    text = render(cfg, m, plot)
    text = _with_plot(text, "Embedding model", "embedding training", embed_plot)
    text = _with_plot(text, "Synthesis", "synthesis steps", synth_plot)
    if m["eval"] is not None and m["eval"].get("tasks"):
        from speed_ray.eval.experiments import plot_scores

        plot_scores(m["eval"], f"{cfg.run.name}: scores against the baselines", run_dir / "eval.png")
        text = text.replace("\n## Evaluation: ", "\n![scores](eval.png)\n\n## Evaluation: ", 1)
    path = run_dir / "report.md"
    write_report(path, text)
    logger.info(f"report: {path} (and report.html)")
    return {"report": str(path)}


def _with_plot(text: str, heading: str, alt: str, plot: str | None) -> str:
    """``text`` with ``plot`` shown first under the section ``heading`` (unchanged without a plot)."""
    if not plot:
        return text
    head = f"\n## {heading}\n"
    return text.replace(head, f"{head}\n![{alt}]({plot})\n", 1)


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
        k: error_kinds(run_dir / "align" / k, schema)
        for k, schema in ALIGN_CALL_STEPS.items()
        if m[f"align/{k}"] is not None and "accounting" in m[f"align/{k}"]
    }
    if m["examples"] is not None:
        by_type: Counter[str] = Counter()
        degenerate: Counter[str] = Counter()
        for shard in stage_shards(run_dir / "synth/examples", EXAMPLES):  # one shard in memory at a time
            by_type.update(shard["task_type"].to_pylist())
            degenerate.update(degenerate_rows(shard.to_pylist()))
        m["examples_by_type"], m["degenerate"] = dict(by_type), dict(degenerate)
        m["error_kinds"] = {
            k: error_kinds(run_dir / f"synth/{k}", schema)
            for k, schema in (("tasks", TASKS), ("generations", GENERATIONS), ("queries", QUERIES))
            if m[k] is not None
        }
    return m


def error_kinds(stage_dir: Path, schema) -> dict[str, int]:
    """A step's error rows by the error's first words (``invalid JSON``, ``missing or empty
    field``...), read shard by shard."""
    kinds: Counter[str] = Counter()
    for shard in stage_shards(stage_dir, schema, ["error"]):
        kinds.update(error_kind(e) for e in shard["error"].to_pylist() if e)
    return dict(kinds)


def render(cfg: SpeedRayConfig, m: dict[str, Any], plot: str | None) -> str:
    """The report's markdown: the stage table, each stage's section, the training-loss plot."""
    lines = [f"# speed-ray run `{cfg.run.name}`", "", *_stage_table(m)]
    if any(m[f"align/{k}"] is not None for k in ALIGN_STEPS):
        lines += align_lines(cfg, m)
    if m["examples"] is not None:
        lines += synth_lines(cfg, m)
    lines += training_lines(m)
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


def _stage_table(m: dict[str, Any]) -> list[str]:
    """Every step of every stage: its rows and seconds, or ``not run``."""
    lines = ["| stage | step | rows | seconds |", "|---|---|---:|---:|"]
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
    return lines
