"""Embedding model helpers: last-N-block training on encoders and decoders, and pair files."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from speed_ray.embed.model import build_model, train_last_blocks, transformer_blocks
from speed_ray.io.data import read_pairs


@pytest.mark.parametrize(("fixture", "pooling"), [("tiny_bert", "mean"), ("tiny_llama", "lasttoken")])
def test_last_block_only_and_no_graph_below_it(request, fixture, pooling):
    model = build_model(request.getfixturevalue(fixture), pooling, 32)
    blocks = transformer_blocks(model)
    assert len(blocks) == 2
    trainable = train_last_blocks(model, 1)
    assert trainable == sum(p.numel() for p in blocks[1].parameters()) + sum(
        p.numel() for n, p in model[0].auto_model.named_parameters() if n.startswith("norm.")
    )
    assert not any(p.requires_grad for p in blocks[0].parameters())
    seen = {}
    blocks[0].register_forward_hook(
        lambda m, i, o: seen.__setitem__(0, (o[0] if isinstance(o, tuple) else o).requires_grad)
    )
    blocks[1].register_forward_hook(
        lambda m, i, o: seen.__setitem__(1, (o[0] if isinstance(o, tuple) else o).requires_grad)
    )
    emb = model(dict(model.preprocess(["a package manager", "a font"])))["sentence_embedding"]
    assert seen == {0: False, 1: True}  # the frozen block built no autograd graph
    emb.sum().backward()
    assert all(p.grad is not None for p in blocks[1].parameters())


def test_train_last_blocks_range(tiny_bert):
    with pytest.raises(ValueError, match="expected 1..2 for this model, got 3"):
        train_last_blocks(build_model(tiny_bert, "mean", 32), 3)


def test_read_pairs_from_each_format(tmp_path):
    rows = [
        {"anchor": "a", "positive": "p", "negative_2": "m", "negative_10": "o", "negative_1": "n"},
        {"anchor": "b", "positive": "q", "negative_2": None, "negative_10": "", "negative_1": None},
    ]
    want = [
        {"anchor": "a", "positive": "p", "negatives": ["n", "m", "o"]},
        {"anchor": "b", "positive": "q", "negatives": []},
    ]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    from datasets import Dataset

    Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    for path in ("p.jsonl", "p.parquet", "ds"):
        assert read_pairs(tmp_path / path) == want
    (tmp_path / "bad.jsonl").write_text('{"anchor": "a"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:1: missing keys \['positive'\]"):
        read_pairs(tmp_path / "bad.jsonl")
    (tmp_path / "ragged.jsonl").write_text(
        '{"anchor": "a", "positive": "p"}\n{"anchor": "b", "positive": "q", "negative_1": "n"}\n'
    )
    assert [r["negatives"] for r in read_pairs(tmp_path / "ragged.jsonl")] == [[], ["n"]]
    (tmp_path / "bad2.jsonl").write_text('{"anchor": "a", "positive": "p"}\n{"anchor": "a", "positive": 3}\n')
    with pytest.raises(ValueError, match=r"bad2.jsonl:2: positive: expected a string, got int"):
        read_pairs(tmp_path / "bad2.jsonl")


def test_grad_flows_only_where_trainable(tiny_bert):
    model = build_model(tiny_bert, "mean", 32)
    train_last_blocks(model, 2)
    emb = model(dict(model.preprocess(["x y"])))["sentence_embedding"]
    emb.sum().backward()
    assert model[0].auto_model.embeddings.word_embeddings.weight.grad is None
    assert torch.count_nonzero(transformer_blocks(model)[0].output.dense.weight.grad) > 0


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_bert"])
def test_embed_dropout_switches_dropout_on(request, fixture):
    """A decoder ships with no dropout: two training-mode passes agree, so dropout pairs would be
    identical; ``dropout`` sets every dropout probability and the passes differ."""
    path = request.getfixturevalue(fixture)
    texts = ["a package for reading mail", "tools to resize images"]

    def two_passes(model):
        model.train()
        features = model.tokenize(texts)
        torch.manual_seed(0)
        first = model(dict(features))["sentence_embedding"]
        second = model(dict(features))["sentence_embedding"]
        return first, second

    own = build_model(path, "mean", 16)
    on = build_model(path, "mean", 16, dropout=0.3)
    config = on[0].auto_model.config
    probabilities = [v for k, v in config.to_dict().items() if k.endswith(("dropout", "dropout_prob"))]
    assert probabilities and all(p == 0.3 for p in probabilities if p is not None)
    if fixture == "tiny_llama":
        assert torch.equal(*two_passes(own))  # no dropout at all in a Llama-family decoder
    first, second = two_passes(on)
    assert not torch.allclose(first, second)


def test_training_on_another_runs_synthetic_rows_and_a_sample_of_them(tmp_path):
    import time

    from speed_ray.config import load_config
    from speed_ray.embed.driver import training_data
    from speed_ray.io.schemas import EXAMPLES, TRIPLETS, cast_rows, write_stage
    from speed_ray.synth.speed import training_triplets

    rows = [
        {
            "id": f"e{i}",
            "instruction": f"i{i}",
            "query": f"q{i}",
            "positive": f"p{i}",
            "negative": f"n{i}" if i % 2 else "",
        }
        for i in range(10)
    ]
    synth = tmp_path / "synth-run" / "synth"
    examples = cast_rows(rows, EXAMPLES)
    write_stage(synth / "train", [training_triplets(examples)], TRIPLETS, {}, time.time())  # what embed reads
    base = [f"run.output_dir={tmp_path}", "run.name=embed-run", f"embed.data.path={tmp_path / 'synth-run'}"]
    data, info = training_data(load_config(None, base))
    rows = data.all_rows()
    assert [r["query"] for r in rows] == [f"q{i}" for i in range(10)]
    assert rows[1] == {"instruction": "i1", "query": "q1", "positive": "p1", "negatives": ["n1"]}
    assert rows[0]["negatives"] == [] and data.max_negatives == 1
    assert info["rows_available"] == 10 and info["path"] == str(synth / "train")
    assert data.shards[0].path == str(tmp_path / "embed-run" / "embed" / "data" / "shard_00000.parquet")
    small, _ = training_data(load_config(None, [*base, "embed.data.max_rows=3"]), tmp_path / "small")
    larger, _ = training_data(load_config(None, [*base, "embed.data.max_rows=6"]), tmp_path / "larger")
    assert len(small) == 3 and len(larger) == 6
    assert all(r in larger.all_rows() for r in small.all_rows())
    with pytest.raises(FileNotFoundError, match=r"nowhere/synth/train: no _manifest.json"):
        training_data(load_config(None, [*base[:2], f"embed.data.path={tmp_path / 'nowhere'}"]))


def test_an_instructed_query_splits_back_into_its_instruction_and_query():
    from speed_ray.embed.model import format_query
    from speed_ray.io.schemas import instructed_query, split_query

    text = instructed_query("Find the package", "resize images\nfast")
    assert text == "Instruct: Find the package\nQuery: resize images\nfast"
    assert split_query(text) == ("Find the package", "resize images\nfast")
    # decoders see the anchor as written, encoders the bare query (the project's rule for instructions)
    assert format_query(*split_query(text), "lasttoken") == text
    assert format_query(*split_query(text), "mean") == "resize images\nfast"
    for plain in ("resize images", "Instruct: \nQuery: x", "Query: x", ""):
        assert split_query(plain) == (None, plain)
    assert instructed_query(None, "q") == instructed_query("", "q") == "q"
