"""SPEED's generate -> judge -> pair -> revise loop, written once: synth runs it with its engines, and
align runs it with the teacher and the junior, training a model between its steps.

A ``Loop`` works in one stage folder (``<run>/synth`` or ``<run>/align``). Each method is one
resumable step (``speed_ray.io.steps.step``): it reads the steps named in its arguments, calls its
engine through the Ray Data pool (``speed_ray.synth.stage.generate_step``), and writes a step folder
with a manifest holding its fingerprint. What each step depends on is the stage's ``keys`` (config
keys, as dotted prefixes), the engine section it calls, and the outputs of the steps it reads.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.config import SpeedRayConfig
from speed_ray.engines.config import EngineConfig
from speed_ray.io.fingerprint import output_hash, path_hash, run_model_inputs
from speed_ray.io.schemas import (
    GENERATIONS,
    JUDGMENTS,
    MANIFEST,
    PREFERENCE_PAIRS,
    TASKS,
    read_manifest,
    read_stage,
)
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import step
from speed_ray.synth import speed
from speed_ray.synth.stage import derive_step, generate_derived, generate_step, sampling_params


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
    generator: Any = None
    """An engine object answering every call instead of the configured engines (benchmarks)."""

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
        if name == "documents":  # the corpus files' contents
            corpus = self.cfg.synth.corpus
            inputs |= {f"synth.corpus.{k}": path_hash(getattr(corpus, k)) for k in ("path", "exclude")}
        if name in SHARD_BY_SHARD:
            inputs["sharding"] = (
                "shard s from shard s of each step read"  # older runs, one shard per step, redo it
            )
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
        return generate_step(
            self.cfg, eng, self.out / name, schema, rows, params, parse, generator=self.generator, **kw
        )

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

    def judge(self, samples: str, engine: str, role: str = "") -> dict:
        """The best and worst of each prompt's samples, by ``engine`` at temperature 0."""
        s = self.cfg.synth.sampling

        def build() -> dict:
            kw = {"seed": self.cfg.run.seed, "max_chars": s.max_field_chars}
            params = self.params(s.judge_max_tokens, greedy=True)
            reads = self.reads(samples)
            parse = speed.parse_judgments
            return self.generate_from(
                "judgments", engine, reads, speed.judge_shard, kw, JUDGMENTS, parse, params
            )

        return self.step("judgments", build, (samples,), engine, role)

    def pairs(self, samples: str, judged: bool, fallback: bool = True, empty: str = "") -> dict:
        """Preference pairs (best, worst) of each prompt: the judge's verdict where it parsed, else the
        rule-based score with ``fallback``. ``empty``: no pair is an error, with this advice."""
        reads = (samples, "judgments") if judged else (samples,)

        def build() -> dict:
            out = self.out / "pairs"
            m = self.derive("pairs", reads, PREFERENCE_PAIRS, speed.pairs_shard, {"fallback": fallback})
            if empty and m["num_rows"] == 0:
                (out / MANIFEST).unlink()
                raise ConfigError(
                    f"{self.stage}/pairs: no preference pair from {m['rows_in']} prompts "
                    f"(dropped: {m['dropped']}); {empty}"
                )
            return m

        return self.step("pairs", build, reads)

    def drafts(self, samples: str, judged: bool) -> dict:
        """One draft per prompt: the judge's best sample, else the first valid one."""
        reads = (samples, "judgments") if judged else (samples,)
        return self.step(
            "drafts", lambda: self.derive("drafts", reads, GENERATIONS, speed.drafts_shard), reads
        )

    def revise(self, drafts: str, engine: str, role: str = "") -> dict:
        """Each draft in step ``drafts`` rewritten once by ``engine``; a samples step gives its first
        valid sample per prompt as the draft."""
        s = self.cfg.synth.sampling

        def build() -> dict:
            kw = {"seed": self.cfg.run.seed, "max_chars": s.max_field_chars, "pick": drafts != "drafts"}
            params = self.params(s.revise_max_tokens)
            reads = self.reads(drafts)
            parse = speed.parse_revisions
            return self.generate_from(
                "revisions", engine, reads, speed.revise_shard, kw, GENERATIONS, parse, params
            )

        return self.step("revisions", build, (drafts,), engine, role)

    # ------------------------------------------------------------------------------------------
    # Steps made shard by shard from earlier steps (``speed_ray.synth.stage``)

    def reads(self, *names: str) -> list[tuple[Path, pa.Schema]]:
        """The folders and schemas of steps ``names``, read shard by shard."""
        return [(self.out / n, STEP_SCHEMAS.get(n, GENERATIONS)) for n in names]

    def derive(
        self, name: str, reads: Iterable[str], schema: pa.Schema, fn: Callable, kw: dict | None = None
    ) -> dict:
        """Step ``name``: ``fn`` over each shard of the steps ``reads``, on the workers."""
        return derive_step(self.cfg, self.out / name, schema, self.reads(*reads), fn, kw)

    def generate_from(
        self,
        name: str,
        engine: str,
        reads: list,
        requests: Callable,
        kw: dict,
        schema: pa.Schema,
        parse: Callable,
        params: dict,
    ) -> dict:
        """Step ``name``: the ``requests`` made from each shard of ``reads`` through ``engine``'s pool,
        parsed by ``parse``."""
        eng = engine_at(self.cfg, engine)
        return generate_derived(
            self.cfg, eng, self.out / name, schema, reads, requests, kw, params, parse, self.generator
        )


SHARD_BY_SHARD = ("judgments", "pairs", "drafts", "revisions", "examples", "train")
"""The steps made shard by shard from the steps they read."""

STEP_SCHEMAS = {"tasks": TASKS, "judgments": JUDGMENTS, "pairs": PREFERENCE_PAIRS}
"""The schema of each step folder the loop reads; every other one (samples, drafts, revisions) holds
GENERATIONS rows."""
