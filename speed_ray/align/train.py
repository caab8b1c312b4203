"""TRL's SFTTrainer and DPOTrainer inside Ray Train, configured rather than forked (STYLE P9).

``build_trainer`` is plain TRL (a test runs it in one process and compares it with the Ray Train run);
``train_loop`` is what every Ray Train worker runs: it loads the step's training data (a ``datasets``
folder the driver wrote, so TRL's tokenization and reference log-probability caches sit beside it and
survive a restart), resumes from the last checkpoint Ray Train holds, trains, and (rank 0) reports
the merged model folder as the final checkpoint. DPO trains on the preference pairs as the align
stage stores them, in TRL's conversational format (TRL applies the chat template itself); SFT rows
come from ``sft_rows``.

Settings arrive as one plain dict (``loop_config`` in ``speed_ray.align.driver``):
``kind`` (sft | dpo), ``model``, ``data_dir``, ``steps``, ``learning_rate``, ``batch_size``,
``max_length``, ``beta``, ``finetune`` (lora | full), ``lora_*``, ``precompute_ref_log_probs``,
``deepspeed_stage``, ``gradient_checkpointing``, ``save_steps``, ``use_gpu``, ``cpus_per_worker``,
``seed``, ``generation`` (saved as ``generation_config.json``) and ``trl`` (extra TRL arguments).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from typing import Any

logger = logging.getLogger(__name__)


def sft_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """SFT data in TRL's conversational prompt-completion form: the loss covers the completion only
    (SPEED Eq. 1 and 3: the NLL of the output given the prompt)."""
    return [
        {
            "prompt": json.loads(r["messages"]),
            "completion": [{"role": "assistant", "content": r["completion"]}],
        }
        for r in rows
    ]


def long_prompts(model: str, rows: list[dict[str, Any]], max_length: int) -> list[int]:
    """Indices of ``rows`` whose chat prompt alone takes ``max_length`` tokens or more: TRL's DPO drops
    them and SFT would train on none of their completion, so the driver counts them first."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lengths = [
        len(
            tok.apply_chat_template(r["prompt"], tokenize=True, add_generation_prompt=True, return_dict=False)
        )
        for r in rows
    ]
    return [i for i, n in enumerate(lengths) if n >= max_length]


def deepspeed_config(stage: int) -> dict[str, Any] | None:
    """A ZeRO config whose sizes come from the trainer ("auto"); torch's AdamW, so no C++ build."""
    if stage == 0:
        return None
    return {
        "zero_optimization": {"stage": stage},
        "train_micro_batch_size_per_gpu": "auto",
        "train_batch_size": "auto",
        "gradient_accumulation_steps": "auto",
        "gradient_clipping": "auto",
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": "auto",
                "weight_decay": "auto",
                "betas": "auto",
                "eps": "auto",
                "torch_adam": True,
            },
        },
        "bf16": {"enabled": "auto"},
    }


def trainer_args(config: dict[str, Any], output_dir: str) -> dict[str, Any]:
    """The TRL config arguments both trainers share."""
    import torch

    gpu = config["use_gpu"] and torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        max_steps=config["steps"],
        per_device_train_batch_size=config["batch_size"],
        learning_rate=config["learning_rate"],
        max_length=config["max_length"],
        logging_steps=1,
        save_strategy="steps" if config["save_steps"] else "no",
        save_steps=config["save_steps"] or 500,
        save_total_limit=1,  # Ray Train keeps its own copies (num_to_keep=2) in the run's storage
        report_to="none",
        use_cpu=not config["use_gpu"],
        # bf16 where the hardware has it; fp32 on CPU keeps small-model steps exact.
        bf16=gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=config["gradient_checkpointing"],
        gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(config["deepspeed_stage"]),
        seed=config["seed"],
        data_seed=config["seed"],
        **config["trl"],
    )


def lora_config(config: dict[str, Any]):
    if config["finetune"] == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=config["lora_r"],
        lora_alpha=config["lora_alpha"],
        lora_dropout=config["lora_dropout"],
        target_modules=config["lora_target_modules"],
        task_type="CAUSAL_LM",
    )


