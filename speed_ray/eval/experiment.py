"""experiment: make the shared runs, train every variant, score them with the eval stage, write the
section.

The ``prepare`` runs (an aligned generator, synthetic data) and every variant are ordinary runs
(``runs/<its run.name>/``), so a finished one is skipped and two experiments that share a run's name
and settings make it once; every eval is an ordinary eval stage. Produces
``runs/<run.name>/report.md`` and ``report.html`` (tables, the papers' figures, plots) and
``runs/<run.name>/experiment.json`` (every score with its standard error, and each model's paired
difference from the base model).
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from speed_ray.config import SpeedRayConfig, load_config, save_config
from speed_ray.eval.experiments import (
    MAIN_SCORES,
    SE_NOTE,
    differences,
    override_args,
    plot_curves,
    plot_scores,
    score_table,
    series_points,
    snapshot_models,
    training_table,
    variant_models,
)
from speed_ray.eval.html import write_report
from speed_ray.eval.report_eval import layer_lines
from speed_ray.io.schemas import write_json_atomic
from speed_ray.io.settings import ConfigError

logger = logging.getLogger(__name__)


def configs(cfg: SpeedRayConfig, path: str, overrides: list[str]) -> tuple[dict, dict, dict]:
    """(prepare runs as (config, stages), variant configs, eval configs), every one loaded and
    validated before anything runs."""
    ex = cfg.experiment
    if not ex.variants and not any("eval.models" in (o or {}) for o in ex.evals.values()):
        raise ConfigError("experiment: expected variants to train or evals with eval.models")
    prepare = {name: _prepare_config(cfg, path, overrides, name, c) for name, c in ex.prepare.items()}
    variants = {}
    for name, changes in ex.variants.items():
        args = [f"run.name={cfg.run.name}-{name}", *overrides, *override_args(dict(changes or {}))]
        variants[name] = _load(path, args, f"experiment.variants.{name}")
    dirs = {name: v.run_dir for name, v in variants.items()}
    evals = {name: _eval_config(cfg, path, overrides, name, c, dirs) for name, c in ex.evals.items()}
    _check_series(ex.series, variants, evals)
    _check_curves(ex.curves, variants)
    return prepare, variants, evals


def _prepare_config(
    cfg: SpeedRayConfig, path: str, overrides: list[str], name: str, changes: dict | None
) -> tuple[SpeedRayConfig, list[str]]:
    """A shared run's config (run ``<run.name>-<name>``) and the stages it runs."""
    from speed_ray.pipeline import STAGES

    changes = dict(changes or {})
    stages = changes.pop("stages", None)
    if not isinstance(stages, list) or not stages or not set(stages) <= set(STAGES):
        raise ConfigError(
            f"experiment.prepare.{name}.stages: expected a list of stages from {', '.join(STAGES)}, "
            f"got {stages!r}"
        )
    args = [
        f"run.name={cfg.run.name}-{name}",
        *overrides,
        *override_args(changes),
        f"run.stages={json.dumps(stages)}",
    ]
    return _load(path, args, f"experiment.prepare.{name}"), stages


def _eval_config(
    cfg: SpeedRayConfig, path: str, overrides: list[str], name: str, changes: dict | None, dirs: dict
) -> SpeedRayConfig:
    """An eval's config: run ``<run.name>`` for ``main``, ``<run.name>-<name>`` for the others; its
    models named like a variant are that variant's trained model (``dirs``: the variants' runs)."""
    changes = dict(changes or {})
    models = variant_models(list(changes.pop("eval.models", cfg.eval.models)), dirs)
    run_name = cfg.run.name if name == "main" else f"{cfg.run.name}-{name}"
    args = [
        f"run.name={run_name}",
        *overrides,
        *override_args(changes),
        f"eval.models={json.dumps(models)}",
    ]
    return _load(path, args, f"experiment.evals.{name}")


def _check_series(series: dict[str, list[str]], variants: dict, evals: dict) -> None:
    """Every series is made of variants that the main eval scores."""
    scored = {m.split("=", 1)[0] for m in evals["main"].eval.models} if "main" in evals else set()
    for name, members in series.items():
        if not members or not set(members) <= set(variants) & scored:
            raise ConfigError(
                f"experiment.series.{name}: expected variants scored by the main eval, got {members}"
            )


def _check_curves(curves: list[str], variants: dict) -> None:
    """Every curve is a variant that saves snapshots."""
    for name in curves:
        if name not in variants:
            raise ConfigError(
                f"experiment.curves: {name!r} is not a variant (expected one of {sorted(variants)})"
            )
        if not variants[name].embed.snapshot_steps:
            raise ConfigError(f"experiment.curves: variant {name} needs embed.snapshot_steps > 0")


