"""The embed stage alone under Ray Train with 2 workers: plain and through GradCache (DDP no_sync)."""

from __future__ import annotations

import time

import pytest
import torch

from speed_ray.config import load_config
from speed_ray.schemas import EXAMPLES, cast_rows, read_manifest, write_stage


def examples(n):
    return [
        {
            "id": str(i),
            "instruction": "Find the package",
            "query": f"tool number {i} for files",
            "positive": f"A program that handles files, version {i}.",
            "negative": None if i % 2 else "An unrelated game.",
        }
        for i in range(n)
    ]


@pytest.mark.parametrize("chunk_size", [0, 3])
def test_embed_trains_every_layer(tmp_path, tiny_bert, beir_tiny, ray_session, chunk_size):
    from sentence_transformers import SentenceTransformer

    from speed_ray.pipeline import embed

    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=e",
            f"embed.model={tiny_bert}",
            "embed.pooling=mean",
            "embed.batch_size=4",
            "embed.steps=2",
            "embed.learning_rate=1e-2",
            f"embed.chunk_size={chunk_size}",
            f"eval.retrieval_dir={beir_tiny}",
        ],
    )
    write_stage(
        cfg.run_dir / "synth/examples", [cast_rows(examples(12), EXAMPLES)], EXAMPLES, {}, time.time()
    )
    embed.run(cfg)
    manifest = read_manifest(cfg.run_dir / "embed/model")
    assert [h["step"] for h in manifest["history"]] == [1, 2]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in manifest["history"])
    assert manifest["global_batch"] == 8
    trained = SentenceTransformer(str(cfg.run_dir / "embed/model"), device="cpu").state_dict()
    base = SentenceTransformer(tiny_bert, device="cpu").state_dict()
    encoder = [k for k in base if ".encoder.layer." in k]
    assert encoder and all(not torch.equal(base[k], trained[k]) for k in encoder)
    # the exported folder reproduces the trainer's own embeddings
    probe = manifest["probe"]
    again = SentenceTransformer(str(cfg.run_dir / "embed/model"), device="cpu").encode(probe["texts"])
    torch.testing.assert_close(torch.tensor(again), torch.tensor(probe["embeddings"]), rtol=0, atol=1e-6)


def test_embed_on_corpus_crops_last_block_only(tmp_path, tiny_bert, beir_tiny, ray_session):
    import json

    from sentence_transformers import SentenceTransformer

    from speed_ray.data import read_labelled
    from speed_ray.pairs import build_pairs
    from speed_ray.pipeline import embed
    from tests.conftest import DEBIAN

    docs = read_labelled(DEBIAN / "labelled.jsonl")[:300]
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps(d) + "\n" for d in docs))
    want_pairs, want_skipped = build_pairs(docs, "crops")
    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=c",
            f"embed.model={tiny_bert}",
            "embed.data.source=corpus",
            f"embed.data.path={corpus}",
            "embed.batch_size=4",
            "embed.steps=3",
            "embed.warmup_steps=1",
            "embed.learning_rate=1e-2",
            "embed.train_last_blocks=1",
            f"eval.retrieval_dir={beir_tiny}",
        ],
    )
    embed.run(cfg)
    manifest = read_manifest(cfg.run_dir / "embed/model")
    assert manifest["data"]["documents"] == 300
    assert manifest["data"]["pairs"] == len(want_pairs) == manifest["train_rows"]
    assert sum(manifest["data"]["skipped"].values()) == len(want_skipped)
    # warm-up over 1 step, then linear decay to 0 at step 3
    assert [round(h["lr"], 6) for h in manifest["history"]] == [0.0, 0.01, 0.005]
    trained = SentenceTransformer(str(cfg.run_dir / "embed/model"), device="cpu").state_dict()
    base = SentenceTransformer(tiny_bert, device="cpu").state_dict()
    first = [k for k in base if ".encoder.layer.0." in k]
    last = [k for k in base if ".encoder.layer.1." in k]
    assert all(torch.equal(base[k], trained[k]) for k in first)  # frozen
    assert all(not torch.equal(base[k], trained[k]) for k in last)
