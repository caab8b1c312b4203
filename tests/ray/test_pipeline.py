"""The quickstart pipeline end to end on local Ray with tiny random models (real vLLM, TRL, Ray
Train, sentence-transformers and mteb code paths), then a rerun that skips every finished step."""

from __future__ import annotations

import json

import pytest
import yaml

from speed_ray.cli import main
from speed_ray.schemas import EXAMPLES, GENERATIONS, JUDGMENTS, TASKS, read_manifest, read_stage
from tests.conftest import REPO

pytestmark = pytest.mark.vllm


def tiny_overrides(tmp_path, beir):
    return [
        f"run.output_dir={tmp_path}",
        "run.name=tiny",
        "synth.num_topics=8",
        *[
            f"synth.{eng}.{key}"
            for eng in ("engine", "judge", "reviser")
            for key in ("model=tiny-llama", "dtype=float32", "kv_cache_gib=0.25", "max_model_len=2048")
        ],
        "synth.sampling.max_tokens=160",
        "synth.sampling.max_field_chars=40",
        "align.model=tiny-llama",
        "embed.model=tiny-bert",
        "embed.pooling=cls",
        "embed.steps=3",
        "embed.batch_size=2",
        f"eval.retrieval_dir={beir}",
    ]


def test_quickstart_on_tiny_models(tmp_path, beir_tiny, model_cache, ray_session, capsys):
    args = ["run", str(REPO / "configs" / "quickstart.yaml"), *tiny_overrides(tmp_path, beir_tiny)]
    assert main(args) == 0
    run = tmp_path / "tiny"

    # resolved config saved
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["synth"]["engine"]["model"] == "tiny-llama" and saved["run"]["name"] == "tiny"

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
    acc = read_manifest(run / "synth/generations")["accounting"]
    assert acc["calls"] == tasks["error"].null_count
    assert acc["output_tokens"] == sum(gens["num_output_tokens"].to_pylist()) > 0

    # align: junior and senior model folders that transformers (and so vLLM) load
    from transformers import AutoModelForCausalLM

    for name in ("junior", "senior"):
        manifest = read_manifest(run / "align" / name)
        assert manifest["steps"] == 2 and len(manifest["history"]) == 2
        AutoModelForCausalLM.from_pretrained(run / "align" / name)

    # embed: an ST folder that reproduces the trainer's model
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(run / "embed/model"), device="cpu")
    assert model.encode(["hello"]).shape == (1, 32)
    history = [json.loads(line) for line in (run / "embed/metrics.jsonl").read_text().splitlines()]
    assert [h["step"] for h in history] == [1, 2, 3]

    # eval: mteb results in mteb's layout, and the report
    ev = read_manifest(run / "eval")
    assert set(ev["scores"]) == {"base", "trained"}
    assert all(0.0 <= s["ndcg_at_10"] <= 1.0 for s in ev["scores"].values())
    assert (
        run / "eval/results/speed-ray__trained/no_revision_available/DebianPackageRetrieval.json"
    ).is_file()
    report = (run / "report.md").read_text()
    assert "nDCG@10" in report and "| trained |" in report and (run / "training.png").is_file()
    assert "| generations | vllm:`tiny-llama` |" in report and "MinHash dedup" in report
    assert f"report: {run / 'report.md'}" in capsys.readouterr().out

    # a rerun finds every step finished and changes no shard
    before = {p: p.read_bytes() for p in run.rglob("*.parquet")}
    assert main(args) == 0
    assert {p: p.read_bytes() for p in run.rglob("*.parquet")} == before
