"""align: SPEED's alignment loop (§3.2), each step resumable, each output recorded in its manifest.

Steps under ``<run>/align/``:
- ``tasks/``: the teacher brainstorms one task per alignment topic (TASKS);
- ``seed/``: the teacher writes one example per prompt: the junior's SFT data (GENERATIONS);
  ``align.seed_data`` replaces it with your own teacher data;
- ``junior/``: the base model fine-tuned (SFT) on the seed data: a merged model folder;
- ``root/``: the junior samples ``samples_per_prompt`` outputs per prompt (GENERATIONS);
- ``judgments/``: the teacher picks the best and worst output per prompt (JUDGMENTS);
- ``pairs/``: (prompt, best, worst) preference pairs in TRL's conversational format; unusable
  verdicts are dropped, by reason (PREFERENCE_PAIRS); ``align.pairs_data`` replaces root, judgments
  and pairs;
- ``senior/``: the junior aligned by DPO on the pairs, against the frozen junior as reference;
- ``revisions/``: the teacher critiques and rewrites one junior output per prompt (GENERATIONS);
  ``align.revision_data`` replaces it;
- ``revisor/``: the base model fine-tuned (SFT) to produce the teacher's critique and revision.

The senior and revisor folders load in vLLM; synth uses them as ``run:align/senior`` and
``run:align/revisor``. Model-calling steps go through ``speed_ray.synth.driver.generate_step``
(resumable shards, token and call accounting); training steps through Ray Train
(``speed_ray.align.models``, whose workers run ``speed_ray.align.train``), which checkpoints and
resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from speed_ray.align.config import DATA_COLUMNS as ALIGN_DATA_COLUMNS
from speed_ray.align.models import train_step
from speed_ray.config import SpeedRayConfig
from speed_ray.io.fingerprint import output_hash, path_hash, run_model_inputs
from speed_ray.io.schemas import (
    GENERATIONS,
    JUDGMENTS,
    PREFERENCE_PAIRS,
    TASKS,
    cast_rows,
    read_manifest,
    read_stage,
    write_stage,
)
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import step
from speed_ray.synth import speed
from speed_ray.synth.driver import generate_step, sampling_params

logger = logging.getLogger(__name__)

# SPEED §4.5: teacher calls behind each trained model (seed data, judgments, revisions).
PAPER_CALLS = {"seed": 25_000, "judgments": 10_000, "revisions": 10_000}

# What each step's output depends on (``speed_ray.io.fingerprint``): config keys, as dotted prefixes,
# besides the outputs of the steps it reads (named where it runs). Prompts and sampling are synth's.
SAMPLING = ("synth.sampling.temperature", "synth.sampling.top_p")
PROMPTS = ("run.seed", "synth.sampling.max_field_chars")
TRAINING = (
    "run.seed",
    "align.max_length",
    "align.finetune",
    "align.lora_r",
    "align.lora_alpha",
    "align.lora_dropout",
    "align.lora_target_modules",
    "align.deepspeed_stage",
    "align.resources.workers",  # workers x batch_size is the global batch
    "align.trl",
    "synth.sampling.max_tokens",  # with SAMPLING: the exported generation_config.json
    *SAMPLING,
)
KEYS = {
    "tasks": (
        *PROMPTS,
        "synth.taxonomy",
        "align.num_topics",
        "synth.mix",
        "synth.sampling.brainstorm_max_tokens",
        "align.teacher",
        *SAMPLING,
    ),
    "seed": (*PROMPTS, "align.examples_per_task", "synth.sampling.max_tokens", "align.teacher", *SAMPLING),
    "root": (
        *PROMPTS,
        "align.examples_per_task",
        "align.samples_per_prompt",
        "synth.sampling.max_tokens",
        "align.generator",
        *SAMPLING,
    ),
    "judgments": (*PROMPTS, "synth.sampling.judge_max_tokens", "synth.sampling.top_p", "align.teacher"),
    "pairs": ("align.without_verdict",),
    "revisions": (*PROMPTS, "synth.sampling.revise_max_tokens", "align.teacher", *SAMPLING),
    "junior": (*TRAINING, "align.model", "align.junior"),
    "senior": (*TRAINING, "align.senior", "align.beta"),  # starts from the junior
    "revisor": (*TRAINING, "align.model", "align.revisor"),
}
# A step the user's own file replaces depends on that file alone.
USER_KEYS = {"seed": "align.seed_data", "pairs": "align.pairs_data", "revisions": "align.revision_data"}


def fingerprint(cfg: SpeedRayConfig, name: str, reads: tuple[str, ...] = ()) -> dict[str, Any]:
    """Step ``name``'s fingerprint: its ``KEYS`` (or its user file), the outputs of the steps it
    ``reads`` and the models of this run it generates with."""
    out, ac = cfg.run_dir / "align", cfg.align
    user_key = USER_KEYS.get(name)
    user_file = getattr(ac, user_key.removeprefix("align.")) if user_key else None
    if user_key and user_file is not None:
        return cfg.fingerprint((user_key,), {user_key: path_hash(user_file)})
    inputs = {f"align/{r}": output_hash(read_manifest(out / r)) for r in reads}
    if name == "root":
        inputs |= run_model_inputs([ac.generator.model], cfg.run_dir)
    tax = cfg.synth.taxonomy
    if name == "tasks" and tax.path is not None and not tax.topics:
        inputs["synth.taxonomy.path"] = path_hash(tax.path)  # the file's topics
    keys = (*KEYS[name], *([user_key] if user_key else []))  # null: switching to a file shows
    return cfg.fingerprint(keys, inputs)


def train_state(cfg: SpeedRayConfig, name: str) -> tuple[Path, ...]:
    """What a training step leaves besides its model: Ray Train's checkpoints and the data folder
    with TRL's caches (DPO's reference log-probabilities come from the junior)."""
    return (cfg.run_dir / "ray" / f"align-{name}", cfg.run_dir / "align" / f"{name}.data")


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "align"
    m: dict[str, Any] = {}

    def trained(name: str, title: str, reads: tuple[str, ...]) -> dict:
        return step(
            out / name,
            f"align/{name} ({title})",
            lambda: train_step(cfg, name, out),
            fingerprint(cfg, name, reads),
            train_state(cfg, name),
        )

    m |= seed_steps(cfg, out)
    m["junior"] = trained("junior", "SFT", ("seed",))
    m |= pair_steps(cfg, out)
    m["senior"] = trained("senior", "DPO", ("junior", "pairs"))
    m |= revision_steps(cfg, out)
    m["revisor"] = trained("revisor", "SFT", ("revisions",))
    return m


def teacher_step(cfg: SpeedRayConfig, name: str, out: Path, rows, schema, parse, max_tokens, **kw) -> dict:
    """A step whose rows go to the teacher (one output per row)."""
    s = cfg.synth.sampling
    temperature = 0.0 if name == "judgments" else s.temperature  # SPEED App. B: the judge at T=0
    params = sampling_params(max_tokens, temperature, s.top_p, 1)
    return generate_step(cfg, cfg.align.teacher, out / name, schema, rows, params, parse, **kw)


def prompts_rows(cfg: SpeedRayConfig, out: Path) -> list[dict[str, Any]]:
    """The alignment prompts: one synthesis prompt per valid task (``examples_per_task`` each)."""
    tasks = read_stage(out / "tasks", TASKS).to_pylist()
    return speed.example_requests(
        tasks, cfg.run.seed, cfg.synth.sampling.max_field_chars, cfg.align.examples_per_task
    )


def user_data_step(cfg: SpeedRayConfig, out: Path, name: str) -> dict[str, Any]:
    """Step ``name`` made from the user's own file (``USER_KEYS``) instead of by the teacher."""
    return {
        name: step(
            out / name, f"align/{name} (your data)", lambda: user_step(cfg, out, name), fingerprint(cfg, name)
        )
    }


