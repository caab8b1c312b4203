"""The real vLLM engine (CPU build here, CUDA on GPU machines) on a tiny random model."""

from __future__ import annotations

import json

import pytest

from speed_ray import prompts
from speed_ray.engines import Request, Sampling

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from speed_ray.engines.vllm_engine import VllmGenerator

    return VllmGenerator(tiny_llama, dtype="float32", max_model_len=512, kv_cache_gib=0.25)


def chat(text):
    return [{"role": "user", "content": text}]


def test_seeded_rows_do_not_depend_on_their_batch(engine):
    a = Request(chat("hello one"), seed=11)
    b = Request(chat("hello two"), seed=22)
    sampling = Sampling(temperature=1.0, max_tokens=12, n=2)
    alone = engine.generate([a], sampling)[0]
    together = engine.generate([b, a], sampling)[1]
    assert [c.text for c in alone] == [c.text for c in together]
    assert len(alone) == 2 and all(c.num_output_tokens > 0 and c.num_input_tokens > 0 for c in alone)


def test_structured_output_is_valid_json(engine):
    schema = prompts.synthesis_schema("sts", max_chars=20)
    reqs = [Request(chat(f"write {i}"), seed=i, json_schema=schema) for i in range(6)]
    outs = engine.generate(reqs, Sampling(max_tokens=200))
    for [c] in outs:
        value = json.loads(c.text, strict=False)  # the grammar allows raw control characters in strings
        assert set(value) == {"S1", "S2", "S3"}
        assert all(isinstance(v, str) and 1 <= len(v) <= 20 for v in value.values())
