"""Contrastive embedding training: the per-worker loop that Ray Train runs (STYLE P9).

Each step embeds the worker's queries, positives and hard negatives, and the InfoNCE loss sees every
worker's positives and negatives (``speed_ray.embed.losses``), so the negatives per query are the global
batch; DDP (or DeepSpeed) averages the gradients, which makes them equal to the full-batch gradients.
With ``chunk_size`` the batch goes through GradCache (``speed_ray.embed.gradcache``): same loss and
gradients, one chunk's activations at a time.

Data is deterministic by step: every worker holds the rows (or, for crops, the corpus, re-cropped
each epoch) and takes its slice of global batch ``s`` from an order seeded by (seed, epoch), and each
step seeds dropout from (seed, step, rank). So a run resumed from a checkpoint after a killed worker
takes exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from speed_ray.embed.model import format_query
from speed_ray.embed.pairs import CropRule, build_pairs
from speed_ray.io import logs

logger = logging.getLogger(__name__)

PROBE_TEXTS = ["a command-line tool to convert images", "library for parsing XML documents"]


# ----------------------------------------------------------------------------------------------
# Data: which rows make global batch s


@dataclass
class Rows:
    """Fixed training rows ``{instruction, query, positive, negatives}`` (synth examples, user pairs)."""

    rows: list[dict[str, Any]]

    def __len__(self) -> int:
        return len(self.rows)

    def epoch(self, epoch: int) -> list[dict[str, Any]]:
        return self.rows


@dataclass
class CorpusPairs:
    """Self-supervised pairs from an unlabelled corpus, drawn anew each epoch (the crops paper)."""

    docs: list[dict[str, Any]]
    mode: str
    rule: CropRule
    seed: int
    size: int = 0
    _cache: dict[int, list[dict[str, Any]]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not self.size:
            self.size = len(build_pairs(self.docs, self.mode, self.rule, self.seed, 0)[0])

    def __len__(self) -> int:
        return self.size

    def epoch(self, epoch: int) -> list[dict[str, Any]]:
        if epoch not in self._cache:
            pairs, _ = build_pairs(self.docs, self.mode, self.rule, self.seed, epoch)
            self._cache = {
                epoch: [
                    {"instruction": None, "query": p["anchor"], "positive": p["positive"], "negatives": []}
                    for p in pairs
                ]
            }
        return self._cache[epoch]


@functools.lru_cache(maxsize=2)
def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    """The row order of one epoch (computed once per epoch, not per step: millions of rows)."""
    order = list(range(n))
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return order


def global_batch(data: Rows | CorpusPairs, step: int, size: int, seed: int) -> tuple[int, list[dict]]:
    """(epoch, rows) of global batch ``step`` (1-based): epochs of ``len(data) // size`` batches, each
    epoch in an order seeded by (seed, epoch); the last partial batch of an epoch is dropped."""
    per_epoch = len(data) // size
    if per_epoch == 0:
        raise ValueError(f"{len(data)} training rows, fewer than one global batch of {size}")
    epoch, b = divmod(step - 1, per_epoch)
    order = epoch_order(len(data), seed, epoch)
    rows = data.epoch(epoch)
    return epoch, [rows[i] for i in order[b * size : (b + 1) * size]]


def batch_texts(
    rows: list[dict[str, Any]], pooling: str, num_negatives: int
) -> tuple[list[str], list[str], list[str], torch.Tensor]:
    """Rows -> (queries, positives, negatives [B*K], mask [B, K]): each row's hard negatives padded to
    K = ``num_negatives`` with '' (masked out of the loss), so every worker gathers the same shapes."""
    queries = [format_query(r.get("instruction"), r["query"], pooling) for r in rows]
    negatives, mask = [], []
    for r in rows:
        negs = list(r.get("negatives") or [])[:num_negatives]
        mask.append([True] * len(negs) + [False] * (num_negatives - len(negs)))
        negatives += negs + [""] * (num_negatives - len(negs))
    return queries, [r["positive"] for r in rows], negatives, torch.tensor(mask, dtype=torch.bool)


# ----------------------------------------------------------------------------------------------
# One step


def is_deepspeed(model) -> bool:
    return type(model).__name__ == "DeepSpeedEngine"


def unwrap(model):
    """The SentenceTransformer inside a DDP or DeepSpeed wrapper."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    return model.module if ddp or is_deepspeed(model) else model