def build_trainer(config: dict[str, Any], data, output_dir: str):
    """The TRL trainer for ``config["kind"]`` on ``data`` (a ``datasets.Dataset``); no Ray in here."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(config["model"])
    common = trainer_args(config, output_dir)
    if config["kind"] == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=config["model"],
            args=SFTConfig(**common),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora_config(config),
        )
    from trl import DPOConfig, DPOTrainer

    # The reference model is the frozen starting point (the junior): with LoRA, TRL gets it by
    # switching the adapter off, with full fine-tuning from a copy. Precomputed, it costs one forward
    # pass per pair for the whole run instead of one per pair per epoch, and TRL caches the result
    # beside the data folder, so a restarted worker reuses it.
    args = DPOConfig(
        beta=config["beta"], precompute_ref_log_probs=config["precompute_ref_log_probs"], **common
    )
    return DPOTrainer(
        model=config["model"],
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora_config(config),
    )


def load_data(data_dir: str):
    """The step's training rows as a file-backed ``datasets.Dataset`` (TRL's map caches go beside)."""
    from datasets import load_from_disk

    return load_from_disk(data_dir)


def progress_callback(kind: str) -> Any:
    """A TrainerCallback in place of transformers' own progress bar, which a Ray worker would show
    only once it ends: a bar with an ETA drawn by the driver (``speed_ray.io.logs.worker_bar``) and a line per
    logged step, on the first rank only."""
    from transformers import TrainerCallback

    from speed_ray.io.logs import worker_bar

    class Progress(TrainerCallback):
        bar: Any = None

        def on_train_begin(self, args, state, control, **kwargs):
            if state.is_world_process_zero:
                self.bar = worker_bar(state.max_steps, f"align {kind}", done=state.global_step)

        def on_step_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.update(state.global_step - self.bar.n)

        def on_log(self, args, state, control, logs=None, **kwargs):
            if state.is_world_process_zero and logs:
                shown = ", ".join(f"{k} {v:.4g}" for k, v in logs.items() if isinstance(v, int | float))
                logger.info(f"align {kind} step {state.global_step}/{state.max_steps}: {shown}")

        def on_train_end(self, args, state, control, **kwargs):
            if self.bar is not None:
                self.bar.close()
                self.bar = None

    return Progress()


def train_loop(config: dict[str, Any]) -> None:
    """One Ray Train worker: train (resuming from Ray's last checkpoint), then report the merged model."""
    import torch

    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    with tempfile.TemporaryDirectory(prefix="speed-ray-align-") as output_dir:
        train_in(config, output_dir)


def train_in(config: dict[str, Any], output_dir: str) -> None:
    """``train_loop`` with TRL's local checkpoints in ``output_dir`` (removed afterwards)."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import PrinterCallback, ProgressCallback

    trainer = build_trainer(config, load_data(config["data_dir"]), output_dir)
    trainer.remove_callback(ProgressCallback)  # transformers' bar, or with disable_tqdm its printer
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_callback(config["kind"]))
    # Every checkpoint TRL saves goes to Ray's storage; after a worker dies, Ray Train restarts the
    # group and get_checkpoint() hands back the latest one.
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    checkpoint = ray.train.get_checkpoint()
    resumed_from = 0
    if checkpoint is None:
        trainer.train()
    else:
        with checkpoint.as_directory() as d:
            path = os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME)
            with open(os.path.join(path, "trainer_state.json")) as f:
                resumed_from = json.load(f)["global_step"]
            trainer.train(resume_from_checkpoint=path)
    history = [
        {k: v for k, v in h.items() if isinstance(v, int | float)}
        for h in trainer.state.log_history
        if "loss" in h
    ]
    metrics = {"history": history, "steps": trainer.state.global_step, "resumed_from_step": resumed_from}
    report_model(trainer, config, metrics)


def report_model(trainer, config: dict[str, Any], metrics: dict[str, Any]) -> None:
    """Report the merged model folder (weights, tokenizer with its chat template, generation defaults).

    Every rank calls ``save_model`` (under ZeRO-3 it gathers the sharded weights) and ``report``; rank 0
    merges the LoRA adapter into a fresh copy of the base model, which works the same for DDP and ZeRO.
    """
    import ray.train
    from ray.train import Checkpoint
    from transformers import AutoModelForCausalLM, GenerationConfig

    with tempfile.TemporaryDirectory() as saved, tempfile.TemporaryDirectory() as d:
        trainer.save_model(saved)
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            if config["finetune"] == "lora":
                from peft import PeftModel

                base = AutoModelForCausalLM.from_pretrained(config["model"])
                model = PeftModel.from_pretrained(base, saved).merge_and_unload()
            else:
                model = AutoModelForCausalLM.from_pretrained(saved)
            tok = trainer.processing_class
            model.generation_config = GenerationConfig(
                eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                bos_token_id=tok.bos_token_id,
                **config["generation"],
            )
            model.save_pretrained(d)
            tok.save_pretrained(d)
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
