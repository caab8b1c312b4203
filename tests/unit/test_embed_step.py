"""The trainer's own step (``embed.step.train_step``) on a real tiny BERT: 2 gloo ranks under DDP
give the loss and every parameter's gradient of one process on the whole batch, plain and through
GradCache, with K hard negatives (some masked) and the symmetric loss; and the batch order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from speed_ray.embed.batches import CorpusPairs, Rows, batch_texts, global_batch
from speed_ray.embed.config import EmbedConfig
from speed_ray.embed.pairs import CropRule, build_pairs
from speed_ray.embed.step import even_passes, length_passes, train_step
from speed_ray.embed.train import EmbedTrainSettings
from tests.distributed import run_gloo

WORDS = [
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


def rows(n: int) -> list[dict]:
    return [
        {
            "instruction": "Find the package" if i % 2 else None,
            "query": " ".join(WORDS[i % 7 : i % 7 + 2]),
            "positive": " ".join(WORDS[i % 5 : i % 5 + 4 + i % 3]),
            "negatives": [" ".join(WORDS[(i + j) % 9 : (i + j) % 9 + 3]) for j in range(i % 3)],
        }
        for i in range(n)
    ]


STEP = EmbedConfig(pooling="mean", temperature=0.05, symmetric=True, max_grad_norm=0.0, precision="fp32")


def step_grads(model, batch, chunk_size, pass_tokens=0):
    """Loss and gradients of one step; SGD with lr 0 leaves the weights and keeps the gradients."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    ec = replace(STEP, chunk_size=chunk_size, pass_tokens=pass_tokens)
    settings = EmbedTrainSettings(ec, model_path="", num_negatives=2, seed=0, snapshot_dir="")
    metrics = train_step(model, opt, batch, settings)
    inner = model.module if hasattr(model, "no_sync") else model
    return metrics, {n: p.grad.clone() for n, p in inner.named_parameters() if p.grad is not None}


def tiny_model(path):
    from speed_ray.embed.model import build_model

    torch.manual_seed(0)
    model = build_model(path, "mean", 32)
    model.eval()  # no dropout: ranks draw other masks than one process would
    return model


def _rank(rank, world, path, chunk_size, pass_tokens, out):
    model = torch.nn.parallel.DistributedDataParallel(tiny_model(path), find_unused_parameters=True)
    batch = rows(8)[rank * 4 : (rank + 1) * 4]
    metrics, grads = step_grads(model, batch, chunk_size, pass_tokens)
    losses = [torch.zeros(()) for _ in range(world)]
    torch.distributed.all_gather(losses, torch.tensor(metrics["loss"]))
    if rank == 0:
        torch.save({"loss": torch.stack(losses).mean(), "grads": grads}, out)