def backward_for(model) -> Callable[[Callable[[], torch.Tensor], torch.Tensor | None, bool], None]:
    """``run(forward, grad, last)``: forward, then backward with ``grad`` (None: the output is the loss),
    syncing gradients across workers only when ``last`` (DDP's no_sync, DeepSpeed's boundary)."""
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)

    def deepspeed_run(forward, grad, last):
        model.set_gradient_accumulation_boundary(last)
        out = forward()
        model.backward(out if grad is None else (out.float() * grad).sum())

    def run(forward, grad, last):
        with contextlib.nullcontext() if last or not ddp else model.no_sync():
            forward().backward(gradient=grad)

    return deepspeed_run if is_deepspeed(model) else run


def length_passes(lengths: list[int], max_texts: int, max_tokens: int) -> list[list[int]]:
    """Indices of texts sorted by length, cut into forward passes of at most ``max_texts`` texts and
    ``max_tokens`` padded tokens (0: no limit; a text longer than ``max_tokens`` goes alone)."""
    passes: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lengths.__getitem__):
        full = passes and (
            (max_texts and len(passes[-1]) >= max_texts)
            or (max_tokens and (len(passes[-1]) + 1) * lengths[i] > max_tokens)
        )
        if not passes or full:
            passes.append([])
        passes[-1].append(i)
    return passes