def _load(path: str, args: list[str], key: str) -> SpeedRayConfig:
    """One variant or eval as a plain run config (no experiment section, so experiments that share
    a run save the same config for it)."""
    from dataclasses import replace

    from speed_ray.eval.config import ExperimentConfig

    try:
        return replace(load_config(path, args), experiment=ExperimentConfig())
    except ConfigError as e:
        raise ConfigError(f"{key}: {e}") from e


def run(cfg: SpeedRayConfig, path: str, overrides: list[str]) -> dict[str, Any]:
    started = time.time()
    ex = cfg.experiment
    prepare, variants, evals = configs(cfg, path, overrides)
    logger.info(
        f"experiment {cfg.run.name}: {len(prepare)} shared runs, {len(variants)} variants, {len(evals)} evals"
    )
    _make_shared_runs(prepare)
    trained = _train_variants(variants)
    scores = _run_evals(evals)
    curves, curve_tasks = _curves(cfg, variants) if ex.curves else ({}, {})
    out = cfg.run_dir
    out.mkdir(parents=True, exist_ok=True)  # no eval named main: nothing else made it
    result = {
        "title": ex.title,
        "prepared": {n: str(p.run_dir) for n, (p, _) in prepare.items()},
        "variants": {n: str(v.run_dir) for n, v in variants.items()},
        "training": {n: _training_summary(m) for n, m in trained.items()},
        "evals": scores,
        # every model's paired difference from base on each task's main score: {eval: {model: {task: ...}}}
        "differences": {name: differences(ev) for name, ev in scores.items()},
        "eval_dirs": {n: str(e.run_dir) for n, e in evals.items()},
        "curves": curves,
        "curve_tasks": curve_tasks,
        "duration_s": round(time.time() - started, 1),
    }
    write_json_atomic(out / "experiment.json", result)
    write_report(out / "report.md", render(cfg, result, trained))
    logger.info(f"experiment: {out / 'report.md'} ({result['duration_s']:.0f}s)")
    return result


def _make_shared_runs(prepare: dict[str, tuple[SpeedRayConfig, list[str]]]) -> None:
    """Run each shared run's stages (a finished stage is skipped)."""
    from speed_ray.pipeline import stage_module

    for i, (name, (pcfg, stages)) in enumerate(prepare.items(), 1):
        logger.info(
            f"experiment: shared run {i}/{len(prepare)}: {name}, {' + '.join(stages)} ({pcfg.run_dir})"
        )
        save_config(pcfg, pcfg.run_dir / "config.yaml")
        for stage in stages:
            stage_module(stage).run(pcfg)


def _train_variants(variants: dict[str, SpeedRayConfig]) -> dict[str, dict[str, Any]]:
    """Train each variant's embedding model; {variant: its embed manifest}."""
    from speed_ray.embed import driver as embed

    trained = {}
    for i, (name, vcfg) in enumerate(variants.items(), 1):
        logger.info(f"experiment: variant {i}/{len(variants)}: {name} ({vcfg.run_dir})")
        save_config(vcfg, vcfg.run_dir / "config.yaml")
        trained[name] = embed.run(vcfg)
    return trained


def _run_evals(evals: dict[str, SpeedRayConfig]) -> dict[str, dict[str, Any]]:
    """Run each eval; {eval: its eval manifest}."""
    from speed_ray.eval import driver as evaluate

    scores = {}
    for name, ecfg in evals.items():
        logger.info(f"experiment: eval {name}: {', '.join(ecfg.eval.models)}")
        save_config(ecfg, ecfg.run_dir / "config.yaml")
        scores[name] = evaluate.run(ecfg)
    return scores


def _training_summary(m: dict[str, Any]) -> dict[str, Any]:
    return {k: m[k] for k in ("steps", "global_batch", "trainable_params", "duration_s") if k in m}


def _curves(
    cfg: SpeedRayConfig, variants: dict
) -> tuple[dict[str, dict[str, list[tuple[int, float]]]], dict[str, str]]:
    """Score each curve variant's snapshots on this config's eval tasks (a run named
    <run.name>-curves); step 0 is the base model. Final models hit the embeddings cache."""
    from dataclasses import replace

    from speed_ray.eval import driver as evaluate

    entries = {
        name: snapshot_models(name, variants[name].run_dir, variants[name].embed.steps)
        for name in cfg.experiment.curves
    }
    models = ["base", *(entry for points in entries.values() for _, entry in points)]
    ccfg = replace(
        cfg,
        run=replace(cfg.run, name=f"{cfg.run.name}-curves"),
        eval=replace(cfg.eval, models=models, layers=False),
    )
    save_config(ccfg, ccfg.run_dir / "config.yaml")
    logger.info(f"experiment: curves: {len(models)} models")
    m = evaluate.run(ccfg)
    return {name: _curve(m, points) for name, points in entries.items()}, m["tasks"]


