"""The outputs in their ecosystem's formats, each checked with that library's own code: the synthetic
training set trains in sentence-transformers as it is, the preference pairs in TRL's DPOTrainer as they
are, and the embedding model's card is sentence-transformers' own, with the eval scores added."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import pytest
import torch
import yaml

from speed_ray.config import load_config
from speed_ray.io.schemas import (
    EXAMPLES,
    GENERATIONS,
    PREFERENCE_PAIRS,
    TRIPLETS,
    cast_rows,
    read_stage,
    write_stage,
)

INSTRUCTION = "Given a question about software, retrieve the package description that answers it"


def front_matter(readme: Path) -> dict:
    text = readme.read_text()
    assert text.startswith("---\n"), text[:200]
    return yaml.safe_load(text.split("---\n")[1])


# ----------------------------------------------------------------------------------------------
# Synthetic rows -> sentence-transformers


def draft(i: int, negative: str | None) -> dict:
    return {
        "id": f"e{i}",
        "sample": 0,
        "kind": "retrieval",
        "task_type": "retrieval",
        "topic": "software",
        "task": INSTRUCTION,
        "instruction": INSTRUCTION if i % 3 else "",  # an example without instruction keeps a bare anchor
        "query": f"how do I resize photo number {i}",
        "positive": f"an image tool that resizes pictures, release {i}",
        "negative": negative,
        "generator": "tiny",
        "prompt_id": f"e{i}",
        "seed": i,
        "round": "examples",
    }


def synth_train(tmp_path: Path) -> Path:
    """The synth stage's last steps on hand-made drafts, one shard as its workers make it: final rows
    -> examples -> train."""
    from speed_ray.synth import speed

    out = tmp_path / "run" / "synth"
    drafts = cast_rows(
        [draft(i, f"a text editor, version {i}" if i % 2 else None) for i in range(8)], GENERATIONS
    )
    rows = speed.final_rows(drafts, None)
    write_stage(out / "examples", [rows], EXAMPLES, {}, time.time())
    manifest = write_stage(out / "train", [speed.training_triplets(rows)], TRIPLETS, {}, time.time())
    assert manifest["num_rows"] == 8 and manifest["schema"] == ["anchor", "positive", "negative"]
    return out / "train"


def test_synthetic_training_set_trains_in_sentence_transformers_as_it_is(tmp_path, tiny_bert):
    from datasets import Value, load_dataset
    from sentence_transformers import SentenceTransformerTrainer, SentenceTransformerTrainingArguments
    from sentence_transformers.losses import MultipleNegativesRankingLoss

    from speed_ray.embed.model import build_model, format_query

    train = synth_train(tmp_path)
    files = sorted(str(p) for p in train.glob("*.parquet"))
    ds = load_dataset("parquet", data_files=files, split="train")
    assert ds.column_names == ["anchor", "positive", "negative"]
    assert all(ds.features[c] == Value("string") for c in ds.column_names)
    # SPEED/E5's instruction format, written by the function that formats a decoder's queries
    assert ds[1]["anchor"] == f"Instruct: {INSTRUCTION}\nQuery: how do I resize photo number 1"
    assert ds[1]["anchor"] == format_query(INSTRUCTION, "how do I resize photo number 1", "lasttoken")
    assert ds[0]["anchor"] == "how do I resize photo number 0"  # no instruction: the bare query
    assert ds[0]["negative"] == "" and ds[1]["negative"] == "a text editor, version 1"

    model = build_model(tiny_bert, "mean", 32)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = SentenceTransformerTrainingArguments(
        output_dir=str(tmp_path / "st"),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )
    loss = MultipleNegativesRankingLoss(model)
    trainer = SentenceTransformerTrainer(model=model, args=args, train_dataset=ds, loss=loss)  # no mapping
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    after = model.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if ".encoder.layer." in k)


def test_embed_reads_the_synthetic_training_set_through_the_pairs_reader(tmp_path):
    from speed_ray.embed.driver import training_data
    from speed_ray.io.data import read_pairs

    train = synth_train(tmp_path)
    pairs = read_pairs(train)  # the reader of embed.data.source: pairs
    assert pairs[1] == {
        "anchor": f"Instruct: {INSTRUCTION}\nQuery: how do I resize photo number 1",
        "positive": "an image tool that resizes pictures, release 1",
        "negatives": ["a text editor, version 1"],
    }
    assert pairs[0]["negatives"] == []  # an empty negative is no negative
    base = [f"run.output_dir={tmp_path}", "run.name=other", f"embed.data.path={tmp_path / 'run'}"]
    data, info = training_data(load_config(None, base))
    # the instruction comes back apart, so the trainer applies it per pooling as before
    assert data.all_rows()[1] == {
        "instruction": INSTRUCTION,
        "query": "how do I resize photo number 1",
        "positive": "an image tool that resizes pictures, release 1",
        "negatives": ["a text editor, version 1"],
    }
    assert data.all_rows()[0]["instruction"] is None
    assert info == {"source": "synth", "path": str(train), "rows_available": 8}
    same, _ = training_data(
        load_config(None, [*base[:2], "embed.data.source=pairs", f"embed.data.path={train}"]),
        tmp_path / "same",
    )
    assert same.all_rows() == data.all_rows()


# ----------------------------------------------------------------------------------------------
# Preference pairs -> TRL


PROMPTS = ["Name a fruit.", "Name a colour.", "Name a tool.", "Name an animal."]
GOOD = ["An apple.", "Deep blue.", "A hammer.", "A red fox."]
BAD = ["Seven.", "Tuesday.", "Loud.", "Upward."]


def project_pairs(tmp_path: Path) -> Path:
    """align/pairs as the align stage writes it, from hand-made samples and a judge's verdicts."""
    from speed_ray.io.schemas import JUDGMENTS
    from speed_ray.synth import speed

    samples, verdicts = [], []
    for i, (p, good, bad) in enumerate(zip(PROMPTS, GOOD, BAD, strict=True)):
        msgs = json.dumps([{"role": "user", "content": p}])
        for s, raw in enumerate((bad, good)):
            samples.append({"id": f"p{i}", "sample": s, "messages": msgs, "raw": raw, "error": None})
        verdicts.append(
            {"id": f"j{i}", "example_id": f"p{i}", "samples": 2, "best": 1, "worst": 0, "reason": "ok"}
        )
    groups = speed.group_samples(cast_rows(samples, GENERATIONS))
    table, _ = speed.preference_pairs(groups, cast_rows(verdicts, JUDGMENTS))
    out = tmp_path / "align"
    write_stage(out / "pairs", [table], PREFERENCE_PAIRS, {}, time.time())
    return out


