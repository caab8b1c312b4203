"""The OpenAI-compatible HTTP engine against a fake chat-completions server on 127.0.0.1.

The server runs in this process (one daemon thread per connection). Each choice's content is JSON
echoing the last user message, the request seed and the choice index, so every expected text is
known. Usage: ``prompt_tokens`` = length of the last user message, ``completion_tokens`` = 3n + 1.
"""

from __future__ import annotations

import socket
import time
import traceback
from typing import Any

import pytest

from speed_ray.engines import Request, Sampling, build_generator
from speed_ray.engines.config import EngineConfig
from speed_ray.engines.openai_http import EngineUnreachable, OpenAIGenerator
from tests.fakes import FakeServer, expected_text

KEY = "sk-test-5ecret-value"

pytestmark = pytest.mark.usefixtures("no_proxy")


def engine(server: FakeServer, **kwargs: Any) -> OpenAIGenerator:
    kwargs = {"backoff_s": 0.001, "timeout_s": 5.0} | kwargs
    return OpenAIGenerator(model="fake-model", base_url=server.url, **kwargs)


def requests(k: int, **kwargs: Any) -> list[Request]:
    return [
        Request([{"role": "user", "content": f"question {i}" + "!" * i}], seed=100 + i, **kwargs)
        for i in range(k)
    ]


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_texts_come_back_in_request_order_with_n_choices(server):
    server.stagger = True
    reqs = requests(5)
    outs = engine(server, max_concurrency=5).generate(reqs, Sampling(n=2))
    expected = [[expected_text(r.messages[-1]["content"], r.seed, i) for i in range(2)] for r in reqs]
    assert [[c.text for c in out] for out in outs] == expected
    assert all(c.error is None and c.finish_reason == "stop" for out in outs for c in out)


def test_request_body_carries_sampling_and_seed(server):
    engine(server).generate(requests(1), Sampling(temperature=0.7, top_p=0.9, max_tokens=33, n=3))
    [body] = server.bodies
    assert body == {
        "model": "fake-model",
        "messages": [{"role": "user", "content": "question 0"}],
        "n": 3,
        "temperature": 0.7,
        "top_p": 0.9,
        "max_tokens": 33,
        "seed": 100,
    }


def test_token_accounting_counts_the_prompt_once_and_splits_usage(server):
    """n=2: completion_tokens = 7 split 4 + 3; 3 requests of 10, 11, 12 prompt characters."""
    outs = engine(server).generate(requests(3), Sampling(n=2))
    assert [[c.num_input_tokens for c in out] for out in outs] == [[10, 0], [11, 0], [12, 0]]
    assert [[c.num_output_tokens for c in out] for out in outs] == [[4, 3]] * 3
    assert sum(c.num_input_tokens for out in outs for c in out) == 10 + 11 + 12
    assert sum(c.num_output_tokens for out in outs for c in out) == 3 * 7


def test_per_choice_token_ids_win_over_the_usage_split(server):
    server.token_ids = True
    [out] = engine(server).generate(requests(1), Sampling(n=3))
    assert [c.num_output_tokens for c in out] == [2, 3, 4]


def test_missing_choices_are_padded_with_errors(server):
    server.choices = 1
    [out] = engine(server).generate(requests(1), Sampling(n=3))
    assert out[0].error is None and out[0].text
    assert [c.error for c in out[1:]] == ["server returned 1 of 3 choices"] * 2
    assert out[0].num_input_tokens == 10 and sum(c.num_input_tokens for c in out) == 10


@pytest.mark.parametrize("status", [500, 429])
def test_retries_succeed_after_k_failures(server, status):
    """429 carries Retry-After: 0, which must win over the (here 5 s) backoff."""
    server.fail_first, server.fail_status = 3, status
    gen = engine(server, max_concurrency=2, backoff_s=0.001 if status == 500 else 5.0)
    start = time.monotonic()
    outs = gen.generate(requests(4), Sampling(n=2))
    assert time.monotonic() - start < 2.0
    assert all(c.error is None and c.text for out in outs for c in out)
    assert (gen.calls, gen.failed) == (3 + 4, 0)


@pytest.mark.parametrize("status", [400, 401, 404])
def test_client_errors_are_not_retried(server, status):
    server.status = status
    gen = engine(server)
    [out] = gen.generate(requests(1), Sampling(n=2))
    assert (gen.calls, gen.failed) == (1, 1)
    assert all(
        c.text == "" and c.error and c.error.startswith(f"http {status} after 1 attempt:") for c in out
    )


