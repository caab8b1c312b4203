"""The HTTP teacher under a misbehaving server: broken bodies, slow answers, transient errors. Every
request ends as text or as error rows (never an exception that would fail the batch), transient
failures are retried with a doubling backoff, and final ones are not retried."""

from __future__ import annotations

import time

import pytest

from speed_ray.engines import Request, Sampling
from speed_ray.engines.openai_http import OpenAIGenerator
from tests.fakes import expected_text

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("no_proxy")]

N = 2
REQUESTS = [Request([{"role": "user", "content": f"q{i}"}], seed=10 + i) for i in range(4)]


def engine(server, **kwargs) -> OpenAIGenerator:
    kwargs = {"backoff_s": 0.01, "timeout_s": 5.0, "max_retries": 2, "max_concurrency": 2} | kwargs
    return OpenAIGenerator(model="fake-model", base_url=server.url, **kwargs)


@pytest.mark.parametrize(
    ("fault", "error", "attempts"),
    [
        ("truncated", "unreachable: ", 3),  # a cut connection may heal: retried
        ("garbage", "bad response after 1 attempt: <html>502 Bad Gateway</html>", 1),
        ("not an object", "bad response after 1 attempt: ", 1),
        ("bad choices", "bad response: not a chat completion (AttributeError)", 1),
        ("no choices", "server returned 0 of 2 choices", 1),
    ],
)
def test_a_broken_answer_becomes_error_rows(server, fault, error, attempts, fault_record):
    server.fault = fault
    eng = engine(server)
    out = eng.generate(REQUESTS, Sampling(n=N))
    assert [len(c) for c in out] == [N] * len(REQUESTS)
    for completions in out:
        for c in completions:
            assert c.text == "" and c.error is not None and c.error.startswith(error), c.error
    assert len(server.bodies) == attempts * len(REQUESTS)
    assert eng.calls == attempts * len(REQUESTS)
    rows = [c for cs in out for c in cs]
    fault_record(
        f"teacher answers 200 with a broken body: {fault}",
        requests=len(REQUESTS),
        http_attempts=len(server.bodies),
        error_rows=sum(c.error is not None for c in rows),
        rows_lost=len(REQUESTS) * N - len(rows),
        error=rows[0].error[:60],
    )


@pytest.mark.parametrize("fault", ["truncated", "slow"])
def test_a_transient_fault_is_retried_to_the_right_answer(server, fault, fault_record):
    if fault == "slow":
        server.slow_first, server.slow_s = 2, 1.0  # past the 0.3 s timeout below
    else:
        server.fault, server.fault_first = fault, 2
    eng = engine(server, timeout_s=0.3, max_concurrency=1)
    out = eng.generate(REQUESTS, Sampling(n=N))
    for r, completions in zip(REQUESTS, out, strict=True):
        assert [c.error for c in completions] == [None] * N
        assert [c.text for c in completions] == [
            expected_text("q" + str(r.seed - 10), r.seed, k) for k in range(N)
        ]
    assert len(server.bodies) == len(REQUESTS) + 2 and eng.failed == 0
    fault_record(
        f"teacher {'answers past the timeout' if fault == 'slow' else 'cuts the body'} for 2 requests",
        requests=len(REQUESTS),
        http_attempts=len(server.bodies),
        error_rows=0,
        rows_lost=0,
    )


def test_backoff_doubles_between_attempts(server, fault_record):
    server.fail_first, server.fail_status = 3, 503
    eng = engine(server, backoff_s=0.1, max_retries=3, max_concurrency=1)
    started = time.time()
    out = eng.generate(REQUESTS[:1], Sampling(n=1))
    assert out[0][0].error is None and len(server.bodies) == 4
    waited = time.time() - started
    assert waited >= 0.1 + 0.2 + 0.4  # waits of 0.1, 0.2 and 0.4 s
    fault_record(
        "teacher answers 503 three times",
        http_attempts=len(server.bodies),
        seconds=round(waited, 2),
        error_rows=0,
    )
    assert [eng._delay(k, None) for k in range(4)] == [0.1, 0.2, 0.4, 0.8]
    assert eng._delay(9, 2.5) == 2.5 and eng._delay(20, None) == 60.0  # Retry-After wins; capped


def test_rate_limited_answers_wait_for_retry_after_then_succeed(server, fault_record):
    server.fail_first, server.fail_status = 2, 429  # with Retry-After: 0
    eng = engine(server, backoff_s=30.0, max_concurrency=1)  # a backoff this long would time the test out
    started = time.time()
    out = eng.generate(REQUESTS[:2], Sampling(n=1))
    assert [c[0].error for c in out] == [None, None] and time.time() - started < 5
    assert len(server.bodies) == 4
    fault_record("teacher answers 429 with Retry-After: 0, twice", http_attempts=4, error_rows=0)