def dpo_args(output_dir: Path, batch_size: int = 2):
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(output_dir),
        max_steps=2,
        per_device_train_batch_size=batch_size,
        learning_rate=5e-3,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        seed=0,
    )


def test_preference_pairs_train_in_trls_dpo_trainer_as_they_are(tmp_path, tiny_llama):
    from datasets import load_dataset
    from transformers import AutoTokenizer
    from trl import DPOTrainer

    out = project_pairs(tmp_path)
    files = sorted(str(p) for p in (out / "pairs").glob("*.parquet"))
    ds = load_dataset("parquet", data_files=files, split="train")
    # TRL's conversational preference format (provenance columns beside it)
    assert ds[0]["prompt"] == [{"role": "user", "content": "Name a fruit."}]
    assert ds[0]["chosen"] == [{"role": "assistant", "content": "An apple."}]
    assert ds[0]["rejected"] == [{"role": "assistant", "content": "Seven."}]
    tok = AutoTokenizer.from_pretrained(tiny_llama)
    assert tok.chat_template  # TRL applies it to the conversational rows
    trainer = DPOTrainer(
        model=tiny_llama, args=dpo_args(tmp_path / "dpo"), train_dataset=ds, processing_class=tok
    )
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)  # starts at the reference


def test_the_align_stages_dpo_glue_takes_the_stored_pairs(tmp_path, tiny_llama):
    from speed_ray.align.config import AlignConfig, AlignTrainConfig
    from speed_ray.align.models import training_rows, write_dataset
    from speed_ray.align.train import AlignTrainSettings, build_trainer, load_data

    out = project_pairs(tmp_path)
    rows = training_rows(out, "senior")
    assert rows[1] == {
        "prompt": [{"role": "user", "content": "Name a colour."}],
        "chosen": [{"role": "assistant", "content": "Deep blue."}],
        "rejected": [{"role": "assistant", "content": "Tuesday."}],
    }
    write_dataset(rows, tmp_path / "senior.data")
    align = AlignConfig(
        max_length=128,
        precompute_ref_log_probs=False,
        lora_r=4,
        lora_alpha=8,
        lora_dropout=0.0,
        lora_target_modules=["q_proj", "v_proj"],
    )
    train = AlignTrainConfig(steps=1, learning_rate=5e-3, batch_size=2)
    config = AlignTrainSettings(align, train, "dpo", tiny_llama, str(tmp_path / "senior.data"), seed=0)
    trainer = build_trainer(config, load_data(str(tmp_path / "senior.data")), str(tmp_path / "out"))
    trainer.train()
    assert math.isfinite(trainer.state.log_history[0]["loss"])


