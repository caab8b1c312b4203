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
``run:align/revisor``. The tasks, samples, judge, pairs and revision steps are synth's loop
(``speed_ray.synth.loop``), run with the teacher and the junior; training steps go through Ray Train
(``speed_ray.align.train``), which checkpoints and resumes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from speed_ray.align import models
from speed_ray.align.config import DATA_COLUMNS as ALIGN_DATA_COLUMNS
from speed_ray.config import SpeedRayConfig
from speed_ray.io.fingerprint import path_hash
from speed_ray.io.schemas import (
    GENERATIONS,
    PREFERENCE_PAIRS,
    cast_rows,
    write_stage,
)
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import step
from speed_ray.synth import speed
from speed_ray.synth.loop import Loop

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
        *SAMPLING,
    ),
    "seed": (*PROMPTS, "align.examples_per_task", "synth.sampling.max_tokens", *SAMPLING, "align.seed_data"),
    "root": (
        *PROMPTS,
        "align.examples_per_task",
        "align.samples_per_prompt",
        "synth.sampling.max_tokens",
        *SAMPLING,
    ),
    "judgments": (*PROMPTS, "synth.sampling.judge_max_tokens"),
    "pairs": ("align.without_verdict", "align.pairs_data"),
    "revisions": (*PROMPTS, "synth.sampling.revise_max_tokens", *SAMPLING, "align.revision_data"),
    "junior": (*TRAINING, "align.model", "align.junior"),
    "senior": (*TRAINING, "align.senior", "align.beta"),  # starts from the junior
    "revisor": (*TRAINING, "align.model", "align.revisor"),
}
# A step the user's own file replaces depends on that file alone.
USER_KEYS = {"seed": "align.seed_data", "pairs": "align.pairs_data", "revisions": "align.revision_data"}


def user_fingerprint(cfg: SpeedRayConfig, name: str) -> dict[str, Any]:
    """A step the user's own file replaces depends on that file alone."""
    key = USER_KEYS[name]
    return cfg.fingerprint((key,), {key: path_hash(getattr(cfg.align, key.removeprefix("align.")))})


def train_state(cfg: SpeedRayConfig, name: str) -> tuple[Path, ...]:
    """What a training step leaves besides its model: Ray Train's checkpoints and the data folder
    with TRL's caches (DPO's reference log-probabilities come from the junior)."""
    return (cfg.run_dir / "ray" / f"align-{name}", cfg.run_dir / "align" / f"{name}.data")


def run(cfg: SpeedRayConfig) -> dict:
    lp = Loop(cfg, "align", KEYS)

    def trained(name: str, title: str, reads: tuple[str, ...]) -> dict:
        fp = lp.fingerprint(name, reads)
        build = lambda: models.train_step(cfg, name, lp.out)  # noqa: E731
        return step(lp.out / name, f"align/{name} ({title})", build, fp, train_state(cfg, name))

    m = seed_steps(cfg, lp)
    m["junior"] = trained("junior", "SFT", ("seed",))
    m |= pair_steps(cfg, lp)
    m["senior"] = trained("senior", "DPO", ("junior", "pairs"))
    m |= revision_steps(cfg, lp)
    m["revisor"] = trained("revisor", "SFT", ("revisions",))
    return m


def user_data(
    cfg: SpeedRayConfig, lp: Loop, name: str, needs: str = "", why: str = ""
) -> dict[str, Any] | None:
    """Step ``name`` from the user's own file, when the config names one. Otherwise the loop makes
    it from step ``needs``, which an earlier user file may have skipped: ``why`` says so."""
    if getattr(cfg.align, USER_KEYS[name].removeprefix("align.")) is None:
        if needs and not (lp.out / needs).is_dir():
            raise ConfigError(f"{USER_KEYS[name]}: {why}")
        return None
    build = lambda: user_step(cfg, lp.out, name)  # noqa: E731
    return {name: step(lp.out / name, f"align/{name} (your data)", build, user_fingerprint(cfg, name))}


def seed_steps(cfg: SpeedRayConfig, lp: Loop) -> dict[str, Any]:
    """tasks -> seed: the teacher's own examples, the junior's SFT data (or the user's file)."""
    ac, sc = cfg.align, cfg.synth
    mine = user_data(cfg, lp, "seed")
    if mine is not None:
        return mine
    try:
        seed = speed.stable_seed(cfg.run.seed, "align")
        topics = speed.load_topics(
            sc.taxonomy.path, sc.taxonomy.topics, ac.num_topics, seed, key="align.num_topics"
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger.info(f"align: {len(topics)} topics, teacher {ac.teacher.kind}:{ac.teacher.model}, base {ac.model}")
    return {
        "tasks": lp.tasks(topics, "align.teacher", "teacher"),
        "seed": lp.samples("seed", "align.teacher", ac.examples_per_task, 1, "teacher"),
    }


def pair_steps(cfg: SpeedRayConfig, lp: Loop) -> dict[str, Any]:
    """root -> judgments -> pairs: the junior's k outputs per prompt ranked by the teacher (D_DPO)."""
    ac = cfg.align
    why = (
        "the junior's prompts come from align/tasks, which align.seed_data skips; "
        "give align.pairs_data too (or drop align.seed_data)"
    )
    mine = user_data(cfg, lp, "pairs", "tasks", why)
    if mine is not None:
        return mine
    advice = "raise align.num_topics, or set align.without_verdict: rule for a weak judge"
    return {
        "root": lp.samples(
            "root", "align.generator", ac.examples_per_task, ac.samples_per_prompt, "junior samples"
        ),
        "judgments": lp.judge("root", "align.teacher", "teacher"),
        "pairs": lp.pairs("root", judged=True, fallback=ac.without_verdict == "rule", empty=advice),
    }


def revision_steps(cfg: SpeedRayConfig, lp: Loop) -> dict[str, Any]:
    """revisions: the teacher's critique and rewrite of one junior output per prompt (D_re)."""
    why = (
        "revisions rewrite the junior's outputs in align/root, which align.pairs_data skips; "
        "give align.revision_data too"
    )
    mine = user_data(cfg, lp, "revisions", "root", why)
    return mine if mine is not None else {"revisions": lp.revise("root", "align.teacher", "teacher")}


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
