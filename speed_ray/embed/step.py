"""One optimizer step of contrastive training on a worker's rows (STYLE P9).

Each step embeds the worker's queries, positives and hard negatives, and the InfoNCE loss sees every
worker's positives and negatives (``speed_ray.embed.losses``), so the negatives per query are the global
batch; DDP (or DeepSpeed) averages the gradients, which makes them equal to the full-batch gradients.
With ``chunk_size`` the batch goes through GradCache (``speed_ray.embed.gradcache``): same loss and
gradients, one chunk's activations at a time.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from speed_ray.embed.batches import batch_texts
from speed_ray.embed.prepare import is_deepspeed, unwrap

if TYPE_CHECKING:
    from speed_ray.embed.train import EmbedTrainSettings

Forward = Callable[[], torch.Tensor]
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def backward_for(model) -> Callable[[Forward, torch.Tensor | None, bool], None]:
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


def step_passes(
    st, texts: list[str], max_texts: int, max_tokens: int, device: torch.device
) -> list[list[int]]:
    """The step's forward passes (``length_passes``), as many on this rank as on any other."""
    lengths = st.preprocess(texts)["attention_mask"].sum(dim=1).tolist()
    passes = length_passes(lengths, max_texts, max_tokens)
    return even_passes(passes, lengths, most_passes(len(passes), device))


def embedder(model, device: torch.device, precision: str) -> Callable[[list[str]], torch.Tensor]:
    """``embed(texts)``: their normalised embeddings [len, d] from ``model`` (bf16 autocast outside
    DeepSpeed, which runs in bf16 itself)."""
    st = unwrap(model)
    autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16)
        if precision == "bf16" and not is_deepspeed(model)
        else contextlib.nullcontext()
    )

    def embed(chunk: list[str]) -> torch.Tensor:
        features = {
            key: v.to(device) if isinstance(v, torch.Tensor) else v for key, v in st.preprocess(chunk).items()
        }
        with autocast:
            return model(features)["sentence_embedding"]

    return embed


def row_order_loss(order: torch.Tensor, n: int, mask: torch.Tensor, s: EmbedTrainSettings, device) -> LossFn:
    """``loss_fn(sorted_emb)``: InfoNCE (loss, accuracy) of the embeddings in pass order, put back in
    row order first (queries, positives, then ``num_negatives`` negatives per query)."""
    from speed_ray.embed.losses import info_nce

    k = s.num_negatives

    def loss_fn(sorted_emb: torch.Tensor):
        emb = torch.empty_like(sorted_emb, dtype=torch.float32).index_copy(
            0, order.to(device), sorted_emb.float()
        )
        neg = emb[2 * n :].view(n, k, -1) if k else None
        return info_nce(emb[:n], emb[n : 2 * n], neg, mask.to(device), s.embed.temperature, s.embed.symmetric)

    return loss_fn


def forward_backward(model, embed, chunks: list[list[str]], loss_fn: LossFn, chunk_size: int, frozen):
    """(loss, accuracy) of the step, its gradients in ``.grad``: through GradCache when ``chunk_size``
    is set, else in one graph over every pass."""
    from speed_ray.embed.gradcache import cached_backward

    run = backward_for(model)
    if chunk_size > 0:
        return cached_backward(embed, chunks, loss_fn, run, frozen)
    out = {}

    def forward():
        out["loss"], out["acc"] = loss_fn(torch.cat([embed(c) for c in chunks]))
        return out["loss"]

    run(forward, None, True)
    return out["loss"].detach(), out["acc"]


def optimizer_step(model, optimizer, scheduler, max_grad_norm: float) -> float:
    """Clip, then step the optimizer and the scheduler; returns the gradient norm before clipping."""
    if is_deepspeed(model):
        model.step()  # clips (gradient_clipping), steps the optimizer and the scheduler
        norm = model.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")
    params = [p for p in unwrap(model).parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm or float("inf")).item()
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    return grad_norm


def train_step(
    model, optimizer, rows: list[dict[str, Any]], s: EmbedTrainSettings, frozen=None, scheduler=None
) -> dict[str, float]:
    """One optimizer step on this worker's ``rows``; ``embed.chunk_size`` > 0 goes through GradCache.

    The step's texts (queries, positives, negatives) are sorted by token length and embedded in passes
    of at most ``embed.pass_tokens`` padded tokens (and ``chunk_size`` texts); the loss sees them back
    in row order. ``frozen`` (``embed.model.FrozenBlocks``) lets GradCache compute the frozen blocks once.
    """
    ec = s.embed
    queries, positives, negatives, mask = batch_texts(rows, ec.pooling, s.num_negatives)
    texts = queries + positives + negatives
    device = next(unwrap(model).parameters()).device
    embed = embedder(model, device, ec.precision)
    passes = step_passes(unwrap(model), texts, ec.chunk_size, ec.pass_tokens, device)
    order = torch.tensor([i for p in passes for i in p])
    chunks = [[texts[i] for i in p] for p in passes]
    if not is_deepspeed(model):
        optimizer.zero_grad(set_to_none=True)
    loss_fn = row_order_loss(order, len(queries), mask, s, device)
    loss, acc = forward_backward(model, embed, chunks, loss_fn, ec.chunk_size, frozen)
    grad_norm = optimizer_step(model, optimizer, scheduler, ec.max_grad_norm)
    return {"loss": loss.item(), "accuracy": acc.item(), "grad_norm": grad_norm}
