"""GradCache (Gao et al. 2021, arXiv 2101.06983): a contrastive batch far larger than memory, with
the same loss and gradients as computing it at once. Pure torch; no Ray.

1. Embed the batch chunk by chunk without autograd, remembering each chunk's RNG state.
2. Compute the loss on the detached embeddings (this may all-gather across workers) and backpropagate
   it to the embeddings only.
3. Re-embed each chunk with autograd under its saved RNG state (so dropout masks repeat) and push the
   cached embedding gradients into the parameters.

Peak activation memory is one chunk's, not the batch's. Under DDP every chunk but the last skips
the gradient all-reduce (``no_sync``; under DeepSpeed, the accumulation boundary), so workers
synchronise once per step as in the plain loss. With the lower blocks frozen, step 3 reuses their
outputs from step 1 and runs only the trainable blocks again.
"""

from __future__ import annotations

import contextlib
import functools
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


Backward = Callable[[Callable[[], torch.Tensor], torch.Tensor | None, bool], None]


def plain_backward(forward: Callable[[], torch.Tensor], grad: torch.Tensor | None, last: bool) -> None:
    forward().backward(gradient=grad)


def cached_backward(
    embed: Embed,
    chunks: Sequence[Sequence[Any]],
    loss_fn: Callable[[torch.Tensor], tuple[torch.Tensor, Any]],
    backward: Backward = plain_backward,
    frozen: Any = None,
) -> tuple[torch.Tensor, Any]:
    """Accumulate d loss_fn(embed(all items)) / d params into ``.grad``, one chunk at a time.

    Args:
        embed: maps a chunk of inputs to its [len(chunk), d] embeddings (the model's forward).
        chunks: this worker's inputs for the step, split into forward passes, in the order
            ``loss_fn`` expects once concatenated.
        loss_fn: maps the [N, d] embeddings to (loss, extra); may gather across workers.
        backward: ``backward(forward, grad, last)`` runs ``forward()`` and backpropagates ``grad``
            through it, syncing workers only when ``last`` (DDP's ``no_sync``, DeepSpeed's boundary).
        frozen: an ``embed.model.FrozenBlocks``: the frozen blocks' outputs from the first pass are
            reused in the second, so only the trainable blocks run twice.

    Returns:
        (loss, extra), detached.
    """
    states, reps = [], []
    recording = frozen.record() if frozen is not None else contextlib.nullcontext()
    with torch.no_grad(), recording:
        for chunk in chunks:
            states.append(RandState())
            reps.append(embed(chunk))
    cached = torch.cat(reps).detach().requires_grad_(True)  # [N, d]
    loss, extra = loss_fn(cached)
    loss.backward()  # gradients reach the cached embeddings only
    grads = torch.split(cached.grad, [len(r) for r in reps])  # type: ignore[arg-type]
    for i, (chunk, state, grad) in enumerate(zip(chunks, states, grads, strict=True)):
        reuse = frozen.replay(i) if frozen is not None else contextlib.nullcontext()
        with state.replay(), reuse:
            backward(functools.partial(embed, chunk), grad, i == len(chunks) - 1)
    return loss.detach(), extra
