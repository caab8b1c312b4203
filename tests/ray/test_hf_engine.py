"""The transformers fallback engine on the tiny random Llama (no Ray needed, but it loads a model)."""

from __future__ import annotations

import pytest

from speed_ray.engines import Request, Sampling, build_generator
from speed_ray.engines.config import EngineConfig
from tests.engine_contract import chat, seeded_rows_do_not_depend_on_their_batch


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from speed_ray.engines.hf_engine import HFGenerator

    return HFGenerator(tiny_llama, max_model_len=512)


def test_seeded_rows_do_not_depend_on_their_batch(engine):
    alone = seeded_rows_do_not_depend_on_their_batch(engine)
    assert alone[0].text != alone[1].text


def test_token_counts_put_the_prompt_on_the_first_completion(engine):
    outs = engine.generate(
        [Request(chat("count me"), seed=1), Request(chat("me too"), seed=2)], Sampling(n=3, max_tokens=8)
    )
    for out in outs:
        assert len(out) == 3
        assert out[0].num_input_tokens > 0 and [c.num_input_tokens for c in out[1:]] == [0, 0]
        assert all(0 < c.num_output_tokens <= 8 and c.finish_reason in ("stop", "length") for c in out)
        assert all(c.error is None for c in out)


def test_greedy_is_deterministic_whatever_the_seed(engine):
    sampling = Sampling(temperature=0.0, max_tokens=10, n=2)
    first = engine.generate([Request(chat("greedy"), seed=1)], sampling)[0]
    second = engine.generate([Request(chat("greedy"), seed=99)], sampling)[0]
    assert [c.text for c in first] == [c.text for c in second]
    assert first[0].text == first[1].text and first[0].num_output_tokens > 0


def test_max_tokens_is_cut_to_the_model_length(tiny_llama):
    from speed_ray.engines.hf_engine import HFGenerator

    short = HFGenerator(tiny_llama, max_model_len=24)
    [[c]] = short.generate([Request(chat("hi"), seed=0)], Sampling(max_tokens=500))
    assert c.num_input_tokens + c.num_output_tokens <= 24


def test_build_generator_knows_the_transformers_kind(tiny_llama):
    gen = build_generator(EngineConfig(kind="transformers"), tiny_llama)
    assert gen.name == tiny_llama
