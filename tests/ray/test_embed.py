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
