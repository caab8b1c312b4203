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

import json
import logging
import time
from pathlib import Path
from typing import Any

from speed_ray.align.config import DATA_COLUMNS as ALIGN_DATA_COLUMNS
from speed_ray.align.config import AlignTrainConfig
from speed_ray.config import SpeedRayConfig
from speed_ray.io.fingerprint import path_hash
from speed_ray.io.schemas import (
    GENERATIONS,
    PREFERENCE_PAIRS,
    cast_rows,
    read_stage,
    write_json_atomic,
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


def loop(cfg: SpeedRayConfig) -> Loop:
    return Loop(cfg, "align", KEYS)


def user_fingerprint(cfg: SpeedRayConfig, name: str) -> dict[str, Any]:
    """A step the user's own file replaces depends on that file alone."""
    key = USER_KEYS[name]
    return cfg.fingerprint((key,), {key: path_hash(getattr(cfg.align, key.removeprefix("align.")))})


def train_state(cfg: SpeedRayConfig, name: str) -> tuple[Path, ...]:
    """What a training step leaves besides its model: Ray Train's checkpoints and the data folder
    with TRL's caches (DPO's reference log-probabilities come from the junior)."""
    return (cfg.run_dir / "ray" / f"align-{name}", cfg.run_dir / "align" / f"{name}.data")


def run(cfg: SpeedRayConfig) -> dict:
    lp = loop(cfg)

    def trained(name: str, title: str, reads: tuple[str, ...]) -> dict:
        fp = lp.fingerprint(name, reads)
        build = lambda: train_step(cfg, name, lp.out)  # noqa: E731
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


# ----------------------------------------------------------------------------------------------
# Training


# Per trained model: its base, its training data (step folder) and the TRL trainer.
TRAINED = {
    "junior": ("sft", "seed"),
    "senior": ("dpo", "pairs"),
    "revisor": ("sft", "revisions"),
}


def training_rows(out: Path, name: str) -> list[dict[str, Any]]:
    """The rows a model trains on: the valid teacher outputs, or the preference pairs as they are
    stored (TRL's conversational prompt, chosen and rejected)."""
    kind, data = TRAINED[name]
    if kind == "dpo":
        return read_stage(out / data, PREFERENCE_PAIRS).select(["prompt", "chosen", "rejected"]).to_pylist()
    rows = read_stage(out / data, GENERATIONS).to_pylist()
    return [{"messages": r["messages"], "completion": r["raw"]} for r in rows if r["error"] is None]


def train_step(cfg: SpeedRayConfig, name: str, out: Path) -> dict:
    """Train one model of the loop under Ray Train; write its folder, model card and manifest."""
    from speed_ray.align.train import long_prompts, sft_rows, train_loop
    from speed_ray.io.models import resolve_model
    from speed_ray.ray_utils import train

    ac, res = cfg.align, cfg.align.resources
    tc: AlignTrainConfig = getattr(ac, name)
    kind, data = TRAINED[name]
    started = time.time()
    # The junior is the senior's starting point and its DPO reference; the revisor starts from the base.
    base = str(out / "junior") if name == "senior" else resolve_model(ac.model)
    read = training_rows(out, name)
    rows = read if kind == "dpo" else sft_rows(read)
    too_long = set(long_prompts(base, rows, ac.max_length))
    rows = [r for i, r in enumerate(rows) if i not in too_long]
    dropped = {f"prompt of {ac.max_length}+ tokens": len(too_long)} if too_long else {}
    need = res.workers * tc.batch_size
    if len(rows) < need:
        raise ConfigError(
            f"align/{name}: {len(rows)} usable training rows in align/{data} ({len(read)} read, dropped: "
            f"{dropped or 'none'}), expected at least align.resources.workers x align.{name}.batch_size "
            f"= {need}; raise align.num_topics or align.max_length"
        )
    data_dir = out / f"{name}.data"
    write_dataset(rows, data_dir)
    loop_config = {
        "kind": kind,
        "model": base,
        "data_dir": str(data_dir),
        "steps": tc.steps,
        "learning_rate": tc.learning_rate,
        "batch_size": tc.batch_size,
        "max_length": ac.max_length,
        "beta": ac.beta,
        "precompute_ref_log_probs": ac.precompute_ref_log_probs,
        "finetune": ac.finetune,
        "lora_r": ac.lora_r,
        "lora_alpha": ac.lora_alpha,
        "lora_dropout": ac.lora_dropout,
        "lora_target_modules": ac.lora_target_modules,
        "gradient_checkpointing": ac.gradient_checkpointing,
        "deepspeed_stage": ac.deepspeed_stage,
        "save_steps": ac.save_steps,
        "use_gpu": res.use_gpu,
        "cpus_per_worker": res.cpus_per_worker,
        "seed": cfg.run.seed,
        "generation": generation_defaults(cfg),
        "trl": ac.trl,
    }
    target = out / name
    metrics = train(
        cfg, f"align-{name}", train_loop, loop_config, res, None, target, max_failures=ac.max_failures
    )
    manifest = {
        "kind": kind,
        "base_model": base,
        "data": f"align/{data}",
        "rows_in": len(read),
        "rows_used": len(rows),
        "dropped": dropped,
        "steps": metrics["steps"],
        "resumed_from_step": metrics["resumed_from_step"],
        "history": metrics["history"],
        "duration_s": round(time.time() - started, 2),
        "hyperparameters": {
            "learning_rate": tc.learning_rate,
            "batch_size_per_worker": tc.batch_size,
            "workers": res.workers,
            "global_batch": need,
            "max_length": ac.max_length,
            "finetune": ac.finetune,
            **(
                {"lora": {"r": ac.lora_r, "alpha": ac.lora_alpha, "dropout": ac.lora_dropout, "merged": True}}
                if ac.finetune == "lora"
                else {}
            ),
            **(
                {"beta": ac.beta, "precompute_ref_log_probs": ac.precompute_ref_log_probs}
                if kind == "dpo"
                else {}
            ),
            "deepspeed_stage": ac.deepspeed_stage,
        },
    }
    (target / "README.md").write_text(model_card(cfg, name, manifest))
    write_json_atomic(target / "_manifest.json", manifest)
    losses = [round(h["loss"], 4) for h in manifest["history"]]
    logger.info(f"align/{name}: {manifest['steps']} steps on {len(rows)} rows, losses {losses}")
    return manifest


def write_dataset(rows: list[dict[str, Any]], path: Path) -> None:
    """A ``datasets`` folder the workers load; TRL caches tokenized rows (and DPO's reference
    log-probabilities) beside it, so a restarted worker does not redo them. Rewritten only when the
    rows change, which would invalidate those caches."""
    import shutil

    from datasets import Dataset

    digest = speed.stable_id(json.dumps(rows, sort_keys=True))
    stamp = path / "_rows.sha1"
    if stamp.is_file() and stamp.read_text() == digest:
        return
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    Dataset.from_list(rows).save_to_disk(str(tmp))
    (tmp / "_rows.sha1").write_text(digest)
    shutil.rmtree(path, ignore_errors=True)
    tmp.rename(path)


def generation_defaults(cfg: SpeedRayConfig) -> dict[str, Any]:
    """The sampling the synth stage uses, saved as the exported model's ``generation_config.json``."""
    s = cfg.synth.sampling
    return {"do_sample": True, "temperature": s.temperature, "top_p": s.top_p, "max_new_tokens": s.max_tokens}


ROLES = {
    "junior": "SPEED junior generator (π^Jr): writes embedding training examples for a task prompt, "
    "fine-tuned on the teacher's own examples",
    "senior": "SPEED senior generator (π^Sr): the junior aligned by DPO toward the outputs the teacher "
    "judged best",
    "revisor": "SPEED data revisor (π^Re): critiques an example against its prompt and rewrites it, "
    "fine-tuned on the teacher's revisions",
}


def model_card(cfg: SpeedRayConfig, name: str, manifest: dict[str, Any]) -> str:
    """README.md of an exported model: what it is, its base, data, hyperparameters and training scores."""
    h = manifest["history"]
    first, last = (h[0], h[-1]) if h else ({}, {})
    scores = [
        f"- loss: {first.get('loss', float('nan')):.4f} at step 1 -> {last.get('loss', float('nan')):.4f} "
        f"at step {manifest['steps']}"
    ]
    if manifest["kind"] == "dpo" and "rewards/accuracies" in last:
        scores.append(
            f"- DPO reward accuracy (last step): {last['rewards/accuracies']:.3f}, "
            f"reward margin: {last.get('rewards/margins', float('nan')):.4f}"
        )
    serve = {
        "senior": "synth:\n  engine: {model: run:align/senior}",
        "revisor": "synth:\n  reviser: {model: run:align/revisor}",
        "junior": "align:\n  generator: {model: run:align/junior}",
    }[name]
    return "\n".join(
        [
            f"# speed-ray `{name}` ({cfg.run.name})",
            "",
            ROLES[name] + ".",
            "",
            f"- base model: `{manifest['base_model']}`",
            f"- training data: `{manifest['data']}`, {manifest['rows_in']} rows "
            f"(teacher: {cfg.align.teacher.kind} `{cfg.align.teacher.model}`)",
            f"- trainer: TRL {manifest['kind'].upper()} under Ray Train, {manifest['steps']} steps",
            f"- hyperparameters: `{json.dumps(manifest['hyperparameters'])}`",
            "- weights: LoRA merged into the base; loads in transformers and vLLM; the tokenizer keeps its "
            "chat template, and `generation_config.json` holds the synth stage's sampling",
            "",
            "## Training scores",
            "",
            *scores,
            "",
            "## Use",
            "",
            "In a speed-ray config:",
            "",
            "```yaml",
            serve,
            "```",
            "",
        ]
    )