# (GradCache chunk, pass_tokens): one pass per step; length-sorted passes of <= 24 padded tokens
# (1-4 texts here); GradCache chunks of 3 texts.
@pytest.mark.parametrize(("chunk_size", "pass_tokens"), [(0, 0), (0, 24), (3, 0)])
def test_two_ranks_equal_one_process_on_the_whole_batch(tmp_path, tiny_bert, chunk_size, pass_tokens):
    out = tmp_path / "rank0.pt"
    run_gloo(_rank, 2, tiny_bert, chunk_size, pass_tokens, str(out))
    got = torch.load(out)
    want_metrics, want = step_grads(tiny_model(tiny_bert), rows(8), 0)
    assert got["loss"].item() == pytest.approx(want_metrics["loss"], rel=1e-5)
    assert got["grads"].keys() == want.keys() and len(want) > 20
    for name, g in want.items():
        torch.testing.assert_close(got["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_length_passes_sort_and_cut_by_texts_and_padded_tokens():
    lengths = [9, 3, 5, 3, 40, 6]
    assert length_passes(lengths, 0, 0) == [[1, 3, 2, 5, 0, 4]]  # stable sort, one pass
    # <= 12 padded tokens: 3+3 -> +5 would pad 3 texts to 5 (15); 5+6 -> 9 alone; 40 over the cap alone
    assert length_passes(lengths, 0, 12) == [[1, 3], [2, 5], [0], [4]]
    assert length_passes(lengths, 4, 0) == [[1, 3, 2, 5], [0, 4]]
    assert length_passes([], 3, 12) == []
    # another rank ran 5 passes: the pass with the most padded tokens is halved first
    assert even_passes([[1, 3, 2, 5], [0, 4]], lengths, 3) == [[1, 3, 2, 5], [0], [4]]
    assert even_passes([[1, 3, 2, 5], [0], [4]], lengths, 5) == [[1, 3], [2], [5], [0], [4]]
    with pytest.raises(ValueError, match="cannot split 6 texts into 7"):
        even_passes([[0]], lengths, 7)


def test_masked_negatives_and_query_format():
    q, p, n, mask = batch_texts(rows(3), "lasttoken", 2)
    assert q[0] == "apt package" and q[1] == "Instruct: Find the package\nQuery: package manager"
    assert n == ["", "", "package manager kernel", "", "manager kernel module", "kernel module driver"]
    assert mask.tolist() == [[False, False], [True, False], [True, True]]
    assert batch_texts(rows(3), "mean", 2)[0][1] == "package manager"  # encoders: no instruction


def test_global_batches_walk_seeded_epochs():
    data = Rows([{"id": i} for i in range(10)])
    seen = [global_batch(data, s, 4, seed=3) for s in range(1, 7)]
    assert [e for e, _ in seen] == [0, 0, 1, 1, 2, 2]  # 2 batches of 4 per epoch, the rest dropped
    first_epoch = [r["id"] for _, b in seen[:2] for r in b]
    assert len(set(first_epoch)) == 8  # no row twice within an epoch
    assert [r["id"] for r in seen[2][1]] != [r["id"] for r in seen[0][1]]  # reshuffled
    assert global_batch(data, 3, 4, seed=3) == seen[2]  # a function of the step alone
    with pytest.raises(ValueError, match="10 training rows, fewer than one global batch of 16"):
        global_batch(data, 1, 16, seed=0)


def test_corpus_pairs_are_cropped_anew_each_epoch():
    from speed_ray.io.data import read_labelled
    from tests.conftest import DEBIAN

    docs = read_labelled(DEBIAN / "labelled.jsonl.gz")[:200]
    data = CorpusPairs(docs, "crops", CropRule(), seed=0)
    pairs, skipped = build_pairs(docs, "crops", CropRule(), seed=0)
    assert len(data) == len(pairs) and len(pairs) + len(skipped) == 200 and skipped
    e0, e1 = data.epoch(0), data.epoch(1)
    assert [r["query"] for r in e0] == [p["anchor"] for p in pairs]
    assert [r["positive"] for r in e0] == [p["positive"] for p in pairs]
    assert sum(a["query"] != b["query"] for a, b in zip(e0, e1, strict=True)) > len(e0) // 3


def test_report_lines_and_plot_for_the_embedding_model(tmp_path):
    from speed_ray.eval.report_training import embed_lines, plot_embed

    hist = [
        {"step": s, "loss": 2.0 / s, "accuracy": 0.25 * s, "grad_norm": 1.5, "examples_per_s": e}
        for s, e in [(1, 10.0), (2, 30.0), (3, 20.0)]
    ]
    man = {
        "base_model": "tiny",
        "finetune": "full",
        "trainable_params": 12345,
        "workers": 2,
        "global_batch": 64,
        "hard_negatives": 0,
        "epochs": 1.5,
        "train_rows": 128,
        "history": hist,
        "data": {
            "source": "corpus",
            "documents": 200,
            "pairs": 128,
            "pair_mode": "crops",
            "skipped": {"0 crops, need 2": 72},
        },
        "resumed_from_step": 2,
    }
    assert embed_lines(man) == [
        "- full fine-tuning, 12,345 trainable parameters, 2 worker(s), global batch 64 (0 hard negative(s) "
        "per query), 1.5 epochs of 128 rows",
        "- in-batch accuracy 0.250 -> 0.750, grad norm 1.5 -> 1.5, median 20.0 examples/s",
        "- 200 documents -> 128 crops pairs per epoch; 72 documents too short for a pair: {'0 crops, need 2': 72}",
        "- resumed from the checkpoint of step 2",
    ]
    assert plot_embed({"embed": man}, tmp_path / "embed.png") == "embed.png"
    assert (tmp_path / "embed.png").stat().st_size > 10_000