def even_passes(passes: list[list[int]], lengths: list[int], count: int) -> list[list[int]]:
    """``passes`` split, the one with the most padded tokens in halves first, until there are
    ``count``: every rank must run as many forward passes (DDP broadcasts buffers and ZeRO-3 gathers
    weights in each one)."""
    passes = [list(p) for p in passes]
    if count > len(lengths):
        raise ValueError(f"cannot split {len(lengths)} texts into {count} forward passes")
    while len(passes) < count:
        i = max(
            range(len(passes)), key=lambda j: (len(passes[j]) > 1, len(passes[j]) * lengths[passes[j][-1]])
        )
        p = passes[i]
        passes[i : i + 1] = [p[: (len(p) + 1) // 2], p[(len(p) + 1) // 2 :]]
    return passes


def most_passes(count: int, device: torch.device) -> int:
    """The largest pass count of any rank (``count`` itself without a process group)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return count
    t = torch.tensor([count], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def train_step(
    model,
    optimizer,
    rows: list[dict[str, Any]],
    config: dict[str, Any],
    frozen=None,
    scheduler=None,
) -> dict[str, float]:
    """One optimizer step on this worker's ``rows``; ``config["chunk_size"]`` > 0 goes through GradCache.

    The step's texts (queries, positives, negatives) are sorted by token length and embedded in passes
    of at most ``pass_tokens`` padded tokens (and ``chunk_size`` texts); the loss sees them back in
    row order. ``config`` keys: pooling, temperature, symmetric, num_negatives, chunk_size,
    pass_tokens, max_grad_norm, precision. ``frozen`` (``embedding.FrozenBlocks``) lets GradCache
    compute the frozen blocks once.
    """
    from speed_ray.embed.gradcache import cached_backward
    from speed_ray.embed.losses import info_nce

    k = config["num_negatives"]
    queries, positives, negatives, mask = batch_texts(rows, config["pooling"], k)
    texts = queries + positives + negatives
    n = len(queries)
    st = unwrap(model)
    device = next(st.parameters()).device
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if config["precision"] == "bf16" and not is_deepspeed(model)
        else contextlib.nullcontext()
    )
    lengths = st.preprocess(texts)["attention_mask"].sum(dim=1).tolist()
    passes = length_passes(lengths, config["chunk_size"], config["pass_tokens"])
    passes = even_passes(passes, lengths, most_passes(len(passes), device))
    order = torch.tensor([i for p in passes for i in p])
    chunks = [[texts[i] for i in p] for p in passes]

    def embed(chunk) -> torch.Tensor:
        features = {
            key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in st.preprocess(chunk).items()
        }
        with autocast:
            return model(features)["sentence_embedding"]  # [len, d], normalised

    def loss_fn(sorted_emb: torch.Tensor):
        emb = torch.empty_like(sorted_emb, dtype=torch.float32).index_copy(
            0, order.to(device), sorted_emb.float()
        )  # back in row order: queries, positives, negatives
        neg = emb[2 * n :].view(n, k, -1) if k else None
        return info_nce(
            emb[:n], emb[n : 2 * n], neg, mask.to(device), config["temperature"], config["symmetric"]
        )

    run = backward_for(model)
    if not is_deepspeed(model):
        optimizer.zero_grad(set_to_none=True)
    if config["chunk_size"] > 0:
        loss, acc = cached_backward(embed, chunks, loss_fn, run, frozen)
    else:
        out = {}

        def forward():
            out["loss"], out["acc"] = loss_fn(torch.cat([embed(c) for c in chunks]))
            return out["loss"]

        run(forward, None, True)
        loss, acc = out["loss"].detach(), out["acc"]
    if is_deepspeed(model):
        model.step()  # clips (gradient_clipping), steps the optimizer and the scheduler
        norm = model.get_global_grad_norm()
        grad_norm = float(norm) if norm is not None else float("nan")
    else:
        params = [p for p in st.parameters() if p.requires_grad]
        grad_norm = torch.nn.utils.clip_grad_norm_(params, config["max_grad_norm"] or float("inf")).item()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
    return {"loss": loss.item(), "accuracy": acc.item(), "grad_norm": grad_norm}


# ----------------------------------------------------------------------------------------------
# Model set-up, checkpoints and export


def setup_model(config: dict[str, Any]):
    """The SentenceTransformer with LoRA / frozen blocks / gradient checkpointing as configured;
    returns (model, frozen or None)."""
    from speed_ray.embed.model import FrozenBlocks, build_model, set_prompts

    model = build_model(
        config["model"], config["pooling"], config["max_seq_length"], dropout=config["dropout"]
    )
    model.train()  # dropout on, as in E5/SPEED and the crops paper
    set_prompts(model, config["query_instruction"], config["pooling"])
    if config["gradient_checkpointing"]:
        model[0].auto_model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    last = config["train_last_blocks"]
    frozen = FrozenBlocks(model, last) if last else None
    if config["finetune"] == "lora":
        for p in model.parameters():
            p.requires_grad_(False)
        configured_lora(model, config)
    return model, frozen


def configured_lora(model, config: dict[str, Any]) -> None:
    """The LoRA adapter of ``config`` (in the last ``train_last_blocks`` blocks when set): the same for
    training and for the fresh copy the export loads the trained weights into."""
    from speed_ray.embed.model import add_lora

    add_lora(
        model,
        config["lora_r"],
        config["lora_alpha"],
        config["lora_dropout"],
        config["lora_target_modules"],
        config["train_last_blocks"],
    )


def deepspeed_config(config: dict[str, Any]) -> dict[str, Any]:
    return {
        "train_micro_batch_size_per_gpu": config["batch_size"],
        "gradient_accumulation_steps": 1,
        "zero_optimization": {"stage": config["deepspeed_stage"]},
        "gradient_clipping": config["max_grad_norm"],
        "bf16": {"enabled": config["precision"] == "bf16"},
        "fp16": {"enabled": config["precision"] == "fp16"},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def wrap(model, config: dict[str, Any]):
    """(model, optimizer, scheduler): DDP via Ray's prepare_model, or a DeepSpeed engine (ZeRO)."""
    from transformers import get_scheduler

    params = [p for p in model.parameters() if p.requires_grad]
    # fused AdamW (one kernel for all tensors) where torch has it, as transformers' Trainer uses
    optimizer = torch.optim.AdamW(
        params,
        lr=config["learning_rate"],
        weight_decay=config["weight_decay"],
        fused=True if config["deepspeed_stage"] == 0 else None,
    )

    def schedule(opt):
        return get_scheduler(config["lr_schedule"], opt, config["warmup_steps"], config["steps"])

    if config["deepspeed_stage"]:
        import deepspeed
        from ray.train.torch import get_device

        device = get_device()
        if device.type == "cuda":
            torch.cuda.set_device(device)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=schedule, config=deepspeed_config(config)
        )
        return engine, optimizer, scheduler
    from ray.train.torch import prepare_model

    # BERT-style checkpoints carry a pooler head that sentence-transformers never uses.
    model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    return model, optimizer, schedule(optimizer)


STATE = "state.pt"


def save_state(model, optimizer, scheduler, state: dict[str, Any], folder: str, rank: int) -> bool:
    """Write this rank's part of a checkpoint; True if it wrote anything (to report)."""
    if is_deepspeed(model):
        model.save_checkpoint(folder, tag="state", client_state=state)
        return True
    if rank != 0:
        return False
    trainable = {k: v for k, v in unwrap(model).named_parameters() if v.requires_grad}
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in trainable.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
        },
        os.path.join(folder, STATE),
    )
    return True