def test_exhausted_retries_give_error_rows_and_the_run_goes_on(server):
    """One at a time: request 0 gets 503, 503 (out of attempts); request 1 gets 503, then 200."""
    server.fail_first, server.fail_status = 3, 503
    gen = engine(server, max_retries=1, max_concurrency=1)
    first, second = gen.generate(requests(2), Sampling(n=2))
    assert [c.text for c in first] == ["", ""]
    assert all(c.error == 'http 503 after 2 attempts: {"error": "try again later"}' for c in first)
    assert all(c.error is None and c.text for c in second)
    assert (gen.calls, gen.failed) == (4, 1)


def test_a_timeout_becomes_an_error_completion(server):
    server.sleep_s = 0.5
    gen = engine(server, timeout_s=0.1, max_retries=1)
    [out] = gen.generate(requests(1), Sampling(n=2))
    assert [c.error for c in out] == ["unreachable: timed out after 2 attempts"] * 2
    assert (gen.calls, gen.failed) == (2, 1)


def test_an_unreachable_server_becomes_error_completions():
    gen = OpenAIGenerator(model="m", base_url=closed_port_url(), max_retries=2, backoff_s=0.001)
    [out] = gen.generate(requests(1), Sampling())
    assert out[0].error == "unreachable: connection refused after 3 attempts"


def test_peak_concurrency_stays_within_max_concurrency(server):
    server.sleep_s = 0.05
    engine(server, max_concurrency=3).generate(requests(12), Sampling())
    assert 1 < server.peak <= 3


def test_rate_limit_spaces_requests(server):
    n, rate = 6, 25.0
    gen = engine(server, requests_per_second=rate, max_concurrency=4)
    start = time.monotonic()
    gen.generate(requests(n), Sampling())
    assert time.monotonic() - start >= (n - 1) / rate


def test_the_key_reaches_the_server_but_no_message(server, monkeypatch):
    monkeypatch.setenv("FAKE_API_KEY", KEY)
    gen = engine(server, api_key_env="FAKE_API_KEY")
    gen.generate(requests(1), Sampling())
    assert server.headers[0]["Authorization"] == f"Bearer {KEY}"
    assert KEY not in repr(gen) and KEY not in str(gen)

    server.status = 401  # the error body echoes the Authorization header back
    [out] = gen.generate(requests(1), Sampling())
    assert out[0].error and "rejected Bearer ***" in out[0].error and KEY not in out[0].error

    with pytest.raises(EngineUnreachable) as info:
        gen.check_reachable()
    assert "check the API key in $FAKE_API_KEY" in str(info.value)
    assert KEY not in "".join(traceback.format_exception(info.value))


def test_the_key_stays_out_of_logs(server, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_API_KEY", KEY)
    server.status = 403
    with caplog.at_level("DEBUG"):
        engine(server, api_key_env="FAKE_API_KEY").generate(requests(1), Sampling())
    assert caplog.records and KEY not in caplog.text


def test_a_missing_key_variable_is_named():
    with pytest.raises(ValueError, match=r"\$SPEED_RAY_NO_SUCH_KEY"):
        OpenAIGenerator(model="m", base_url="http://127.0.0.1:1/v1", api_key_env="SPEED_RAY_NO_SUCH_KEY")


@pytest.mark.parametrize(
    ("with_schema", "structured_output", "sent"),
    [(True, True, True), (True, False, False), (False, True, False)],
)
def test_response_format_only_with_a_schema_and_structured_output(
    server, with_schema, structured_output, sent
):
    schema = {"type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}
    reqs = requests(1, json_schema=schema if with_schema else None)
    engine(server, structured_output=structured_output).generate(reqs, Sampling())
    expected = {"type": "json_schema", "json_schema": {"name": "output", "schema": schema, "strict": True}}
    assert server.bodies[0].get("response_format") == (expected if sent else None)


def test_check_reachable_passes_on_a_live_server(server):
    engine(server).check_reachable()


def test_check_reachable_names_the_url_and_cause_of_a_closed_port():
    url = closed_port_url()
    with pytest.raises(EngineUnreachable, match="connection refused") as info:
        OpenAIGenerator(model="m", base_url=url, timeout_s=2.0).check_reachable()
    assert f"{url}/models" in str(info.value)


def test_build_generator_knows_the_openai_kind(server):
    gen = build_generator(EngineConfig(kind="openai", base_url=server.url), "fake-model")
    assert isinstance(gen, OpenAIGenerator) and gen.name == "fake-model"
    with pytest.raises(ValueError, match="'vllm', 'transformers' or 'openai'"):
        build_generator(EngineConfig(kind="llamacpp"), "m")
