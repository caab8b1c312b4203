"""TRL's SFTTrainer and DPOTrainer inside Ray Train, configured rather than forked (STYLE P9).

``build_trainer`` is plain TRL (a test runs it in one process and compares it with the Ray Train run);
``train_loop`` is what every Ray Train worker runs: it loads the step's training data (a ``datasets``
folder the driver wrote, so TRL's tokenization and reference log-probability caches sit beside it and
survive a restart), resumes from the last checkpoint Ray Train holds, trains, and (rank 0) reports
the merged model folder as the final checkpoint. DPO trains on the preference pairs as the align
stage stores them, in TRL's conversational format (TRL applies the chat template itself); SFT rows
come from ``sft_rows``.

Settings arrive as one ``AlignTrainSettings`` (built by ``speed_ray.align.models.train_step``): the
``align`` section as configured, the trained model's own ``align.<name>`` run, and what the driver
resolved (the model to start from, the data folder, the seed and the generation defaults).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from typing import Any

from speed_ray.align.config import AlignConfig, AlignTrainConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AlignTrainSettings:
    """What every worker of one align training step needs (Ray pickles it to each)."""

    align: AlignConfig
    train: AlignTrainConfig
    """This model's steps, learning rate and batch size (``align.junior``, ``senior`` or ``revisor``)."""
    kind: str
    """sft | dpo."""
    model_path: str
    """The model to start from, a local folder: the base model, or the junior for the senior."""
    data_dir: str
    """The ``datasets`` folder of the training rows (``speed_ray.align.models.write_dataset``)."""
    seed: int
    generation: dict[str, Any] = field(default_factory=dict)
    """Sampling defaults saved as the exported model's ``generation_config.json``."""


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
    kw: dict[str, Any] = {"tokenize": True, "add_generation_prompt": True, "return_dict": False}
    lengths = [len(tok.apply_chat_template(r["prompt"], **kw)) for r in rows]
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


def trainer_args(s: AlignTrainSettings, output_dir: str) -> dict[str, Any]:
    """The TRL config arguments both trainers share."""
    import torch

    ac = s.align
    use_gpu = ac.resources.use_gpu
    gpu = use_gpu and torch.cuda.is_available()
    return dict(
        output_dir=output_dir,
        max_steps=s.train.steps,
        per_device_train_batch_size=s.train.batch_size,
        learning_rate=s.train.learning_rate,
        max_length=ac.max_length,
        logging_steps=1,
        save_strategy="steps" if ac.save_steps else "no",
        save_steps=ac.save_steps or 500,
        save_total_limit=1,  # Ray Train keeps its own copies (num_to_keep=2) in the run's storage
        report_to="none",
        use_cpu=not use_gpu,
        # bf16 where the hardware has it; fp32 on CPU keeps small-model steps exact.
        bf16=gpu and torch.cuda.is_bf16_supported(),
        gradient_checkpointing=ac.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        deepspeed=deepspeed_config(ac.deepspeed_stage),
        seed=s.seed,
        data_seed=s.seed,
        **ac.trl,
    )


def lora_config(ac: AlignConfig):
    if ac.finetune == "full":
        return None
    from peft import LoraConfig

    return LoraConfig(
        r=ac.lora_r,
        lora_alpha=ac.lora_alpha,
        lora_dropout=ac.lora_dropout,
        target_modules=ac.lora_target_modules,
        task_type="CAUSAL_LM",
    )


