"""The SPEED pipeline end to end on local Ray: configs/speed-cpu.yaml with tiny random models and an
HTTP teacher (a local OpenAI-compatible fake that answers every prompt from its JSON schema, fails
some calls and gives some unusable verdicts), through the real vLLM, TRL, Ray Train,
sentence-transformers and mteb code paths: align (teacher -> junior -> senior, revisor), synth with
the senior and the revisor loaded by vLLM from the run, embed, eval, report; then a rerun that skips
every finished step. The quickstart differs only in turning align off and generating with the base
model."""

from __future__ import annotations

import json

import pytest
import yaml

from speed_ray.cli import main
from speed_ray.io.schemas import (
    EXAMPLES,
    FILTERED,
    GENERATIONS,
    JUDGMENTS,
    PREFERENCE_PAIRS,
    TASKS,
    TRIPLETS,
    read_manifest,
    read_stage,
)
from tests.conftest import REPO, TEST_API_KEY_ENV
from tests.fakes import FakeTeacher

pytestmark = pytest.mark.vllm


TINY_ENGINE = ("dtype=float32", "kv_cache_gib=0.25", "max_model_len=2048")


def teacher(key: str, url: str) -> list[str]:
    settings = ("kind=openai", "model=teacher", f"base_url={url}", f"api_key_env={TEST_API_KEY_ENV}")
    return [f"{key}.{s}" for s in (*settings, "num_cpus=0.25", "max_retries=1")]


def tiny_overrides(tmp_path, beir, url):
    return [
        f"run.output_dir={tmp_path}",
        "run.name=tiny",
        "align.model=tiny-llama",
        *teacher("align.teacher", url),
        *[f"align.generator.{k}" for k in TINY_ENGINE],  # the model stays run:align/junior
        "align.without_verdict=drop",
        "align.num_topics=8",
        "align.examples_per_task=1",
        "align.samples_per_prompt=3",
        *[f"align.{m}.{k}" for m in ("junior", "senior", "revisor") for k in ("steps=2", "batch_size=2")],
        "align.max_length=2048",
        "synth.num_topics=8",
        *[f"synth.{eng}.{k}" for eng in ("engine", "reviser") for k in TINY_ENGINE],  # run:align/...
        *[
            f"synth.{eng}.{k}"
            for eng in ("brainstormer", "judge")
            for k in ("model=tiny-llama", *TINY_ENGINE)
        ],
        "synth.sampling.samples_per_prompt=2",
        "synth.sampling.max_tokens=160",
        "synth.sampling.max_field_chars=40",
        "embed.model=tiny-bert",
        "embed.pooling=cls",
        "embed.steps=3",
        "embed.batch_size=2",
        f"eval.retrieval.path={beir}",
    ]


def test_speed_pipeline_on_tiny_models(tmp_path, beir_tiny, model_cache, ray_session, capsys):
    with FakeTeacher(fail_every=11, tie_every=3) as fake:
        args = [
            "run",
            str(REPO / "configs" / "speed-cpu.yaml"),
            *tiny_overrides(tmp_path, beir_tiny, fake.url),
        ]
        assert main(args) == 0
        check_run(tmp_path / "tiny", capsys)
        # a rerun finds every step finished, calls no model and changes no shard
        before = {p: p.read_bytes() for p in (tmp_path / "tiny").rglob("*.parquet")}
        calls = fake.requests
        assert main(args) == 0
        assert {p: p.read_bytes() for p in (tmp_path / "tiny").rglob("*.parquet")} == before
        assert fake.requests == calls