def alignment_topics(cfg: SpeedRayConfig) -> list[str]:
    """The ``align.num_topics`` topics of the alignment tasks, a seeded draw from synth's taxonomy."""
    ac, tax, seed = cfg.align, cfg.synth.taxonomy, speed.stable_seed(cfg.run.seed, "align")
    try:
        topics = speed.load_topics(tax.path, tax.topics, ac.num_topics, seed, key="align.num_topics")
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger.info(f"align: {len(topics)} topics, teacher {ac.teacher.kind}:{ac.teacher.model}, base {ac.model}")
    return topics


def seed_steps(cfg: SpeedRayConfig, out: Path) -> dict[str, Any]:
    """tasks -> seed: the teacher's own examples, the junior's SFT data (or the user's file)."""
    ac, sc, seed = cfg.align, cfg.synth, cfg.run.seed
    if ac.seed_data is not None:
        return user_data_step(cfg, out, "seed")
    topics = alignment_topics(cfg)

    def tasks() -> dict:
        rows = speed.task_requests(topics, sc.mix, seed, sc.sampling.max_field_chars)
        return teacher_step(
            cfg,
            "tasks",
            out,
            rows,
            TASKS,
            speed.parse_tasks,
            sc.sampling.brainstorm_max_tokens,
            ready=speed.is_sts,
            ready_parse=speed.sts_tasks,
        )

    def seed_data() -> dict:
        rows = prompts_rows(cfg, out)
        return teacher_step(
            cfg, "seed", out, rows, GENERATIONS, speed.parse_generations, sc.sampling.max_tokens
        )

    tasks_done = step(out / "tasks", "align/tasks (teacher)", tasks, fingerprint(cfg, "tasks"))
    return {
        "tasks": tasks_done,
        "seed": step(out / "seed", "align/seed (teacher)", seed_data, fingerprint(cfg, "seed", ("tasks",))),
    }


