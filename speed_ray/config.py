"""Typed run configuration: dataclass defaults < YAML file < CLI ``key.sub=value`` overrides.

One ``SpeedRayConfig`` describes a whole run (every stage). It composes the sections, each declared
in its domain package with its own checks (``synth/config.py``, ``align/config.py``, ``embed/config.py``,
``eval/config.py``, ``engines/config.py``); the machinery is ``speed_ray.io.settings``. ``load_config``
rejects unknown keys and wrong types with a message that names the dotted key, and ``validate`` does
the section, cross-section and file-system checks, so a bad config fails before Ray starts (the CLI
turns ``ConfigError`` into exit code 2). ``save_config`` writes the resolved config into the run
directory.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from speed_ray.align import config as align_config
from speed_ray.align.config import AlignConfig
from speed_ray.embed import config as embed_config
from speed_ray.embed.config import EmbedConfig
from speed_ray.engines import config as engine_config
from speed_ray.engines.config import EngineConfig
from speed_ray.eval import config as eval_config
from speed_ray.eval.config import EvalConfig, ExperimentConfig
from speed_ray.io import fingerprint
from speed_ray.io.settings import (
    ConfigError,
    absolute,
    build,
    check_model,
    local_gpu_count,
    looks_like_path,
    parse_override,
    read_yaml,
    set_dotted,
)
from speed_ray.synth import config as synth_config
from speed_ray.synth.config import SynthConfig

# The run's stages in order. align comes first: synth can generate with the models it makes
# (``run:align/senior``).
STAGES = ("align", "synth", "embed", "eval", "report")


@dataclass
class RunSection:
    name: str = "quickstart"
    """Run name: the run directory is ``output_dir/name``."""
    stages: list[str] = field(default_factory=lambda: list(STAGES))
    """What ``speed-ray run`` does, taken in the order align, synth, embed, eval, report. A config
    says what it is for: ``[embed, eval, report]`` trains on a corpus and scores the result."""
    output_dir: str = "runs"
    """Folder that holds run directories (a local path)."""
    seed: int = 0
    """Seed for topic order, prompt placeholders, sampling and training."""
    ray_address: str | None = None
    """Ray cluster to join (``auto``, ``ray://host:10001``); None starts a local Ray."""
    num_cpus: int | None = None
    """CPUs of the local Ray (None: all of this machine's). Ignored when joining a cluster."""
    upload_to: str | None = None
    """Object storage for the outputs (``s3://bucket/prefix``, ``gs://...``, ``file://...``): each stage
    folder is copied to ``<upload_to>/<name>/`` as it finishes. Credentials from the environment."""
    resource_wait_s: float = 600.0
    """How long an engine pool, a training worker group or an eval task may wait for the cluster to
    place it (an autoscaler adding nodes included). Past it the run stops (exit 2), saying what it
    asked for and what the cluster has and can add."""


@dataclass
class SpeedRayConfig:
    run: RunSection = field(default_factory=RunSection)
    synth: SynthConfig = field(default_factory=SynthConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    experiment: ExperimentConfig = field(default_factory=ExperimentConfig)

    @property
    def run_dir(self) -> Path:
        """Absolute, so Ray workers (whose working directory differs) see the same folder."""
        return (Path(self.run.output_dir) / self.run.name).resolve()

    def engines(self) -> dict[str, EngineConfig]:
        """The engines this run uses, by dotted key (align's only when it aligns)."""
        return self.synth.engines() | (self.align.engines() if "align" in self.run.stages else {})

    def validate(self) -> None:
        """Each section's checks, then those across sections; no Ray and no model needed."""
        _check_run(self.run)
        for key, eng in self.engines().items():
            eng.validate(key)
            _check_run_model(key, eng)
        self.synth.validate()
        self.align.validate(enabled="align" in self.run.stages)
        self.embed.validate()
        self.eval.validate(self.experiment.variants)
        _check_resources(self)
        for key, spec in self.model_specs().items():
            check_model(key, spec)

    def model_specs(self) -> dict[str, str]:
        """The model specs the run's stages load, by dotted key (eval.models apart): checked before any
        work starts, and what decides whether the run needs the hub (``speed_ray.io.hub``)."""
        stages = set(self.run.stages)
        engines = (self.synth.engines() if "synth" in stages else {}) | (
            self.align.engines() if "align" in stages else {}
        )
        specs = {f"{k}.model": e.model for k, e in engines.items() if e.kind != "openai"}
        if "align" in stages:
            specs["align.model"] = self.align.model
        if stages & {"embed", "eval"}:  # eval scores the untouched base as ``base``
            specs["embed.model"] = self.embed.model
        if "synth" in stages and self.synth.needs_retriever():
            model = self.synth.retriever.model
            specs["synth.retriever.model" if model else "embed.model"] = model or self.embed.model
        return specs

    def retriever(self) -> tuple[str, str]:
        """(model spec, pooling) of ``synth.retriever``, its nulls filled from ``embed``."""
        r = self.synth.retriever
        return r.model or self.embed.model, r.pooling or self.embed.pooling

    def fingerprint(
        self, keys: Iterable[str], inputs: dict[str, str | None] | None = None, exclude: Iterable[str] = ()
    ) -> dict[str, Any]:
        """The fingerprint of a step that depends on the config keys under ``keys`` (less
        ``RUNTIME_KEYS`` and ``exclude``) and on ``inputs`` (``speed_ray.io.fingerprint``)."""
        flat = fingerprint.select(fingerprint.flatten(self), keys, (*RUNTIME_KEYS, *exclude))
        return fingerprint.fingerprint(flat, inputs)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> SpeedRayConfig:
    """Defaults < YAML file at ``path`` < ``key.sub=value`` overrides; validated.

    Relative paths in the file resolve against the file's folder, those in overrides against the
    current folder; both are stored absolute, so the saved config means the same from anywhere."""
    data: dict[str, Any] = {}
    if path is not None:
        data = resolve_paths("", read_yaml(Path(path)), Path(path).resolve().parent)
    for item in overrides or []:
        key, value = parse_override(item)
        set_dotted(data, key, resolve_paths(key, value, Path.cwd()))
    cfg = build(SpeedRayConfig, data, "")
    cfg.run.output_dir = absolute(cfg.run.output_dir, Path.cwd())  # the default, ``runs``, too
    cfg.validate()
    return cfg


def save_config(cfg: SpeedRayConfig, path: Path) -> None:
    from speed_ray.io.schemas import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


# Keys whose values are local paths (a built-in data name or a URL is left as it is), and keys
# whose values are model specs, which are paths only when they start like one (``./``, ``/``, ``~``).
PATH_KEYS = frozenset(
    {
        "run.output_dir",
        "synth.taxonomy.path",
        "synth.corpus.path",
        "synth.corpus.exclude",
        "synth.pairs",
        "align.seed_data",
        "align.pairs_data",
        "align.revision_data",
        "embed.data.path",
        "eval.retrieval.path",
        "eval.knn.path",
        "eval.clustering.path",
    }
)
ENGINE_KEYS = (
    "synth.engine",
    "synth.brainstormer",
    "synth.judge",
    "synth.reviser",
    "align.teacher",
    "align.generator",
)
MODEL_KEYS = frozenset(
    {"align.model", "embed.model", "synth.retriever.model", *(f"{k}.model" for k in ENGINE_KEYS)}
)
# Sections that map a name to ``{dotted.key: value}`` overrides of the run config.
OVERRIDE_SECTIONS = ("experiment.prepare", "experiment.variants", "experiment.evals")


def resolve_paths(key: str, value: Any, base: Path) -> Any:
    """``value``, found at dotted ``key`` of a config, with its relative paths made absolute against
    ``base`` (a config file's folder, or the current folder for a command-line override)."""
    if isinstance(value, dict) and key in OVERRIDE_SECTIONS:
        return {
            name: {k: resolve_paths(k, v, base) for k, v in changes.items()}
            if isinstance(changes, dict)
            else changes
            for name, changes in value.items()
        }
    if isinstance(value, dict):
        return {k: resolve_paths(f"{key}.{k}" if key else k, v, base) for k, v in value.items()}
    if isinstance(value, str) and (key in PATH_KEYS or (key in MODEL_KEYS and looks_like_path(value))):
        return absolute(value, base)
    if key == "eval.models" and isinstance(value, list):
        return [_resolve_model_entry(e, base) if isinstance(e, str) else e for e in value]
    return value


def _resolve_model_entry(entry: str, base: Path) -> str:
    """An ``eval.models`` entry, ``spec`` or ``label=spec``, with a path spec made absolute."""
    label, named, spec = entry.partition("=")
    if not named:
        label, spec = "", entry
    return f"{label}{named}{absolute(spec, base)}" if looks_like_path(spec) else entry


# Keys that change where or how fast a step runs, never its output: no step is stale for them, even
# one that declares their section (``speed_ray.io.fingerprint``).
RUNTIME_KEYS = (
    "run.name",
    "run.stages",
    "run.output_dir",
    "run.ray_address",
    "run.num_cpus",
    "run.upload_to",
    "run.resource_wait_s",
    "experiment",
    *synth_config.RUNTIME,
    *(f"{engine}.{key}" for engine in ENGINE_KEYS for key in engine_config.RUNTIME),
    *embed_config.RUNTIME,
    *align_config.RUNTIME,
    *eval_config.RUNTIME,
)


# ----------------------------------------------------------------------------------------------
# Checks across sections


def _check_run(run: RunSection) -> None:
    if not run.name or "/" in run.name or run.name in (".", ".."):
        raise ConfigError(f"run.name: expected a plain folder name, got {run.name!r}")
    if not run.stages or not set(run.stages) <= set(STAGES):
        raise ConfigError(
            f"run.stages: expected a list of stages from {', '.join(STAGES)}, got {run.stages!r}"
        )
    if not run.resource_wait_s > 0:
        raise ConfigError(f"run.resource_wait_s: expected seconds > 0, got {run.resource_wait_s!r}")
    if run.upload_to is not None:
        from speed_ray.io.storage import check_uri

        try:
            check_uri(run.upload_to)
        except ValueError as e:
            raise ConfigError(str(e)) from None


# Models an earlier stage of the same run produces, for engines to name as ``run:<folder>``.
RUN_MODELS = tuple(f"run:align/{n}" for n in align_config.STEPS)


def _is_run_model(spec: str) -> bool:
    """``run:align/senior`` (this run's), or ``run:../<run name>/align/senior`` (a sibling run's)."""
    if spec in RUN_MODELS:
        return True
    parts = spec.removeprefix("run:").split("/")
    return (
        len(parts) == 4
        and parts[0] == ".."
        and parts[1] not in ("", ".", "..")
        and f"run:{parts[2]}/{parts[3]}" in RUN_MODELS
    )


def _check_run_model(key: str, eng: EngineConfig) -> None:
    if eng.model.startswith("run:") and (eng.kind == "openai" or not _is_run_model(eng.model)):
        raise ConfigError(
            f"{key}.model: {eng.model!r} names no model the align stage makes; expected one of "
            f"{', '.join(RUN_MODELS)}, or another run's as run:../<run name>/align/... "
            "(with kind vllm or transformers)"
        )


def _check_resources(cfg: SpeedRayConfig) -> None:
    """Resource requests a local Ray could never satisfy (on a cluster, checked after connecting)."""
    if cfg.run.ray_address is not None:
        return
    cpus = cfg.run.num_cpus or os.cpu_count() or 1
    gpus = local_gpu_count()
    trains = {"align": cfg.align.resources, "embed": cfg.embed.resources}
    for name, res in trains.items():
        need = res.workers * res.cpus_per_worker
        if need > cpus:
            raise ConfigError(
                f"{name}.resources: {res.workers} workers x {res.cpus_per_worker} CPUs = {need} CPUs, "
                f"but this machine's Ray has {cpus}; expected at most {cpus}"
            )
        if res.use_gpu and res.workers > gpus:
            raise ConfigError(
                f"{name}.resources.use_gpu: {res.workers} GPU workers asked for, "
                f"but this machine has {gpus} GPUs"
            )
    for key, eng in cfg.engines().items():
        need_gpus = eng.num_gpus * eng.tensor_parallel_size * eng.min_actors
        if need_gpus > gpus:
            raise ConfigError(
                f"{key}.num_gpus: {eng.min_actors} actors x {eng.num_gpus * eng.tensor_parallel_size} GPUs "
                f"asked for, but this machine has {gpus} GPUs (set num_gpus: 0 for the CPU build of vLLM)"
            )
        if eng.num_cpus * eng.min_actors >= cpus:
            raise ConfigError(
                f"{key}.num_cpus: {eng.min_actors} actors x {eng.num_cpus} CPUs leaves no CPU for "
                f"Ray Data's read and write tasks on {cpus} CPUs (that deadlocks); expected less than {cpus}"
            )
