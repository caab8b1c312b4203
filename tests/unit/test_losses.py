"""InfoNCE against hand computation, and the 2-process gloo gather against the full batch."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from speed_ray.embed.losses import all_gather_with_grad, info_nce
from tests.distributed import run_gloo


def test_in_batch_loss_by_hand():
    # q = p = identity rows, t = 1: logits [[1, 0], [0, 1]]; each loss = -log(e / (e + 1)) = log(1 + 1/e).
    q = torch.eye(2)
    loss, acc = info_nce(q, q.clone(), temperature=1.0)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-1)))
    assert acc.item() == 1.0


def test_hard_negatives_and_mask_by_hand():
    q = torch.eye(2)
    pos = torch.eye(2)
    neg = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    # The mask drops negative column 1 for every query.
    # row 0: logits [1, 0 | 1, -inf]; row 1: [0, 1 | 0, -inf]
    loss, _ = info_nce(q, pos, neg, torch.tensor([True, False]), temperature=1.0)
    e = math.e
    row0 = -math.log(e / (e + 1 + e))
    row1 = -math.log(e / (1 + e + 1))
    assert loss.item() == pytest.approx((row0 + row1) / 2)


def test_gather_is_identity_without_process_group():
    x = torch.randn(3, 4)
    assert all_gather_with_grad(x) is x


def _embed(w, x):
    return F.normalize(x @ w, dim=-1)


def _data(world, per_rank):
    g = torch.Generator().manual_seed(0)
    n = world * per_rank
    return torch.randn(6, 4, generator=g), [torch.randn(n, 6, generator=g) for _ in range(3)]


def _worker(rank, world, per_rank, path):
    w0, (xq, xp, xn) = _data(world, per_rank)
    w = w0.clone().requires_grad_(True)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    mask = torch.arange(world * per_rank)[sl] % 3 != 0
    loss, _ = info_nce(_embed(w, xq[sl]), _embed(w, xp[sl]), _embed(w, xn[sl]), mask, temperature=0.05)
    loss.backward()
    grad = w.grad.clone()
    dist.all_reduce(grad)  # what DDP does, before its division by the world size
    losses = [torch.zeros(()) for _ in range(world)]
    dist.all_gather(losses, loss.detach())
    if rank == 0:
        torch.save({"grad": grad / world, "loss": torch.stack(losses).mean()}, path)


def test_two_gloo_ranks_equal_the_full_batch(tmp_path):
    world, per_rank = 2, 3
    path = tmp_path / "dist.pt"
    run_gloo(_worker, world, per_rank, str(path))
    got = torch.load(path)
    w0, (xq, xp, xn) = _data(world, per_rank)
    w = w0.clone().requires_grad_(True)
    mask = torch.arange(world * per_rank) % 3 != 0
    loss, _ = info_nce(_embed(w, xq), _embed(w, xp), _embed(w, xn), mask, temperature=0.05)
    loss.backward()
    assert got["loss"].item() == pytest.approx(loss.item(), rel=1e-5)
    torch.testing.assert_close(got["grad"], w.grad, rtol=1e-5, atol=1e-6)