def pair_steps(cfg: SpeedRayConfig, out: Path) -> dict[str, Any]:
    """root -> judgments -> pairs: the junior's k outputs per prompt ranked by the teacher (D_DPO)."""
    ac, s = cfg.align, cfg.synth.sampling
    if ac.pairs_data is not None:
        return user_data_step(cfg, out, "pairs")
    if not (out / "tasks").is_dir():
        raise ConfigError(
            "align.pairs_data: the junior's prompts come from align/tasks, which align.seed_data skips; "
            "give align.pairs_data too (or drop align.seed_data)"
        )

    def root() -> dict:
        params = sampling_params(s.max_tokens, s.temperature, s.top_p, ac.samples_per_prompt)
        rows = prompts_rows(cfg, out)
        return generate_step(
            cfg, ac.generator, out / "root", GENERATIONS, rows, params, speed.parse_generations
        )

    m = {
        "root": step(out / "root", "align/root (junior samples)", root, fingerprint(cfg, "root", ("tasks",)))
    }
    groups = speed.group_samples(read_stage(out / "root", GENERATIONS))

    def judgments() -> dict:
        rows = speed.judge_requests(groups, cfg.run.seed, s.max_field_chars)
        return teacher_step(cfg, "judgments", out, rows, JUDGMENTS, speed.parse_judgments, s.judge_max_tokens)

    m["judgments"] = step(
        out / "judgments", "align/judgments (teacher)", judgments, fingerprint(cfg, "judgments", ("root",))
    )
    m["pairs"] = step(
        out / "pairs",
        "align/pairs",
        lambda: preference_step(cfg, out, groups),
        fingerprint(cfg, "pairs", ("root", "judgments")),
    )
    return m


def preference_step(cfg: SpeedRayConfig, out: Path, groups) -> dict:
    """pairs: each judged prompt's best and worst output; unusable verdicts dropped, by reason (or, with
    ``align.without_verdict: rule``, scored by rule)."""
    started = time.time()
    table, dropped = speed.preference_pairs(
        groups, read_stage(out / "judgments", JUDGMENTS), fallback=cfg.align.without_verdict == "rule"
    )
    judged = sum(r.startswith("judge: ") for r in table["reason"].to_pylist())
    extra = {
        "rows_in": len(groups),
        "judged": judged,
        "rule_scored": table.num_rows - judged,
        "dropped": dropped,
    }
    if table.num_rows == 0:
        raise ConfigError(
            f"align/pairs: no preference pair from {len(groups)} prompts (dropped: {dropped}); "
            "raise align.num_topics, or set align.without_verdict: rule for a weak judge"
        )
    return write_stage(out / "pairs", [table], PREFERENCE_PAIRS, extra, started)


def revision_steps(cfg: SpeedRayConfig, out: Path) -> dict[str, Any]:
    """revisions: the teacher's critique and rewrite of one junior output per prompt (D_re)."""
    ac, s = cfg.align, cfg.synth.sampling
    if ac.revision_data is not None:
        return user_data_step(cfg, out, "revisions")
    if not (out / "root").is_dir():
        raise ConfigError(
            "align.revision_data: revisions rewrite the junior's outputs in align/root, which "
            "align.pairs_data skips; give align.revision_data too"
        )

    def revisions() -> dict:
        groups = speed.group_samples(read_stage(out / "root", GENERATIONS))
        drafts = speed.pick_drafts(groups).to_pylist()  # the first valid output of each prompt
        rows = speed.revise_requests(drafts, cfg.run.seed, s.max_field_chars)
        return teacher_step(
            cfg, "revisions", out, rows, GENERATIONS, speed.parse_revisions, s.revise_max_tokens
        )

    return {
        "revisions": step(
            out / "revisions",
            "align/revisions (teacher)",
            revisions,
            fingerprint(cfg, "revisions", ("root",)),
        )
    }


# User data replacing a teacher step: file key, columns, schema of the step's folder (preference
# pairs: TRL's conversational columns, read by ``read_preference_rows``).
USER_DATA = {
    "seed": ("seed_data", ALIGN_DATA_COLUMNS["seed_data"], GENERATIONS),
    "pairs": ("pairs_data", ALIGN_DATA_COLUMNS["pairs_data"], PREFERENCE_PAIRS),
    "revisions": ("revision_data", ALIGN_DATA_COLUMNS["revision_data"], GENERATIONS),
}


def user_step(cfg: SpeedRayConfig, out: Path, name: str) -> dict:
    """The user's own rows for a teacher step, checked and stored in the step's schema."""
    from speed_ray.io.data import locate, read_chat_rows, read_preference_rows

    started = time.time()
    key, columns, schema = USER_DATA[name]
    path = locate(getattr(cfg.align, key))
    try:
        rows = read_preference_rows(path) if name == "pairs" else read_chat_rows(path, columns)
    except ValueError as e:
        raise ConfigError(f"align.{key}: {e}") from None
    for n, r in enumerate(rows):
        r["id"] = speed.stable_id("user", name, n)
        if "completion" in r:
            r["raw"] = r.pop("completion")
    if name == "pairs":
        for r in rows:
            r["reason"] = f"user data: {path.name}"
    return write_stage(out / name, [cast_rows(rows, schema)], schema, {"source": str(path)}, started)
