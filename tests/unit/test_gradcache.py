"""GradCache gives the loss and gradients of the uncached computation: on a real (tiny) BERT with
and without dropout, and across 2 gloo ranks with the negatives gathered."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from speed_ray.embed.gradcache import cached_backward
from speed_ray.embed.losses import info_nce
from tests.distributed import run_gloo
from tests.unit.test_losses import _data, _embed

N = 5  # rows: 5 queries, 5 positives, 5 negatives = 15 texts


def chunked(items, size):
    return [items[i : i + size] for i in range(0, len(items), size)]


def texts():
    words = [
        "apt",
        "package",
        "manager",
        "kernel",
        "module",
        "driver",
        "sound",
        "video",
        "game",
        "editor",
        "font",
        "theme",
        "python",
        "perl",
    ]
    return [" ".join(words[i : i + 3 + i % 4]) for i in range(3 * N)]


@pytest.fixture
def model(tiny_bert):
    from speed_ray.embed.model import build_model

    torch.manual_seed(0)
    return build_model(tiny_bert, "mean", 32)


def loss_fn(emb):
    mask = torch.tensor([True, False, True, True, False])
    return info_nce(emb[:N], emb[N : 2 * N], emb[2 * N :], mask, temperature=0.05)


def embed_with(model):
    return lambda chunk: model(dict(model.preprocess(list(chunk))))["sentence_embedding"]


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_cached_equals_uncached_without_dropout(model):
    model.eval()  # no dropout: the full batch at once is the reference
    loss, _ = loss_fn(embed_with(model)(texts()))
    loss.backward()
    want = grads(model)
    model.zero_grad()
    got_loss, _ = cached_backward(embed_with(model), chunked(texts(), 4), loss_fn)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-5)
    got = grads(model)
    assert got.keys() == want.keys() and len(got) > 10
    for name in want:
        # chunks pad to their own lengths, so sums run in another order: float noise only
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5)


def test_cached_replays_dropout(model):
    model.train()  # dropout on: the reference is the same chunks embedded with autograd, same RNG
    embed = embed_with(model)
    torch.manual_seed(7)
    emb = torch.cat([embed(texts()[i : i + 4]) for i in range(0, 3 * N, 4)])
    loss, _ = loss_fn(emb)
    loss.backward()
    want = grads(model)
    model.zero_grad()
    torch.manual_seed(7)
    got_loss, _ = cached_backward(embed, chunked(texts(), 4), loss_fn)
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)


def test_frozen_blocks_run_once_and_give_the_same_gradients(model):
    from speed_ray.embed.model import FrozenBlocks

    model.train()  # dropout on in every block, frozen or not
    frozen = FrozenBlocks(model, 1)
    calls = []
    next(frozen.frozen[0].children()).register_forward_pre_hook(lambda m, a: calls.append(1))
    embed = embed_with(model)
    torch.manual_seed(7)
    emb = torch.cat([embed(texts()[i : i + 4]) for i in range(0, 3 * N, 4)])
    loss, _ = loss_fn(emb)
    loss.backward()
    want = grads(model)
    model.zero_grad()
    calls.clear()
    torch.manual_seed(7)
    got_loss, _ = cached_backward(embed, chunked(texts(), 4), loss_fn, frozen=frozen)
    assert len(calls) == 4  # the frozen block ran in the first pass only (4 chunks), not again
    assert got_loss.item() == pytest.approx(loss.item(), rel=1e-6)
    got = grads(model)
    assert got.keys() == want.keys() and all(".layer.1." in n or "norm" in n.lower() for n in got)
    for name, g in got.items():
        torch.testing.assert_close(g, want[name], rtol=1e-5, atol=1e-7)


def _worker(rank, world, per_rank, path):
    w0, (xq, xp, xn) = _data(world, per_rank)
    w = w0.clone().requires_grad_(True)
    sl = slice(rank * per_rank, (rank + 1) * per_rank)
    items = torch.cat([xq[sl], xp[sl], xn[sl]])  # [3B, 6]
    mask = torch.arange(world * per_rank)[sl] % 3 != 0

    def loss_fn(emb):
        return info_nce(
            emb[:per_rank], emb[per_rank : 2 * per_rank], emb[2 * per_rank :], mask, temperature=0.05
        )

    cached_backward(lambda chunk: _embed(w, chunk), chunked(items, 2), loss_fn)
    grad = w.grad.clone()
    dist.all_reduce(grad)
    if rank == 0:
        torch.save(grad / world, path)


def test_cached_with_gather_equals_the_full_batch(tmp_path):
    world, per_rank = 2, 3
    path = tmp_path / "grad.pt"
    run_gloo(_worker, world, per_rank, str(path))
    w0, (xq, xp, xn) = _data(world, per_rank)
    w = w0.clone().requires_grad_(True)
    mask = torch.arange(world * per_rank) % 3 != 0
    loss, _ = info_nce(_embed(w, xq), _embed(w, xp), _embed(w, xn), mask, temperature=0.05)
    loss.backward()
    torch.testing.assert_close(torch.load(path), w.grad, rtol=1e-5, atol=1e-6)
