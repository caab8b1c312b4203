"""The embed stage alone under Ray Train with 2 workers: through GradCache (DDP no_sync) and plain,
synth rows, corpus crops and pairs files, DeepSpeed, resume after a killed worker, decoder export."""

from __future__ import annotations

import time

import pytest
import torch
import yaml

from speed_ray.config import load_config
from speed_ray.io.schemas import FILTERED, cast_rows, read_manifest, write_stage


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


def synth_rows(cfg, n):
    """synth/filtered (the rows the filters kept, none mined), and synth/train made from it by the
    synth stage's step (what embed reads)."""
    from speed_ray.synth.driver import training_set_step

    synth = cfg.run_dir / "synth"
    rows = [r | {"mined_negatives": []} for r in examples(n)]
    write_stage(synth / "filtered", [cast_rows(rows, FILTERED)], FILTERED, {}, time.time())
    training_set_step(cfg, synth)


def test_embed_trains_every_layer_through_gradcache(tmp_path, tiny_bert, beir_tiny, ray_session):
    from sentence_transformers import SentenceTransformer

    from speed_ray.embed import driver as embed

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
            "embed.chunk_size=3",  # the plain step runs end to end in the tests below
            f"eval.retrieval.path={beir_tiny}",
        ],
    )
    synth_rows(cfg, 12)
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

    from speed_ray.embed import driver as embed
    from speed_ray.embed.pairs import build_pairs
    from speed_ray.io.data import read_labelled
    from tests.conftest import DEBIAN

    docs = read_labelled(DEBIAN / "labelled.jsonl.gz")[:300]
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
            f"eval.retrieval.path={beir_tiny}",
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


def pairs_file(path, n):
    """A user's pairs in the sentence-transformers convention, with up to 2 hard negatives per row."""
    import json

    rows = []
    for i in range(n):
        row = {
            "anchor": f"tool number {i} for files",
            "positive": f"A program that handles files, version {i}.",
        }
        if i % 3:
            row["negative_1"] = f"An unrelated game, level {i}."
        if i % 3 == 2:
            row["negative_2"] = f"A font of style {i}."
        rows.append(json.dumps(row))
    path.write_text("\n".join(rows) + "\n")
    return path


def embed_cfg(tmp_path, name, model, data, *extra):
    return load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            f"run.name={name}",
            f"embed.model={model}",
            "embed.data.source=pairs",
            f"embed.data.path={data}",
            "embed.hard_negatives=2",
            "embed.learning_rate=1e-3",
            "embed.temperature=0.05",
            "embed.resources.cpus_per_worker=1",
            *extra,
        ],
    )


def weights(folder):
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(folder), device="cpu").state_dict()


@pytest.mark.faults
def test_a_killed_worker_resumes_and_matches_the_uninterrupted_run(
    tmp_path, tiny_bert, beir_tiny, ray_session, fault_record
):
    import os
    import signal
    import threading

    from speed_ray.embed import driver as embed
    from tests.distributed import registered_checkpoint, train_worker_pids

    data = pairs_file(tmp_path / "pairs.jsonl", 40)
    common = ["embed.steps=150", "embed.save_steps=25", "embed.batch_size=4", "embed.warmup_steps=10"]
    common += [f"eval.retrieval.path={beir_tiny}"]
    whole = embed.run(embed_cfg(tmp_path, "whole", tiny_bert, data, *common))
    cfg = embed_cfg(tmp_path, "killed", tiny_bert, data, *common)
    result: dict = {}

    def run() -> None:
        try:
            result["manifest"] = embed.run(cfg)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            result["error"] = e

    thread = threading.Thread(target=run)
    thread.start()
    deadline = time.time() + 300
    while not registered_checkpoint(cfg.run_dir / "ray" / "embed"):
        assert thread.is_alive(), f"training ended before its first checkpoint: {result}"
        assert time.time() < deadline, "no checkpoint within 300 s"
        time.sleep(0.05)
    pids = train_worker_pids()
    assert len(pids) == 2, pids
    os.kill(pids[1], signal.SIGKILL)
    thread.join(timeout=600)
    assert "error" not in result, result.get("error")
    resumed = result["manifest"]
    assert resumed["resumed_from_step"] >= 25 and resumed["resumed_from_step"] % 25 == 0
    assert [h["step"] for h in resumed["history"]] == list(range(1, 151))
    # the same batches, dropout masks, optimizer and schedule: the same run
    for a, b in zip(whole["history"], resumed["history"], strict=True):
        assert (a["lr"], a["epoch"], a["batch"]) == (b["lr"], b["epoch"], b["batch"])
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-6), a["step"]
    w0, w1 = weights(cfg.run_dir.parent / "whole/embed/model"), weights(cfg.run_dir / "embed/model")
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-5, atol=1e-6, msg=k)
    fault_record(
        "embedding training worker SIGKILL mid-epoch (2 DDP workers)",
        resumed_from_step=resumed["resumed_from_step"],
        steps=150,
        max_weight_difference=max(float((w1[k] - w0[k]).abs().max()) for k in w0),
    )


