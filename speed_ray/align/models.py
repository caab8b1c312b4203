"""align's trained models, driver side: the junior (SFT on the seed data), the senior (DPO on the
preference pairs, from the junior) and the revisor (SFT on the revisions, from the base model).

``train_step`` reads a model's rows from its data step, writes them as a ``datasets`` folder, trains
under Ray Train (``speed_ray.align.train`` runs on the workers) and writes the model folder's card
(README.md) and manifest.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed_ray.config import SpeedRayConfig
from speed_ray.io.schemas import GENERATIONS, PREFERENCE_PAIRS, read_stage, write_json_atomic
from speed_ray.io.settings import ConfigError
from speed_ray.synth import speed

if TYPE_CHECKING:
    from speed_ray.align.train import AlignTrainSettings

logger = logging.getLogger(__name__)


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


def usable_rows(
    cfg: SpeedRayConfig, name: str, out: Path, base: str
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """(rows read, rows to train on, dropped by reason): the model's rows in TRL's form, without those
    whose prompt alone takes ``align.max_length`` tokens; at least one global batch of them."""
    from speed_ray.align.train import long_prompts, sft_rows

    ac, (kind, data) = cfg.align, TRAINED[name]
    read = training_rows(out, name)
    rows = read if kind == "dpo" else sft_rows(read)
    too_long = set(long_prompts(base, rows, ac.max_length))
    rows = [r for i, r in enumerate(rows) if i not in too_long]
    dropped = {f"prompt of {ac.max_length}+ tokens": len(too_long)} if too_long else {}
    need = ac.resources.workers * getattr(ac, name).batch_size
    if len(rows) < need:
        raise ConfigError(
            f"align/{name}: {len(rows)} usable training rows in align/{data} ({len(read)} read, dropped: "
            f"{dropped or 'none'}), expected at least align.resources.workers x align.{name}.batch_size "
            f"= {need}; raise align.num_topics or align.max_length"
        )
    return read, rows, dropped


def train_step(cfg: SpeedRayConfig, name: str, out: Path) -> dict:
    """Train one model of the loop under Ray Train; write its folder, model card and manifest."""
    from speed_ray.align.train import AlignTrainSettings, train_loop
    from speed_ray.io.models import resolve_model
    from speed_ray.ray_utils import train

    ac, (kind, data) = cfg.align, TRAINED[name]
    started = time.time()
    # The junior is the senior's starting point and its DPO reference; the revisor starts from the base.
    base = str(out / "junior") if name == "senior" else resolve_model(ac.model)
    read, rows, dropped = usable_rows(cfg, name, out, base)
    data_dir = out / f"{name}.data"
    write_dataset(rows, data_dir)
    settings = AlignTrainSettings(
        align=ac,
        train=getattr(ac, name),
        kind=kind,
        model_path=base,
        data_dir=str(data_dir),
        seed=cfg.run.seed,
        generation=generation_defaults(cfg),
    )
    target = out / name
    metrics = train(cfg, f"align-{name}", train_loop, settings, ac.resources, None, target, ac.max_failures)
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
        "hyperparameters": hyperparameters(settings),
    }
    (target / "README.md").write_text(model_card(cfg, name, manifest))
    write_json_atomic(target / "_manifest.json", manifest)
    losses = [round(h["loss"], 4) for h in manifest["history"]]
    logger.info(f"align/{name}: {manifest['steps']} steps on {len(rows)} rows, losses {losses}")
    return manifest


def hyperparameters(s: AlignTrainSettings) -> dict[str, Any]:
    """The training settings a model's manifest and card list."""
    ac, workers = s.align, s.align.resources.workers
    lora = {"lora": {"r": ac.lora_r, "alpha": ac.lora_alpha, "dropout": ac.lora_dropout, "merged": True}}
    dpo = {"beta": ac.beta, "precompute_ref_log_probs": ac.precompute_ref_log_probs}
    return {
        "learning_rate": s.train.learning_rate,
        "batch_size_per_worker": s.train.batch_size,
        "workers": workers,
        "global_batch": workers * s.train.batch_size,
        "max_length": ac.max_length,
        "finetune": ac.finetune,
        **(lora if ac.finetune == "lora" else {}),
        **(dpo if s.kind == "dpo" else {}),
        "deepspeed_stage": ac.deepspeed_stage,
    }


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


def training_scores(manifest: dict[str, Any]) -> list[str]:
    """The model card's lines on the first and last logged step."""
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
    return scores


def model_card(cfg: SpeedRayConfig, name: str, manifest: dict[str, Any]) -> str:
    """README.md of an exported model: what it is, its base, data, hyperparameters and training scores."""
    scores = training_scores(manifest)
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
