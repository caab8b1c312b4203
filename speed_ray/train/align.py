"""TRL's SFTTrainer and DPOTrainer inside Ray Train, configured rather than forked (STYLE P9).

``train_loop`` runs on every worker: it turns the worker's Ray dataset shard into a ``datasets.Dataset``,
builds the TRL trainer with LoRA, adds Ray's report callback, trains, and (rank 0) reports the merged
model folder as the run's checkpoint, so the driver finds it in Ray's storage on any cluster.
"""

from __future__ import annotations

import json
import tempfile
from typing import Any


def sft_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Junior SFT data: the data prompt and the preferred completion, as a conversation."""
    return [
        {"messages": json.loads(p["messages"]) + [{"role": "assistant", "content": p["chosen"]}]}
        for p in pairs
    ]


def dpo_rows(pairs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Senior DPO data: prompt, chosen (best) and rejected (worst) completions."""
    return [
        {
            "prompt": json.loads(p["messages"]),
            "chosen": [{"role": "assistant", "content": p["chosen"]}],
            "rejected": [{"role": "assistant", "content": p["rejected"]}],
        }
        for p in pairs
    ]


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import AutoTokenizer

    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    shard = ray.train.get_dataset_shard("train")
    rows = list(shard.iter_rows())
    data = Dataset.from_list(sft_rows(rows) if config["kind"] == "sft" else dpo_rows(rows))
    tok = AutoTokenizer.from_pretrained(config["model"])
    common = dict(
        output_dir=tempfile.mkdtemp(prefix="speed-ray-align-"),
        max_steps=config["steps"],
        per_device_train_batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        max_length=config["max_length"],
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=not config["use_gpu"],
        # bf16 only where the hardware has it; fp32 on CPU keeps small-model steps exact.
        bf16=config["use_gpu"] and torch.cuda.is_available() and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=False,
        seed=config["seed"],
        **config["trl"],
    )
    lora = LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules="all-linear",
        task_type="CAUSAL_LM",
    )
    trainer = _build_trainer(config, common, data, tok, lora)
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    trainer.train()
    history = [h for h in trainer.state.log_history if "loss" in h]
    _report_merged(trainer, tok, {"history": history, "steps": trainer.state.global_step})


def _build_trainer(config, common, data, tok, lora):
    if config["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=config["model"],
            args=SFTConfig(**common),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora,
        )
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(beta=config["beta"], **common)
    return DPOTrainer(
        model=config["model"], args=args, train_dataset=data, processing_class=tok, peft_config=lora
    )


def _report_merged(trainer, tok, metrics: dict[str, Any]) -> None:
    """Rank 0 merges LoRA into the weights and reports the folder; every rank must call report."""
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            merged = trainer.model.merge_and_unload()  # trainer.model is the unwrapped PeftModel
            merged.save_pretrained(d)
            tok.save_pretrained(d)
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
