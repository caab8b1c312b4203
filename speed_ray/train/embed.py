"""Contrastive embedding training: the per-worker loop that Ray Train runs (STYLE P9).

Each step embeds the worker's queries, positives and hard negatives in one forward pass, and the
InfoNCE loss sees every worker's positives and negatives (``speed_ray.losses``), so the negatives per
query are the global batch. DDP averages the gradients, which makes them equal to the gradients of
the full-batch loss. Rank 0 reports the exported SentenceTransformer folder as the checkpoint.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator
from typing import Any

from speed_ray.embedding import format_query

PROBE_TEXTS = ["a command-line tool to convert images", "library for parsing XML documents"]


def batch_texts(batch: dict[str, Any], pooling: str) -> tuple[list[str], list[str], list[str], list[bool]]:
    """Rows -> (queries, positives, negatives, has_negative); a missing negative becomes '' and is masked."""
    queries = [format_query(i, q, pooling) for i, q in zip(batch["instruction"], batch["query"], strict=True)]
    negatives = [n if n else "" for n in batch["negative"]]
    has_negative = [bool(n) for n in batch["negative"]]
    return queries, list(batch["positive"]), negatives, has_negative


def unwrap(model):
    """The SentenceTransformer inside a DDP wrapper (Ray's prepare_model wraps when world size > 1)."""
    import torch

    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def train_step(
    model, optimizer, batch: dict[str, Any], pooling: str, temperature: float, chunk_size: int = 0
) -> dict[str, float]:
    """One optimizer step; ``chunk_size`` > 0 embeds through GradCache, same loss and gradients."""
    import torch

    from speed_ray.gradcache import cached_backward
    from speed_ray.losses import info_nce

    queries, positives, negatives, has_neg = batch_texts(batch, pooling)
    n = len(queries)
    mask = torch.tensor(has_neg)

    def embed(texts) -> torch.Tensor:
        return model(dict(unwrap(model).preprocess(list(texts))))[
            "sentence_embedding"
        ]  # [len, d], normalised

    def loss_fn(emb: torch.Tensor):
        return info_nce(emb[:n], emb[n : 2 * n], emb[2 * n :], mask, temperature)

    texts = queries + positives + negatives
    optimizer.zero_grad()
    if chunk_size > 0:
        no_sync = model.no_sync if isinstance(model, torch.nn.parallel.DistributedDataParallel) else None
        loss, acc = cached_backward(embed, texts, loss_fn, chunk_size, no_sync)
    else:
        loss, acc = loss_fn(embed(texts))
        loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf"))
    optimizer.step()
    return {"loss": loss.item(), "accuracy": acc.item(), "grad_norm": grad_norm.item()}


def batches(shard, batch_size: int) -> Iterator[dict[str, Any]]:
    """Endless epochs over the worker's shard; every worker sees the same number of batches."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, drop_last=True, batch_format="numpy"):
            empty = False
            yield batch
        if empty:
            raise ValueError(f"a worker's data shard has fewer rows than embed.batch_size={batch_size}")


def train_loop(config: dict[str, Any]) -> None:
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.torch import prepare_model
    from transformers import get_linear_schedule_with_warmup

    from speed_ray.embedding import build_model, set_prompts, train_last_blocks

    torch.manual_seed(config["seed"])
    torch.set_num_threads(max(1, int(config["cpus_per_worker"])))
    model = build_model(config["model"], config["pooling"], config["max_seq_length"])
    model.train()  # dropout on, as in E5/SPEED and the crops paper
    if config["train_last_blocks"]:
        train_last_blocks(model, config["train_last_blocks"])
    # BERT-style checkpoints carry a pooler head that sentence-transformers never uses.
    model = prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizer = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=config["learning_rate"]
    )
    scheduler = get_linear_schedule_with_warmup(optimizer, config["warmup_steps"], config["steps"])
    world = ray.train.get_context().get_world_size()
    data = batches(ray.train.get_dataset_shard("train"), config["batch_size"])
    history = []
    for step in range(1, config["steps"] + 1):
        t0 = time.time()
        metrics = train_step(
            model, optimizer, next(data), config["pooling"], config["temperature"], config["chunk_size"]
        )
        metrics |= {"lr": scheduler.get_last_lr()[0]}
        scheduler.step()
        metrics |= {"step": step, "examples_per_s": world * config["batch_size"] / (time.time() - t0)}
        history.append(metrics)
        if ray.train.get_context().get_world_rank() == 0:
            print(
                f"embed step {step}/{config['steps']}: "
                + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())
            )
    with tempfile.TemporaryDirectory() as d:
        checkpoint, report = None, {"history": history, "steps": config["steps"]}
        if ray.train.get_context().get_world_rank() == 0:
            module = unwrap(model)
            set_prompts(module, config["query_instruction"], config["pooling"])
            module.save(d)
            checkpoint = Checkpoint.from_directory(d)
            # The trained model's own embeddings of fixed texts: the exported folder must reproduce them.
            module.eval()
            report["probe"] = {"texts": PROBE_TEXTS, "embeddings": module.encode(PROBE_TEXTS).tolist()}
        ray.train.report(report, checkpoint=checkpoint)
