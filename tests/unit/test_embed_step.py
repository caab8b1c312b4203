"""The trainer's own step (``embed.step.train_step``) on a real tiny BERT: 2 gloo ranks under DDP
give the loss and every parameter's gradient of one process on the whole batch, plain and through
GradCache, with K hard negatives (some masked) and the symmetric loss; and the batch order."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from speed_ray.embed.batches import batch_texts, global_batch
from speed_ray.embed.config import EmbedConfig
from speed_ray.embed.data import TrainingData, WorkerBatches, write_docs, write_rows
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
    data = [{"id": i} for i in range(10)]
    seen = [global_batch(data, s, 4, seed=3) for s in range(1, 7)]
    assert [e for e, _ in seen] == [0, 0, 1, 1, 2, 2]  # 2 batches of 4 per epoch, the rest dropped
    first_epoch = [r["id"] for _, b in seen[:2] for r in b]
    assert len(set(first_epoch)) == 8  # no row twice within an epoch
    assert [r["id"] for r in seen[2][1]] != [r["id"] for r in seen[0][1]]  # reshuffled
    assert global_batch(data, 3, 4, seed=3) == seen[2]  # a function of the step alone
    with pytest.raises(ValueError, match="10 training rows, fewer than one global batch of 16"):
        global_batch(data, 1, 16, seed=0)


def test_corpus_pairs_are_cropped_anew_each_epoch(tmp_path):
    from speed_ray.io.data import read_labelled
    from tests.conftest import DEBIAN

    docs = read_labelled(DEBIAN / "labelled.jsonl.gz")[:200]
    held_out = {docs[0]["id"], docs[5]["id"]}
    data, info = write_docs(tmp_path / "data", iter(docs), held_out, "crops", CropRule(), seed=0)
    kept = [d for d in docs if d["id"] not in held_out]
    pairs, skipped = build_pairs(kept, "crops", CropRule(), seed=0)
    assert len(data) == len(pairs) and len(pairs) + len(skipped) == 198 and skipped
    assert info["documents"] == 198 and info["pairs"] == len(pairs) and info["held_out"] == 2
    assert (
        sum(info["skipped"].values()) == len(skipped)
        and info["skipped_ids"] == [s["id"] for s in skipped][:100]
    )
    e0, e1 = data.all_rows(0), data.all_rows(1)
    assert [r["query"] for r in e0] == [p["anchor"] for p in pairs]  # as if the corpus were cropped whole
    assert [r["positive"] for r in e0] == [p["positive"] for p in pairs]
    assert sum(a["query"] != b["query"] for a, b in zip(e0, e1, strict=True)) > len(e0) // 3


def sharded_rows(tmp_path, n: int, monkeypatch) -> tuple[TrainingData, list[dict]]:
    """``n`` rows written as shards of 7 (so a batch spans shards), and the rows as written."""
    from speed_ray.embed import data as embed_data

    monkeypatch.setattr(embed_data, "SHARD_ROWS", 7)
    pairs = [{"anchor": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"] * (i % 3)} for i in range(n)]
    data = write_rows(tmp_path / "data", iter(pairs), n, 0, seed=5)
    want = [
        {"instruction": None, "query": f"q{i}", "positive": f"p{i}", "negatives": [f"n{i}"] * (i % 3)}
        for i in range(n)
    ]
    return data, want


@pytest.mark.parametrize("world,per_worker,window", [(1, 4, 3), (2, 3, 1), (3, 2, 100)])
def test_each_rank_reads_its_slice_of_the_global_batch_from_the_shards(
    tmp_path, monkeypatch, world, per_worker, window
):
    from speed_ray.embed import data as embed_data

    data, rows = sharded_rows(tmp_path, 50, monkeypatch)
    assert data.counts == (7,) * 7 + (1,) and data.max_negatives == 2 and data.all_rows() == rows
    monkeypatch.setattr(embed_data, "WINDOW_ROWS", window * per_worker)
    ranks = [WorkerBatches(data, per_worker, world, r, seed=5) for r in range(world)]
    size = per_worker * world
    for step in range(1, 3 * (50 // size) + 2):  # three epochs and a step into the fourth
        epoch, whole = global_batch(rows, step, size, seed=5)
        slices = [rank(step) for rank in ranks]
        assert all(e == epoch for e, _ in slices)
        assert [r for _, mine in slices for r in mine] == whole
    # a worker holds one window of batches: its reads are the windows walked, not the steps
    per_epoch = 50 // size
    assert ranks[0].reads == 3 * -(-per_epoch // max(1, window)) + 1


def test_a_resumed_worker_takes_the_batches_of_an_uninterrupted_one(tmp_path, monkeypatch):
    from speed_ray.embed import data as embed_data
    from speed_ray.embed.data import rows_digest

    data, _ = sharded_rows(tmp_path, 40, monkeypatch)
    monkeypatch.setattr(embed_data, "WINDOW_ROWS", 8)
    whole = WorkerBatches(data, 4, 2, 1, seed=5)
    walked = [rows_digest(whole(s)[1]) for s in range(1, 21)]
    resumed = WorkerBatches(data, 4, 2, 1, seed=5)  # a fresh worker, started at a checkpoint's step 13
    assert [rows_digest(resumed(s)[1]) for s in range(13, 21)] == walked[12:]


def test_a_nested_sample_of_rows_is_written_in_input_order(tmp_path):
    pairs = [
        {"anchor": f"Instruct: find\nQuery: q{i}", "positive": f"p{i}", "negatives": []} for i in range(20)
    ]
    small = write_rows(tmp_path / "small", iter(pairs), 20, 5, seed=1).all_rows()
    large = write_rows(tmp_path / "large", iter(pairs), 20, 12, seed=1).all_rows()
    assert len(small) == 5 and len(large) == 12 and all(r in large for r in small)
    assert [int(r["query"][1:]) for r in large] == sorted(int(r["query"][1:]) for r in large)
    assert small[0]["instruction"] == "find"


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