def build_trainer(s: AlignTrainSettings, data, output_dir: str):
    """The TRL trainer for ``s.kind`` on ``data`` (a ``datasets.Dataset``); no Ray in here."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(s.model_path)
    common = trainer_args(s, output_dir)
    if s.kind == "sft":
        from trl import SFTConfig, SFTTrainer

        return SFTTrainer(
            model=s.model_path,
            args=SFTConfig(**common),
            train_dataset=data,
            processing_class=tok,
            peft_config=lora_config(s.align),
        )
    from trl import DPOConfig, DPOTrainer

    # The reference model is the frozen starting point (the junior): with LoRA, TRL gets it by
    # switching the adapter off, with full fine-tuning from a copy. Precomputed, it costs one forward
    # pass per pair for the whole run instead of one per pair per epoch, and TRL caches the result
    # beside the data folder, so a restarted worker reuses it.
    args = DPOConfig(beta=s.align.beta, precompute_ref_log_probs=s.align.precompute_ref_log_probs, **common)
    return DPOTrainer(
        model=s.model_path,
        args=args,
        train_dataset=data,
        processing_class=tok,
        peft_config=lora_config(s.align),
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


def train_loop(s: AlignTrainSettings) -> None:
    """One Ray Train worker: train (resuming from Ray's last checkpoint), then report the merged model."""
    import torch

    torch.set_num_threads(max(1, int(s.align.resources.cpus_per_worker)))
    with tempfile.TemporaryDirectory(prefix="speed-ray-align-") as output_dir:
        train_in(s, output_dir)


def train_in(s: AlignTrainSettings, output_dir: str) -> None:
    """``train_loop`` with TRL's local checkpoints in ``output_dir`` (removed afterwards)."""
    from ray.train.huggingface.transformers import RayTrainReportCallback, prepare_trainer
    from transformers import PrinterCallback, ProgressCallback

    trainer = build_trainer(s, load_data(s.data_dir), output_dir)
    trainer.remove_callback(ProgressCallback)  # transformers' bar, or with disable_tqdm its printer
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(progress_callback(s.kind))
    # Every checkpoint TRL saves goes to Ray's storage; after a worker dies, Ray Train restarts the
    # group and get_checkpoint() hands back the latest one.
    trainer.add_callback(RayTrainReportCallback())
    trainer = prepare_trainer(trainer)
    resumed_from = train_resuming(trainer)
    metrics = {
        "history": loss_history(trainer),
        "steps": trainer.state.global_step,
        "resumed_from_step": resumed_from,
    }
    report_model(trainer, s, metrics)


def train_resuming(trainer) -> int:
    """Train, from the checkpoint Ray Train holds if there is one; returns its step (0: none)."""
    import ray.train
    from ray.train.huggingface.transformers import RayTrainReportCallback

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        trainer.train()
        return 0
    with checkpoint.as_directory() as d:
        path = os.path.join(d, RayTrainReportCallback.CHECKPOINT_NAME)
        with open(os.path.join(path, "trainer_state.json")) as f:
            resumed_from = json.load(f)["global_step"]
        trainer.train(resume_from_checkpoint=path)
    return resumed_from


def loss_history(trainer) -> list[dict[str, float]]:
    """The numbers TRL logged at each step."""
    return [
        {k: v for k, v in h.items() if isinstance(v, int | float)}
        for h in trainer.state.log_history
        if "loss" in h
    ]


def merged_model(trainer, s: AlignTrainSettings, saved: str):
    """The trained model from ``saved`` (``trainer.save_model``'s folder): the LoRA adapter merged into a
    fresh copy of the base model, or the full weights; with the generation defaults."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    if s.align.finetune == "lora":
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(s.model_path)
        model = PeftModel.from_pretrained(base, saved).merge_and_unload()
    else:
        model = AutoModelForCausalLM.from_pretrained(saved)
    tok = trainer.processing_class
    model.generation_config = GenerationConfig(
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
        bos_token_id=tok.bos_token_id,
        **s.generation,
    )
    return model


def report_model(trainer, s: AlignTrainSettings, metrics: dict[str, Any]) -> None:
    """Report the merged model folder (weights, tokenizer with its chat template, generation defaults).

    Every rank calls ``save_model`` (under ZeRO-3 it gathers the sharded weights) and ``report``; rank 0
    merges the LoRA adapter into a fresh copy of the base model, which works the same for DDP and ZeRO.
    """
    import ray.train
    from ray.train import Checkpoint

    with tempfile.TemporaryDirectory() as saved, tempfile.TemporaryDirectory() as d:
        trainer.save_model(saved)
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            merged_model(trainer, s, saved).save_pretrained(d)
            trainer.processing_class.save_pretrained(d)
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(metrics, checkpoint=checkpoint)
