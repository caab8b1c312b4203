"""The ``speed-ray`` command.

    speed-ray run CONFIG [key.sub=value ...]      every stage in order
    speed-ray STAGE CONFIG [key.sub=value ...]    one stage: align, synth, embed, eval, report
    speed-ray report RUN_DIR                      re-render a run's report from its folder
    speed-ray experiment CONFIG [key.sub=value ...]   train the config's variants, score them, write the section
    speed-ray doctor [CONFIG]                     what this machine offers, and what a run would use

-v/--verbose (debug lines) or -q/--quiet (warnings and errors only, no progress bars), before or after
the subcommand. Status lines and bars go to stderr; stdout gets the report path (doctor: its report).

Exit codes: 0 done, 2 something to fix on your side (bad config, a bad row in a data file, missing
input, full disk, unwritable folder: one line that names it), 1 anything else (a bug: the traceback
shows where).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from speed_ray.config import SpeedRayConfig, load_config, save_config
from speed_ray.io import hub, logs, storage
from speed_ray.io.data import DataError
from speed_ray.io.settings import ConfigError
from speed_ray.pipeline import STAGES, stage_module
from speed_ray.ray_utils import check_shared_folder

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="speed-ray", description="SPEED synthetic data and embedding training on Ray."
    )
    logs.add_flags(p)
    # The same flags after the subcommand; SUPPRESS keeps a flag given before it.
    flags = argparse.ArgumentParser(add_help=False)
    logs.add_flags(flags, default=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)
    for name in ("run", *STAGES):
        help_ = "run every stage in order" if name == "run" else f"run the {name} stage"
        s = sub.add_parser(name, help=help_, parents=[flags])
        s.add_argument("config", help="YAML config file")
        s.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    e = sub.add_parser(
        "experiment", help="train an experiment's variants, score them side by side", parents=[flags]
    )
    e.add_argument("config", help="YAML config with an experiment section")
    e.add_argument("overrides", nargs="*", help="key.sub=value overrides (applied to every variant)")
    d = sub.add_parser("doctor", help="what this machine offers and what a run would use", parents=[flags])
    d.add_argument("config", nargs="?", help="optional YAML config to resolve")
    d.add_argument("overrides", nargs="*")
    return p


def parse_args(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args``, but overrides may also follow a flag (``embed x.yaml -q embed.steps=3``):
    argparse ends a ``nargs="*"`` positional at the first flag and would reject what comes after."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def run_stages(cfg: SpeedRayConfig) -> None:
    """The config's stages (``run.stages``) in pipeline order. A config that differs from the
    saved one needs no note here: each step compares its own fingerprint and says which step is
    stale and why (speed_ray.io.steps.step)."""
    stages = [s for s in STAGES if s in cfg.run.stages]
    check_shared_folder(cfg)  # on a multi-node cluster, every node must see the run folder
    saved = cfg.run_dir / "config.yaml"
    save_config(cfg, saved)
    remote = f"{cfg.run.upload_to.rstrip('/')}/{cfg.run.name}" if cfg.run.upload_to else None
    if remote:
        try:  # missing credentials or a wrong bucket fail now, before any expensive work
            storage.check_writable(remote)
            storage.upload(saved, f"{remote}/config.yaml")
        except OSError as e:
            raise ConfigError(f"run.upload_to: cannot write to {remote}: {e}") from None
    for name in stages:
        stage_module(name).run(cfg)
        if remote:
            # A stage's folder; the report stage's pages and plots lie at the top of the run, and
            # eval writes the scores into the trained model's card (embed/model/README.md).
            top = [p for p in cfg.run_dir.iterdir() if p.is_file()] if name == "report" else []
            also = [cfg.run_dir / "embed"] if name == "eval" else []
            for path in [cfg.run_dir / name, *also, *top]:
                if path.exists():
                    storage.upload(path, f"{remote}/{path.name}")
            logger.info(f"{name}: uploaded to {remote}/")
    print(f"report: {cfg.run_dir / 'report.md'}" if "report" in stages else f"run directory: {cfg.run_dir}")


def hub_needs(cfg: SpeedRayConfig, experiment: bool = False) -> list[str]:
    """What the run loads that is not local (``speed_ray.io.models.is_local``): model specs, and the
    datasets of ``eval.mteb_tasks`` that the local Hugging Face cache lacks. An experiment's variants
    and evals count too (their model keys and eval.models)."""
    from speed_ray.config import MODEL_KEYS
    from speed_ray.eval.config import NAMES
    from speed_ray.io.models import is_local

    specs = list(cfg.model_specs().values())
    evals = "eval" in cfg.run.stages or experiment
    entries = list(cfg.eval.models) if evals else []
    if experiment:
        ex = cfg.experiment
        for changes in [*ex.prepare.values(), *ex.variants.values(), *ex.evals.values()]:
            for key, value in dict(changes or {}).items():
                specs += [value] if key in MODEL_KEYS and isinstance(value, str) else []
                entries += [e for e in value if isinstance(e, str)] if key == "eval.models" else []
    for entry in entries:
        label, named, spec = entry.partition("=")
        specs.append(spec if named else entry)
    skip = {*NAMES, *cfg.experiment.variants}
    remote = sorted({s for s in specs if s not in skip and not is_local(s)})
    if not remote and evals and cfg.eval.mteb_tasks:
        remote = [f"mteb dataset {d.get('path')}" for d in _mteb_datasets(cfg.eval.mteb_tasks)]
    return remote


def _mteb_datasets(names: list[str]) -> list[dict]:
    """The hub datasets of these mteb tasks that the local cache lacks (an unknown name counts as one:
    the eval stage says what is wrong with it)."""
    from speed_ray.eval.tasks import named_tasks

    try:
        datasets = [dict(task.metadata.dataset) for task in named_tasks(names)]
    except ValueError:
        return [{"path": ", ".join(names)}]
    return [d for d in datasets if not hub.dataset_cached(d)]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(_parser(), argv)
    logs.configure(args.log_level)
    try:
        if args.command == "doctor":
            from speed_ray.doctor import doctor

            cfg = load_config(args.config, args.overrides) if args.config else None
            print(doctor(cfg))
            return 0
        # One stage's command is the run with only that stage: `speed-ray embed CONFIG`.
        only = [] if args.command in ("run", "experiment") else [f"run.stages=[{args.command}]"]
        if args.command == "report" and Path(args.config).is_dir():  # speed-ray report RUN_DIR
            run_dir = Path(args.config).resolve()
            where = [f"run.output_dir={run_dir.parent}", f"run.name={run_dir.name}"]
            cfg = load_config(run_dir / "config.yaml", [*args.overrides, *where, *only])
        else:
            cfg = load_config(args.config, [*args.overrides, *only])
        hub.settle(hub_needs(cfg, experiment=args.command == "experiment"))
        if args.command == "experiment":
            from speed_ray.eval.experiment import run as run_experiment

            run_experiment(cfg, args.config, args.overrides)
            print(f"report: {cfg.run_dir / 'report.md'}")
            return 0
        run_stages(cfg)
    except (ConfigError, DataError, OSError) as e:
        # Something to fix on the user's side: a config, a bad row in a data file, a missing file, a
        # full disk, a folder that cannot be written (the message names it). Exit 1 with a traceback
        # is a bug in speed-ray. jobs/*.py come through here too (jobs/_common.py).
        print(f"speed-ray: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
