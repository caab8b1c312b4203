"""align: preference pairs -> junior (SFT, LoRA) -> senior (DPO against the frozen junior), with TRL
inside Ray Train.

Consumes ``<run>/synth/pairs`` (judged, or rule-scored without a judge); produces under ``<run>/align/``
the merged model folders ``junior/`` and ``senior/`` that the vLLM engine loads directly, each
with a ``_manifest.json`` (base model, data, steps, losses).
"""

from __future__ import annotations

import time
from pathlib import Path

from speed_ray.config import ConfigError, SpeedRayConfig
from speed_ray.models import resolve_model
from speed_ray.pipeline.common import log, step
from speed_ray.schemas import PREFERENCE_PAIRS, read_stage, write_json_atomic


def run(cfg: SpeedRayConfig) -> dict:
    out = cfg.run_dir / "align"
    n_pairs = read_stage(cfg.run_dir / "synth" / "pairs", PREFERENCE_PAIRS).num_rows
    manifests: dict[str, dict] = {}
    need = cfg.align.resources.workers
    if n_pairs < need:
        raise ConfigError(
            f"align: {n_pairs} preference pairs from synth, expected at least align.resources.workers={need}; "
            "raise synth.num_topics or synth.sampling.samples_per_prompt"
        )
    base = resolve_model(cfg.align.model)
    manifests["junior"] = step(
        out / "junior", "align/junior (SFT)", lambda: _train(cfg, "sft", base, out / "junior")
    )
    manifests["senior"] = step(
        out / "senior", "align/senior (DPO)", lambda: _train(cfg, "dpo", str(out / "junior"), out / "senior")
    )
    return manifests


def _train(cfg: SpeedRayConfig, kind: str, model: str, target: Path) -> dict:
    from speed_ray.ray_utils import train
    from speed_ray.train.align import train_loop

    ac, res = cfg.align, cfg.align.resources
    started = time.time()
    pairs = read_stage(cfg.run_dir / "synth" / "pairs", PREFERENCE_PAIRS)
    loop_config = {
        "kind": kind,
        "model": model,
        "steps": ac.sft_steps if kind == "sft" else ac.dpo_steps,
        "learning_rate": ac.sft_learning_rate if kind == "sft" else ac.dpo_learning_rate,
        "batch_size": ac.batch_size,
        "max_length": ac.max_length,
        "beta": ac.beta,
        "lora_r": ac.lora_r,
        "lora_alpha": ac.lora_alpha,
        "lora_dropout": ac.lora_dropout,
        "use_gpu": res.use_gpu,
        "cpus_per_worker": res.cpus_per_worker,
        "seed": cfg.run.seed,
        "trl": ac.trl,
    }
    metrics = train(cfg, f"align-{kind}", train_loop, loop_config, res, pairs, target)
    manifest = {
        "kind": kind,
        "base_model": model,
        "pairs": pairs.num_rows,
        "steps": metrics["steps"],
        "history": metrics["history"],
        "duration_s": round(time.time() - started, 2),
        "lora": {"r": ac.lora_r, "alpha": ac.lora_alpha, "dropout": ac.lora_dropout, "merged": True},
    }
    write_json_atomic(target / "_manifest.json", manifest)
    log(
        f"align/{kind}: {manifest['steps']} steps, losses {[round(h['loss'], 4) for h in manifest['history']]}"
    )
    return manifest