def check_run(run, capsys) -> None:
    # resolved config saved
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["synth"]["engine"]["model"] == "run:align/senior" and saved["run"]["name"] == "tiny"

    # align: the teacher's seed data; the junior's 3 samples per prompt; the teacher's verdicts
    align = run / "align"
    seed = read_stage(align / "seed", GENERATIONS)
    root = read_stage(align / "root", GENERATIONS)
    prompts = set(seed["id"].to_pylist())
    assert set(root["id"].to_pylist()) == prompts and root.num_rows == 3 * len(prompts)
    assert read_manifest(align / "root")["model"] == "run:align/junior"  # the junior, served by vLLM
    assert read_manifest(align / "junior")["rows_in"] == seed["error"].null_count  # failed calls left out
    judgments = read_stage(align / "judgments", JUDGMENTS)
    assert sorted(judgments["example_id"].to_pylist()) == sorted(prompts)
    # pairs: the verdicts that parsed (best 1, worst 0); ties and failed calls dropped, by reason
    pairs = read_stage(align / "pairs", PREFERENCE_PAIRS).to_pylist()
    dropped = read_manifest(align / "pairs")["dropped"]
    verdicts = judgments["error"].null_count
    assert len(pairs) == verdicts and sum(dropped.values()) == len(prompts) - verdicts
    ties = sum("best and worst are the same" in (e or "") for e in judgments["error"].to_pylist())
    assert ties > 0 and dropped["judge: best and worst are the same output"] == ties
    by_id = {(r["id"], r["sample"]): r["raw"] for r in root.to_pylist()}
    # in TRL's conversational preference format, which the senior's DPO trained on as it is
    assert all(
        p["chosen"] == [{"role": "assistant", "content": by_id[(p["id"], 1)]}]
        and p["rejected"] == [{"role": "assistant", "content": by_id[(p["id"], 0)]}]
        and p["prompt"] == json.loads(next(r["messages"] for r in root.to_pylist() if r["id"] == p["id"]))
        for p in pairs
    )
    revisions = read_stage(align / "revisions", GENERATIONS)
    assert set(revisions["prompt_id"].to_pylist()) <= prompts
    from transformers import AutoModelForCausalLM

    for name, data in (("junior", "align/seed"), ("senior", "align/pairs"), ("revisor", "align/revisions")):
        manifest = read_manifest(align / name)
        assert manifest["steps"] == 2 and len(manifest["history"]) == 2 and manifest["data"] == data
        assert (align / name / "README.md").read_text().startswith(f"# speed-ray `{name}`")
        AutoModelForCausalLM.from_pretrained(align / name)
    assert read_manifest(align / "senior")["base_model"] == str(align / "junior")

    # synth: 8 topics in the 7:7:7:2 mix -> 3 classification, 2 STS, 2 retrieval, 1 text matching
    tasks = read_stage(run / "synth/tasks", TASKS)
    types = tasks["task_type"].to_pylist()
    assert {t: types.count(t) for t in set(types)} == {
        "classification": 3,
        "sts": 2,
        "retrieval": 2,
        "text_matching": 1,
    }
    gens = read_stage(run / "synth/generations", GENERATIONS)
    assert gens.num_rows == 2 * tasks["error"].null_count  # 2 samples per valid task
    # synth generated with the senior and revised with the revisor, both loaded by vLLM from the run
    assert read_manifest(run / "synth/generations")["model"] == "run:align/senior"
    assert read_manifest(run / "synth/revisions")["model"] == "run:align/revisor"
    # the judge saw every prompt; each draft got exactly one revision attempt
    judgments = read_stage(run / "synth/judgments", JUDGMENTS)
    assert sorted(judgments["example_id"].to_pylist()) == sorted(set(gens["id"].to_pylist()))
    drafts = read_stage(run / "synth/drafts", GENERATIONS)
    assert drafts.num_rows == len({r["id"] for r in gens.to_pylist() if r["error"] is None})
    revisions = read_stage(run / "synth/revisions", GENERATIONS)
    assert sorted(revisions["prompt_id"].to_pylist()) == sorted(drafts["id"].to_pylist())
    examples = read_stage(run / "synth/examples", EXAMPLES)
    ex_manifest = read_manifest(run / "synth/examples")
    assert examples.num_rows == drafts.num_rows - ex_manifest["dedup"]["removed"]
    assert set(examples["id"].to_pylist()) <= set(drafts["id"].to_pylist())
    # the filters: every example kept or counted by reason (a random model writes placeholders)
    filtered = read_stage(run / "synth/filtered", FILTERED)
    dropped = read_manifest(run / "synth/filtered")["dropped"]
    assert filtered.num_rows == examples.num_rows - sum(dropped.values())
    assert set(filtered["id"].to_pylist()) <= set(examples["id"].to_pylist())
    # the training set: the kept rows in sentence-transformers' three columns, instruction in the anchor
    train = read_stage(run / "synth/train", TRIPLETS)
    assert train.column_names == ["anchor", "positive", "negative"] and train.num_rows == filtered.num_rows
    assert train["anchor"].to_pylist() == [
        f"Instruct: {e['instruction']}\nQuery: {e['query']}" if e["instruction"] else e["query"]
        for e in filtered.sort_by("id").to_pylist()
    ]
    acc = read_manifest(run / "synth/generations")["accounting"]
    assert acc["calls"] == tasks["error"].null_count
    assert acc["output_tokens"] == sum(gens["num_output_tokens"].to_pylist()) > 0

    # embed: an ST folder that reproduces the trainer's model
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(run / "embed/model"), device="cpu")
    assert model.encode(["hello"]).shape == (1, 32)
    history = [json.loads(line) for line in (run / "embed/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]

    # eval: mteb results in mteb's layout, and the report
    ev = read_manifest(run / "eval")
    assert set(ev["scores"]) == {"base", "trained"}
    assert all(0.0 <= s["DebianPackageRetrieval"]["ndcg_at_10"] <= 1.0 for s in ev["scores"].values())
    assert len(list((run / "eval/results/speed-ray__trained").glob("*/DebianPackageRetrieval.json"))) == 1
    # the trained model's card: sentence-transformers' own, the eval scores added to its metadata
    card = yaml.safe_load((run / "embed/model/README.md").read_text().split("---\n")[1])
    assert card["base_model"] == "tiny-bert" and card["datasets"] == ["tiny/synth/train"]
    [result] = card["model-index"][0]["results"]
    scores = {m["type"]: m["value"] for m in result["metrics"]}
    assert scores["ndcg_at_10"] == pytest.approx(
        ev["scores"]["trained"]["DebianPackageRetrieval"]["ndcg_at_10"]
    )
    report = (run / "report.md").read_text()
    assert "nDCG@10" in report and "| trained |" in report and (run / "training.png").is_file()
    assert "| generations | vllm:`run:align/senior` |" in report and "MinHash dedup" in report
    assert "## Alignment (SPEED §3.2)" in report and "| junior | TRL SFT from `tiny-llama` |" in report
    assert f"- seed: {len(prompts)} calls of the paper's 25,000" in report
    assert f"{ties} judge: best and worst are the same output" in report
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out
