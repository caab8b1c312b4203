"""SPEED's generate -> judge -> pair -> revise loop, written once: synth runs it with its engines, and
align runs it with the teacher and the junior, training a model between its steps.

A ``Loop`` works in one stage folder (``<run>/synth`` or ``<run>/align``). Each method is one
resumable step (``speed_ray.io.steps.step``): it reads the steps named in its arguments, calls its
engine through the Ray Data pool (``speed_ray.synth.stage.generate_step``), and writes a step folder
with a manifest holding its fingerprint. What each step depends on is the stage's ``keys`` (config
keys, as dotted prefixes), the engine section it calls, and the outputs of the steps it reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.config import SpeedRayConfig
from speed_ray.engines.config import EngineConfig
from speed_ray.io.fingerprint import output_hash, path_hash, run_model_inputs
from speed_ray.io.schemas import GENERATIONS, JUDGMENTS, PREFERENCE_PAIRS, TASKS, read_manifest, read_stage
from speed_ray.io.schemas import write_stage as write_table
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import step
from speed_ray.synth import speed
from speed_ray.synth.stage import generate_step, sampling_params


def engine_at(cfg: SpeedRayConfig, key: str) -> EngineConfig:
    """The engine at dotted ``key`` (``synth.judge``)."""
    section, name = key.split(".")
    eng = getattr(getattr(cfg, section), name)
    assert eng is not None, key
    return eng


@dataclass
class Loop:
    cfg: SpeedRayConfig
    stage: str
    """``synth`` or ``align``: the folder under the run, and the prefix of the step names."""
    keys: dict[str, tuple[str, ...]]
    """Per step name, the config keys its output depends on besides its engine's section."""

    @property
    def out(self) -> Path:
        return self.cfg.run_dir / self.stage

    def fingerprint(self, name: str, reads: Iterable[str] = (), engine: str | None = None) -> dict[str, Any]:
        """Step ``name``'s fingerprint: its ``keys``, the section of the engine it calls, the outputs of
        the steps it ``reads``, and the models of this run it generates with."""
        inputs = {f"{self.stage}/{r}": output_hash(read_manifest(self.out / r)) for r in reads}
        tax = self.cfg.synth.taxonomy
        if name == "tasks" and tax.path is not None and not tax.topics:
            inputs["synth.taxonomy.path"] = path_hash(tax.path)  # the file's topics
        if engine is not None:
            inputs |= run_model_inputs([engine_at(self.cfg, engine).model], self.cfg.run_dir)
        return self.cfg.fingerprint((*self.keys[name], *([engine] if engine else [])), inputs)

    def step(
        self,
        name: str,
        build: Callable[[], dict],
        reads: Iterable[str] = (),
        engine: str | None = None,
        role: str = "",
    ) -> dict:
        """Step ``name`` (shown as ``synth/name`` or ``align/name (role)``), done unless finished."""
        title = f"{self.stage}/{name}" + (f" ({role})" if role else "")
        return step(self.out / name, title, build, self.fingerprint(name, reads, engine))

    def generate(
        self, name: str, engine: str, rows: Iterable[dict], schema: pa.Schema, parse, params, **kw
    ) -> dict:
        """Rows through ``engine``'s pool into step folder ``name``."""
        eng = engine_at(self.cfg, engine)
        return generate_step(self.cfg, eng, self.out / name, schema, rows, params, parse, **kw)

    def params(self, max_tokens: int, n: int = 1, greedy: bool = False) -> dict[str, Any]:
        """SPEED App. B: temperature 1.0 and top_p 1.0 for synthesis, the judge at temperature 0."""
        s = self.cfg.synth.sampling
        return (
            sampling_params(max_tokens, 0.0, 1.0, n)
            if greedy
            else sampling_params(max_tokens, s.temperature, s.top_p, n)
        )

    # ------------------------------------------------------------------------------------------
    # The steps

    def tasks(self, topics: list[str], engine: str, role: str = "") -> dict:
        """One task per topic, brainstormed by ``engine``; STS tasks take the topic and need no call."""
        sc = self.cfg.synth

        def build() -> dict:
            rows = speed.task_requests(topics, sc.mix, self.cfg.run.seed, sc.sampling.max_field_chars)
            params = self.params(sc.sampling.brainstorm_max_tokens)
            return self.generate(
                "tasks",
                engine,
                rows,
                TASKS,
                speed.parse_tasks,
                params,
                ready=speed.is_sts,
                ready_parse=speed.sts_tasks,
            )

        return self.step("tasks", build, engine=engine, role=role)

    def samples(self, name: str, engine: str, examples_per_task: int, k: int, role: str = "") -> dict:
        """``k`` samples by ``engine`` of each example prompt (``examples_per_task`` per task)."""
        s = self.cfg.synth.sampling

        def build() -> dict:
            tasks = read_stage(self.out / "tasks", TASKS).to_pylist()
            rows = speed.example_requests(tasks, self.cfg.run.seed, s.max_field_chars, examples_per_task)
            return self.generate(
                name, engine, rows, GENERATIONS, speed.parse_generations, self.params(s.max_tokens, k)
            )

        return self.step(name, build, ("tasks",), engine, role)

    def groups(self, samples: str) -> dict[str, list[dict[str, Any]]]:
        return speed.group_samples(read_stage(self.out / samples, GENERATIONS))

    def ranked(self, samples: str, judged: bool) -> tuple[dict[str, list[dict[str, Any]]], pa.Table | None]:
        """The samples by prompt, and the judge's verdicts on them when there is a judge."""
        judgments = read_stage(self.out / "judgments", JUDGMENTS) if judged else None
        return self.groups(samples), judgments

    def judge(self, samples: str, engine: str, role: str = "") -> dict:
        """The best and worst of each prompt's samples, by ``engine`` at temperature 0."""
        s = self.cfg.synth.sampling

        def build() -> dict:
            rows = speed.judge_requests(self.groups(samples), self.cfg.run.seed, s.max_field_chars)
            params = self.params(s.judge_max_tokens, greedy=True)
            return self.generate("judgments", engine, rows, JUDGMENTS, speed.parse_judgments, params)

        return self.step("judgments", build, (samples,), engine, role)

    def pairs(self, samples: str, judged: bool, fallback: bool = True, empty: str = "") -> dict:
        """Preference pairs (best, worst) of each prompt: the judge's verdict where it parsed, else the
        rule-based score with ``fallback``. ``empty``: no pair is an error, with this advice."""
        reads = (samples, "judgments") if judged else (samples,)

        def build() -> dict:
            started = time.time()
            groups, judgments = self.ranked(samples, judged)
            table, dropped = speed.preference_pairs(groups, judgments, fallback=fallback)
            judged_rows = sum(r.startswith("judge: ") for r in table["reason"].to_pylist())
            extra = {
                "rows_in": len(groups),
                "judged": judged_rows,
                "rule_scored": table.num_rows - judged_rows,
            }
            if empty and table.num_rows == 0:
                raise ConfigError(
                    f"{self.stage}/pairs: no preference pair from {len(groups)} prompts (dropped: {dropped}); {empty}"
                )
            return write_table(
                self.out / "pairs", [table], PREFERENCE_PAIRS, extra | {"dropped": dropped}, started
            )

        return self.step("pairs", build, reads)

    def drafts(self, samples: str, judged: bool) -> dict:
        """One draft per prompt: the judge's best sample, else the first valid one."""
        reads = (samples, "judgments") if judged else (samples,)

        def build() -> dict:
            started = time.time()
            groups, judgments = self.ranked(samples, judged)
            table = speed.pick_drafts(groups, judgments)
            return write_table(self.out / "drafts", [table], GENERATIONS, {"prompts": len(groups)}, started)

        return self.step("drafts", build, reads)

    def revise(self, drafts: str, engine: str, role: str = "") -> dict:
        """Each draft in step ``drafts`` rewritten once by ``engine``; a samples step gives its first
        valid sample per prompt as the draft."""
        s = self.cfg.synth.sampling

        def build() -> dict:
            if drafts == "drafts":
                rows = read_stage(self.out / drafts, GENERATIONS)
            else:
                rows = speed.pick_drafts(self.groups(drafts))
            requests = speed.revise_requests(rows.to_pylist(), self.cfg.run.seed, s.max_field_chars)
            params = self.params(s.revise_max_tokens)
            return self.generate("revisions", engine, requests, GENERATIONS, speed.parse_revisions, params)

        return self.step("revisions", build, (drafts,), engine, role)