def _curve(m: dict[str, Any], points: list[tuple[int, str]]) -> dict[str, list[tuple[int, float]]]:
    """{task: [(step, main score)]} of one variant from the curves eval's manifest ``m``; ``points``
    are its snapshots as (step, eval.models entry), and step 0 is the base model."""
    per_task: dict[str, list[tuple[int, float]]] = {}
    for task, kind in m["tasks"].items():
        key = MAIN_SCORES[kind]
        per_task[task] = [(0, m["scores"]["base"][task][key])] + [
            (step, m["scores"][entry.split("=", 1)[0]][task][key]) for step, entry in points
        ]
    return per_task


def render(cfg: SpeedRayConfig, result: dict[str, Any], trained: dict[str, dict[str, Any]]) -> str:
    """The experiment's report: the shared runs, training, the scores of each eval, the score
    against training step and against training data size, the papers' figures; the plots beside it."""
    ex, out = cfg.experiment, cfg.run_dir
    title = ex.title or cfg.run.name
    lines = [f"# {title}", ""]
    if result.get("prepared"):
        lines += _shared_runs_lines(result["prepared"], out)
    if trained:
        lines += ["## Training", "", *training_table(trained), ""]
    for name, ev in result["evals"].items():
        lines += _scores_lines(cfg, result, name, ev)
    if result["curves"]:
        plot_curves(result["curves"], result["curve_tasks"], title, out / "curves.png")
        lines += ["## Score against training step", "", *_point_lines(result["curves"], "step {}")]
        lines += ["", "![curves](curves.png)", ""]
    if ex.series:
        lines += _series_lines(cfg, result["evals"]["main"], trained)
    if ex.paper:
        lines += ["## The papers' figures", "", ex.paper.strip(), ""]
    return "\n".join(lines)


def _shared_runs_lines(prepared: dict[str, str], out: Path) -> list[str]:
    """A link to each shared run's report (to its folder while it has none)."""
    lines = ["## Shared runs", ""]
    for name, run_dir in prepared.items():
        report = Path(run_dir) / "report.md"
        where = os.path.relpath(report if report.is_file() else run_dir, out)
        lines.append(f"- {name}: [{os.path.relpath(run_dir, out)}]({where})")
    return lines + [""]


def _scores_lines(cfg: SpeedRayConfig, result: dict[str, Any], name: str, ev: dict[str, Any]) -> list[str]:
    """One eval's score table and plot, and its layer analysis if it made one."""
    ex, out = cfg.experiment, cfg.run_dir
    png = f"scores-{name}.png"
    plot_scores(ev, f"{ex.title or cfg.run.name}: {name}", out / png)
    table = score_table(ev, reference=ex.reference or None)
    lines = [f"## Scores: {name} (x100)", "", *table, "", SE_NOTE, ""]
    lines += [f"![scores]({png})", ""]
    if ev.get("layers"):
        png = os.path.relpath(Path(result["eval_dirs"][name]) / "eval" / "layers.png", out)
        lines += [line.replace("(eval/layers.png)", f"({png})") for line in layer_lines(ev["layers"])]
        lines += [""]
    return lines


def _series_lines(cfg: SpeedRayConfig, ev: dict[str, Any], trained: dict[str, dict[str, Any]]) -> list[str]:
    """The main eval's scores of each series against its variants' training rows, and their plot."""
    ex, out = cfg.experiment, cfg.run_dir
    points = series_points(ex.series, ev, {n: m["train_rows"] for n, m in trained.items()})
    xlabel = "training rows (0: untrained; same steps x batch elsewhere)"
    plot_curves(points, ev["tasks"], ex.title or cfg.run.name, out / "scaling.png", xlabel)
    lines = ["## Score against training data size", "", *_point_lines(points, "{} rows")]
    return lines + ["", "![scaling](scaling.png)", ""]


def _point_lines(curves: dict[str, dict[str, list[tuple[int, float]]]], x: str) -> list[str]:
    """A line per (name, task) of ``curves``: each point as ``x`` formatted with its x value, and
    its score x100."""
    return [
        f"- {name}, {task}: " + ", ".join(f"{x.format(n)}: {100 * v:.1f}" for n, v in points)
        for name, per_task in curves.items()
        for task, points in per_task.items()
    ]