def load_state(model, optimizer, scheduler, folder: str) -> dict[str, Any]:
    """Restore what ``save_state`` wrote; returns its ``state`` (step, history)."""
    if is_deepspeed(model):
        _, client = model.load_checkpoint(folder, tag="state")
        return client
    # weights_only: tensors, numbers, strings and containers only; a checkpoint cannot run code.
    saved = torch.load(os.path.join(folder, STATE), weights_only=True, map_location="cpu")
    missing = unwrap(model).load_state_dict(saved.pop("model"), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    optimizer.load_state_dict(saved.pop("optimizer"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    return saved


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight on CPU; under ZeRO-3 gathered from all ranks (all ranks must call this)."""
    st = unwrap(model)
    ctx = contextlib.nullcontext()
    if is_deepspeed(model) and model.zero_optimization_stage() == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(st.parameters()))
    with ctx:
        return {k: v.detach().float().cpu().clone() for k, v in st.state_dict().items()}


def export(
    state: dict[str, torch.Tensor], config: dict[str, Any], folder: str, history: list[dict] | None = None
) -> None:
    """A fresh copy of the model with the trained weights, LoRA merged, saved for sentence-transformers
    with pooling, normalisation, the query/document prompts and sentence-transformers' model card
    (README.md) from ``config["model_card"]`` and the losses so far (``history``)."""
    from speed_ray.embed.model import build_model, merge_lora, model_card_data, set_prompts, use_card

    model = build_model(
        config["model"], config["pooling"], config["max_seq_length"], dropout=config["dropout"]
    )
    if config["finetune"] == "lora":
        configured_lora(model, config)
    model.load_state_dict(state)
    merge_lora(model)
    set_prompts(model, config["query_instruction"], config["pooling"])
    if config.get("model_card") is not None:
        use_card(model, model_card_data(config["model_card"], history or []))
    model.save(folder)


def snapshot(model, config: dict[str, Any], step: int, rank: int, history: list[dict] | None = None) -> None:
    """Export the model as it is at ``step`` to ``<snapshot_dir>/step_<step>`` (written under a
    temporary name and renamed, so a folder there is whole; a resumed run keeps it)."""
    import shutil

    weights = full_state_dict(model)  # every rank: ZeRO-3 gathers
    target = Path(config["snapshot_dir"]) / f"step_{step:05d}"
    if rank != 0 or target.exists():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export(weights, config, str(tmp), history)
    tmp.rename(target)


def probe(model) -> dict[str, Any]:
    """The trained model's own embeddings of fixed texts (as documents and as queries); the exported
    folder must reproduce them. Every rank calls this (ZeRO-3 gathers weights in forward)."""
    st = unwrap(model)
    st.eval()
    with torch.no_grad():
        kw: dict[str, Any] = {"convert_to_tensor": True, "show_progress_bar": False}
        docs = st.encode(PROBE_TEXTS, **kw).float().cpu().tolist()
        queries = st.encode(PROBE_TEXTS, prompt_name="query", **kw).float().cpu().tolist()
    st.train()
    return {
        "texts": PROBE_TEXTS,
        "query_prompt": st.prompts.get("query", ""),
        "embeddings": docs,
        "query_embeddings": queries,
    }


# ----------------------------------------------------------------------------------------------
# The loop


def train_loop(config: dict[str, Any]) -> None:
    import ray
    import ray.train
    from ray.train import Checkpoint

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    data = ray.get(config["data"])
    model, frozen = setup_model(config)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = frozen if config["cache_frozen"] else None
    model, optimizer, scheduler = wrap(model, config)
    step, history = 0, []
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(model, optimizer, scheduler, d)
        step, history = state["step"], state["history"]
        if rank == 0:
            logger.info(f"embed: resumed from the checkpoint of step {step}")
    resumed_from = step
    per_worker, steps = config["batch_size"], config["steps"]
    bar = logs.worker_bar(steps, "embed", done=step) if rank == 0 else None
    while step < steps:
        step += 1
        t0 = time.perf_counter()
        epoch, rows = global_batch(data, step, per_worker * world, config["seed"])
        torch.manual_seed(config["seed"] * 1_000_003 + step * 1_009 + rank)
        lr = scheduler.get_last_lr()[0]
        metrics = train_step(
            model, optimizer, rows[rank * per_worker : (rank + 1) * per_worker], config, frozen, scheduler
        )
        seconds = time.perf_counter() - t0
        metrics |= {
            "step": step,
            "epoch": epoch,
            "lr": lr,
            "seconds": seconds,
            "examples_per_s": per_worker * world / seconds,
        }
        history.append(metrics)
        if rank == 0:
            logger.info(
                f"embed step {step}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            )
        if bar is not None:
            bar.update(1)
        if config["save_steps"] and step % config["save_steps"] == 0 and step < steps:
            with tempfile.TemporaryDirectory() as d:
                wrote = save_state(model, optimizer, scheduler, {"step": step, "history": history}, d, rank)
                ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d) if wrote else None)
        if config["snapshot_steps"] and step % config["snapshot_steps"] == 0 and step < steps:
            snapshot(model, config, step, rank, history)
    if bar is not None:
        bar.close()
    weights = full_state_dict(model)
    report = {
        "history": history,
        "steps": step,
        "resumed_from_step": resumed_from,
        "trainable_params": trainable,
        "probe": probe(model),
    }
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if rank == 0:
            export(weights, config, d, history)
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(report, checkpoint=checkpoint)
