"""InfoNCE with in-batch and hard negatives, gathered across workers. Pure torch (no Ray).

E5/SPEED (arXiv 2401.00368 §3.2, 2410.18634 §3.3): for query q_i, positive d_i+ and the other
documents of the (global) batch,
    loss_i = -log exp(cos(q_i, d_i+)/t) / sum_{d in positives + hard negatives} exp(cos(q_i, d)/t).
Inputs are L2-normalised, so cosine is a dot product; scale = 1/t.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0; gradients flow back to their owners.

    Without an initialised process group (or with one rank) this returns ``x`` unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    from torch.distributed import _functional_collectives as fc

    # all_gather_single_autograd is the newer name (torch 2.13 deprecates the other)
    gather = getattr(fc, "all_gather_single_autograd", None) or fc.all_gather_tensor_autograd

    # The backward of an all-gather is a reduce-scatter: each rank gets the summed gradient of its rows.
    world = dist.group.WORLD
    assert world is not None  # a process group is initialised (checked above)
    return gather(x.contiguous(), gather_dim=0, group=world)


def info_nce(
    q: torch.Tensor,
    pos: torch.Tensor,
    neg: torch.Tensor | None = None,
    neg_mask: torch.Tensor | None = None,
    temperature: float = 0.02,
    symmetric: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean InfoNCE over this rank's queries against the global positives and hard negatives.

    Args:
        q: [B, d] normalised query embeddings of this rank.
        pos: [B, d] normalised positives, row i belongs to q[i].
        neg: [B, K, d] (or [B, d] for K = 1) normalised hard negatives, or None.
        neg_mask: [B, K] (or [B]) bool, True where a hard negative is real (padding is ignored).
        temperature: t in exp(cos/t).
        symmetric: also the document-to-query direction (each positive against the global queries,
            no hard negatives; sentence-transformers' MultipleNegativesSymmetricRankingLoss), averaged.

    Returns:
        (loss, accuracy): the mean loss and the share of queries whose positive scores highest.
    """
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    docs = all_gather_with_grad(pos)  # [W*B, d]
    logits = q @ docs.T / temperature  # [B, W*B]
    if neg is not None:
        if neg.dim() == 2:
            neg = neg[:, None]
            neg_mask = None if neg_mask is None else neg_mask[:, None]
        negs = all_gather_with_grad(neg.flatten(0, 1))  # [W*B*K, d]
        neg_logits = q @ negs.T / temperature  # [B, W*B*K]
        if neg_mask is not None:
            mask = all_gather_with_grad(neg_mask.flatten().float()).bool()  # [W*B*K]
            neg_logits = neg_logits.masked_fill(~mask[None, :], float("-inf"))
        logits = torch.cat([logits, neg_logits], dim=1)  # [B, W*B*(1+K)]
    labels = torch.arange(q.shape[0], device=q.device) + rank * q.shape[0]  # [B]
    loss = F.cross_entropy(logits, labels)
    if symmetric:
        backward = pos @ all_gather_with_grad(q).T / temperature  # [B, W*B]
        loss = (loss + F.cross_entropy(backward, labels)) / 2
    accuracy = (logits.argmax(dim=1) == labels).float().mean()
    return loss, accuracy