def test_users_preference_pairs_in_trls_format_or_the_earlier_one(tmp_path):
    from speed_ray.align.driver import user_step
    from speed_ray.align.models import training_rows

    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a fruit."}]
    trl_row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "An apple."}],
        "rejected": [{"role": "assistant", "content": "Seven."}],
    }
    earlier = {"messages": json.dumps(prompt), "chosen": "An apple.", "rejected": "Seven."}
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(trl_row) + "\n" + json.dumps(earlier) + "\n")
    cfg = load_config(None, [f"run.output_dir={tmp_path}", f"align.pairs_data={path}"])
    out = cfg.run_dir / "align"
    manifest = user_step(cfg, out, "pairs")
    assert manifest["num_rows"] == 2 and manifest["schema"] == PREFERENCE_PAIRS.names
    assert training_rows(out, "senior") == [trl_row, trl_row]
    assert read_stage(out / "pairs", PREFERENCE_PAIRS)["reason"].to_pylist() == ["user data: pairs.jsonl"] * 2


# ----------------------------------------------------------------------------------------------
# The embedding model's card -> sentence-transformers' model card, scores added by the eval stage


def test_model_card_is_sentence_transformers_own_and_gets_the_eval_scores(
    tmp_path, tiny_llama, beir_tiny, ray_session
):
    from sentence_transformers import SentenceTransformer

    from speed_ray.embed.driver import card_info, train_settings
    from speed_ray.embed.export import export
    from speed_ray.embed.model import build_model
    from speed_ray.eval import driver as evaluate
    from speed_ray.io.schemas import write_json_atomic

    cfg = load_config(
        None,
        [
            f"run.output_dir={tmp_path}",
            "run.name=card",
            f"embed.model={tiny_llama}",
            "embed.pooling=lasttoken",
            "embed.finetune=full",
            "embed.max_seq_length=40",
            "embed.query_instruction=Find the package",
            "eval.models=[trained]",
            f"eval.retrieval.path={beir_tiny}",
            "eval.max_seq_length=24",
            "eval.cache=false",
        ],
    )
    data = {"source": "synth", "path": str(tmp_path / "synth-run" / "synth" / "train"), "rows_available": 8}
    config = train_settings(cfg, 1, card_info(cfg, data, 8, 1))
    history = [{"step": 1, "epoch": 0, "loss": 2.5}, {"step": 2, "epoch": 0, "loss": 1.25}]
    out = cfg.run_dir / "embed" / "model"
    state = build_model(tiny_llama, "lasttoken", 40).state_dict()
    export(state, config, str(out), history)  # what a training worker exports
    write_json_atomic(out / "_manifest.json", {"model_card": config.model_card, "history": history})

    meta = front_matter(out / "README.md")
    assert meta["base_model"] == tiny_llama
    assert meta["datasets"] == ["synth-run/synth/train"]
    assert meta["library_name"] == "sentence-transformers" and "speed-ray" in meta["tags"]
    assert "model-index" not in meta  # no scores before eval
    readme = (out / "README.md").read_text()
    assert "speed_ray.embed.losses.info_nce" in readme and "Training Loss" in readme and "1.25" in readme
    assert "**Maximum Sequence Length:** 40 tokens" in readme
    assert "model.encode_query(queries)" in readme  # the usage example of a model with a query prompt
    model = SentenceTransformer(str(out), device="cpu")
    assert model.prompts["query"] == "Instruct: Find the package\nQuery: "

    manifest = evaluate.run(cfg)
    ndcg = manifest["scores"]["trained"]["DebianPackageRetrieval"]["ndcg_at_10"]
    meta = front_matter(out / "README.md")
    assert meta["base_model"] == tiny_llama and meta["datasets"] == ["synth-run/synth/train"]
    [result] = meta["model-index"][0]["results"]
    assert result["dataset"]["type"] == "DebianPackageRetrieval"
    values = {m["type"]: m["value"] for m in result["metrics"]}
    assert values["ndcg_at_10"] == pytest.approx(ndcg)
    assert "ndcg_at_10" in meta["metrics"] and not any(k.startswith("nauc_") for k in values)
    assert "**Maximum Sequence Length:** 40 tokens" in (out / "README.md").read_text()  # not eval's 24
    again = SentenceTransformer(str(out), device="cpu")
    assert again.prompts["query"] == "Instruct: Find the package\nQuery: "
