"""The model as a worker trains it: built with LoRA, frozen blocks and gradient checkpointing as
configured, then wrapped in DDP (Ray's ``prepare_model``) or a DeepSpeed engine (ZeRO)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from speed_ray.embed.config import EmbedConfig

if TYPE_CHECKING:
    from speed_ray.embed.train import EmbedTrainSettings


def is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def unwrap(model):
    """The SentenceTransformer inside a DDP or DeepSpeed wrapper."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.module if ddp or is_deepspeed(model) else model


def base_model(s: EmbedTrainSettings):
    """A fresh SentenceTransformer of the model to fine-tune (pooling, length and dropout as set)."""
    from speed_ray.embed.model import build_model

    ec = s.embed
    return build_model(s.model_path, ec.pooling, ec.max_seq_length, dropout=ec.dropout)


def setup_model(s: EmbedTrainSettings):
    """The SentenceTransformer with LoRA / frozen blocks / gradient checkpointing as configured;
    returns (model, frozen or None)."""
    from speed_ray.embed.model import FrozenBlocks, set_prompts

    ec = s.embed
    model = base_model(s)
    model.train()  # dropout on, as in E5/SPEED and the crops paper
    set_prompts(model, ec.query_instruction, ec.pooling)
    if ec.gradient_checkpointing:
        model[0].auto_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    frozen = FrozenBlocks(model, ec.train_last_blocks) if ec.train_last_blocks else None
    if s.finetune == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        configured_lora(model, ec)
    return model, frozen


def configured_lora(model, ec: EmbedConfig) -> None:
    """The LoRA adapter of ``ec`` (in the last ``train_last_blocks`` blocks when set): the same for
    training and for the fresh copy the export loads the trained weights into."""
    from speed_ray.embed.model import add_lora

    add_lora(model, ec.lora_r, ec.lora_alpha, ec.lora_dropout, ec.lora_target_modules, ec.train_last_blocks)


def deepspeed_config(ec: EmbedConfig) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": ec.batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": ec.deepspeed_stage},
        "gradient_clipping": ec.max_grad_norm,
        "bf16": {"enabled": ec.precision == "bf16"},
        "fp16": {"enabled": ec.precision == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def wrap(model, ec: EmbedConfig):
    """(model, optimizer, scheduler): DDP via Ray's prepare_model, or a DeepSpeed engine (ZeRO)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW (one kernel for all tensors) where torch has it, as transformers' Trainer uses
    optimizer = torch.optim.AdamW(
        params,
        lr=ec.learning_rate,
        weight_decay=ec.weight_decay,
        fused=True if ec.deepspeed_stage == 0 else None,
    )

    def schedule(opt):
        return get_scheduler(ec.lr_schedule, opt, ec.warmup_steps, ec.steps)

    if ec.deepspeed_stage:
        import deepspeed
        from ray.train.torch import get_device

        device = get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(ec)
        )
        return engine, optimizer, scheduler
    from ray.train.torch import prepare_model

    # BERT-style checkpoints carry a pooler head that sentence-transformers never uses.
    model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    return model, optimizer, schedule(optimizer)
