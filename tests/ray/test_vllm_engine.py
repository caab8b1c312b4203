"""The real vLLM engine (CPU build here, CUDA on GPU machines) on a tiny random model."""

from __future__ import annotations

import json

import pytest

from speed_ray.engines import Request, Sampling
from speed_ray.synth import prompts
from tests.engine_contract import chat, seeded_rows_do_not_depend_on_their_batch

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def engine(tiny_llama):
    from speed_ray.engines.vllm_engine import VllmGenerator

    return VllmGenerator(tiny_llama, dtype="float32", max_model_len=512, kv_cache_gib=0.25)


def test_seeded_rows_do_not_depend_on_their_batch(engine):
    alone = seeded_rows_do_not_depend_on_their_batch(engine)
    assert all(c.num_output_tokens > 0 for c in alone)
    # the prompt is counted once per request, on its first completion
    assert alone[0].num_input_tokens > 0 and alone[1].num_input_tokens == 0


def test_structured_output_is_valid_json(engine):
    schema = prompts.synthesis_schema("sts", max_chars=20)
    reqs = [Request(chat(f"write {i}"), seed=i, json_schema=schema) for i in range(6)]
    outs = engine.generate(reqs, Sampling(max_tokens=200))
    for [c] in outs:
        value = json.loads(c.text, strict=False)  # the grammar allows raw control characters in strings
        assert set(value) == {"S1", "S2", "S3"}
        assert all(isinstance(v, str) and 1 <= len(v) <= 20 for v in value.values())


def test_greedy_decoding_repeats_its_one_sample(engine):
    [out] = engine.generate([Request(chat("hello"), seed=1)], Sampling(temperature=0.0, max_tokens=8, n=3))
    assert len(out) == 3 and len({c.text for c in out}) == 1
    assert [c.num_input_tokens > 0 for c in out] == [True, False, False]
    assert out[0].num_output_tokens > 0 and out[1].num_output_tokens == out[2].num_output_tokens == 0


def test_a_prompt_too_long_for_the_context_is_an_error_row_not_a_failed_batch(engine):
    long = Request(chat("word " * 600), seed=3)
    short = Request(chat("hello"), seed=4)
    too_long, fine = engine.generate([long, short], Sampling(max_tokens=8, n=2))
    assert [c.text for c in too_long] == ["", ""] and too_long[1].error == too_long[0].error
    assert too_long[0].error.startswith("prompt of ") and "max_model_len=512" in too_long[0].error
    assert too_long[0].num_input_tokens > 512 and fine[0].error is None and fine[0].num_output_tokens > 0


def test_engine_argument_names_are_the_fields_of_vllms_engine_args():
    """The config check reads them from vLLM's source; the import gives the same names."""
    import dataclasses

    from vllm.engine.arg_utils import EngineArgs

    from speed_ray.engines.vllm_engine import engine_arg_names

    fields = {f.name for f in dataclasses.fields(EngineArgs) if not f.name.startswith("_")}
    assert engine_arg_names() == fields and "max_num_seqs" in fields
