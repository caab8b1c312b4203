"""GradCache (Gao et al. 2021, arXiv 2101.06983): a contrastive batch far larger than memory, with
the same loss and gradients as computing it at once. Pure torch; no Ray.

1. Embed the batch chunk by chunk without autograd, remembering each chunk's RNG state.
2. Compute the loss on the detached embeddings (this may all-gather across workers) and backpropagate
   it to the embeddings only.
3. Re-embed each chunk with autograd under its saved RNG state (so dropout masks repeat) and push the
   cached embedding gradients into the parameters.

Peak activation memory is one chunk's, not the batch's. Under DDP every chunk but the last skips
the gradient all-reduce (``no_sync``), so workers synchronise once per step as in the plain loss.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

Embed = Callable[[Sequence[Any]], torch.Tensor]


class RandState:
    """The CPU (and current CUDA device) RNG state, to replay a forward pass's dropout."""

    def __init__(self) -> None:
        self.cpu = torch.get_rng_state()
        self.cuda = torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None

    @contextlib.contextmanager
    def replay(self) -> Iterator[None]:
        devices = [torch.cuda.current_device()] if self.cuda is not None else []
        with torch.random.fork_rng(devices=devices):
            torch.set_rng_state(self.cpu)
            if self.cuda is not None:
                torch.cuda.set_rng_state(self.cuda)
            yield


def chunked(items: Sequence[Any], size: int) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def cached_backward(
    embed: Embed,
    items: Sequence[Any],
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    chunk_size: int,
    no_sync: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> tuple[torch.Tensor, Any]:
    """Accumulate d loss_fn(embed(items)) / d params into ``.grad``, ``chunk_size`` items at a time.

    Args:
        embed: maps a chunk of inputs to its [len(chunk), d] embeddings (the model's forward).
        items: all inputs of this worker's step, in the order ``loss_fn`` expects.
        loss_fn: maps the [len(items), d] embeddings to (loss, extra); may gather across workers.
        chunk_size: inputs per forward pass.
        no_sync: DDP's ``model.no_sync``; used for every chunk but the last.

    Returns:
        (loss, extra), detached.
    """
    chunks = chunked(items, chunk_size)
    states, reps = [], []
    with torch.no_grad():
        for chunk in chunks:
            states.append(RandState())
            reps.append(embed(chunk))
    cached = torch.cat(reps).requires_grad_(True)  # [N, d]
    loss, extra = loss_fn(cached)
    loss.backward()  # gradients reach the cached embeddings only
    grads = chunked(cached.grad, chunk_size)  # type: ignore[arg-type]
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
        last = i == len(chunks) - 1
        sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
        with sync, state.replay():
            embed(chunk).backward(gradient=grad)
    return loss.detach(), extra