@pytest.mark.slow  # two worker groups, ~2.5 min; the default suite trains ZeRO-2 + gather once below
def test_deepspeed_zero2_with_the_gather_and_gradcache_matches_ddp(
    tmp_path, tiny_bert, beir_tiny, ray_session
):
    from speed_ray.embed import driver as embed

    data = pairs_file(tmp_path / "pairs.jsonl", 16)
    common = ["embed.steps=3", "embed.batch_size=4", "embed.chunk_size=3", f"eval.retrieval.path={beir_tiny}"]
    ddp = embed.run(embed_cfg(tmp_path, "ddp", tiny_bert, data, *common))
    zero = embed.run(embed_cfg(tmp_path, "zero2", tiny_bert, data, *common, "embed.deepspeed_stage=2"))
    assert zero["global_batch"] == 8 and zero["hard_negatives"] == 2
    for a, b in zip(ddp["history"], zero["history"], strict=True):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-3)
    w0, w1 = weights(tmp_path / "ddp/embed/model"), weights(tmp_path / "zero2/embed/model")
    base = weights(tiny_bert)
    assert all(not torch.equal(base[k], w1[k]) for k in base if ".encoder.layer." in k)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], rtol=1e-3, atol=1e-5, msg=k)


def test_decoder_lora_last_block_exports_merged_with_its_query_prompt(
    tmp_path, tiny_llama, beir_tiny, ray_session
):
    import json

    from sentence_transformers import SentenceTransformer

    from speed_ray.embed import driver as embed

    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=dec",
            f"embed.model={tiny_llama}",
            "embed.pooling=lasttoken",
            "embed.batch_size=4",
            "embed.steps=2",
            "embed.learning_rate=1e-2",
            "embed.chunk_size=3",
            "embed.train_last_blocks=1",
            "embed.query_instruction=Find the package",
            f"eval.retrieval.path={beir_tiny}",
        ],
    )
    synth_rows(cfg, 12)
    manifest = embed.run(cfg)
    out = cfg.run_dir / "embed/model"
    assert manifest["finetune"] == "lora"
    model = SentenceTransformer(str(out), device="cpu")
    assert model.prompts["query"] == "Instruct: Find the package\nQuery: "
    assert not any("lora" in k for k in model.state_dict())  # merged into the weights
    assert json.loads((out / "1_Pooling/config.json").read_text())["pooling_mode"] == "lasttoken"
    trained, base = model.state_dict(), SentenceTransformer(tiny_llama, device="cpu").state_dict()
    changed = {k.split(".layers.")[1].split(".")[0] for k in base if not torch.equal(base[k], trained[k])}
    assert changed == {"1"}  # LoRA sat in the last block only
    probe = manifest["probe"]
    for kw, key in (({}, "embeddings"), ({"prompt_name": "query"}, "query_embeddings")):
        again = model.encode(probe["texts"], **kw)
        torch.testing.assert_close(torch.tensor(again), torch.tensor(probe[key]), rtol=0, atol=1e-5)
    # sentence-transformers' own model card: the base model and the training set in its metadata
    readme = (out / "README.md").read_text()
    meta = yaml.safe_load(readme.split("---\n")[1])
    assert meta["base_model"] == tiny_llama and meta["datasets"] == ["dec/synth/train"]
    assert "model.encode_query(queries)" in readme  # the saved query prompt, used by encode_query


SLOW = pytest.mark.slow  # more DeepSpeed worker groups: minutes on a 2-core box


@pytest.mark.parametrize(
    ("stage", "precision"),
    [
        (2, "fp32"),  # ZeRO-2 with the cross-worker gather and GradCache: in the default suite
        pytest.param(3, "fp32", marks=SLOW),
        pytest.param(2, "bf16", marks=SLOW),
        pytest.param(0, "bf16", marks=SLOW),
    ],
)
def test_zero_stages_and_bf16_train_and_export(tmp_path, tiny_bert, beir_tiny, ray_session, stage, precision):
    from sentence_transformers import SentenceTransformer

    from speed_ray.embed import driver as embed

    data = pairs_file(tmp_path / "pairs.jsonl", 16)
    extra = [f"embed.deepspeed_stage={stage}", f"embed.precision={precision}", "embed.chunk_size=3"]
    cfg = embed_cfg(tmp_path, "zero", tiny_bert, data, "embed.steps=2", "embed.batch_size=4", *extra)
    cfg.eval.retrieval.path = str(beir_tiny)
    manifest = embed.run(cfg)
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in manifest["history"])
    trained, base = weights(cfg.run_dir / "embed/model"), weights(tiny_bert)
    assert any(not torch.equal(base[k], trained[k]) for k in base if ".encoder.layer." in k)
    again = SentenceTransformer(str(cfg.run_dir / "embed/model"), device="cpu").encode(
        manifest["probe"]["texts"]
    )
    tol = 1e-5 if precision == "fp32" else 2e-2  # bf16 weights in training, fp32 after export
    torch.testing.assert_close(
        torch.tensor(again), torch.tensor(manifest["probe"]["embeddings"]), rtol=0, atol=tol
    )
