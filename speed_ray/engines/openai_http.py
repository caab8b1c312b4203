"""OpenAI-compatible HTTP engine: a remote "teacher" model behind ``/v1/chat/completions``.

It works with OpenAI, ``vllm serve`` and any server that speaks the chat-completions API, so a
pipeline can draw its data from a model too large to run in a Ray actor. It needs only the
standard library. One POST per request, run on a small thread pool under a shared rate limit;
connection errors, timeouts, 429 and 5xx are retried with exponential backoff (or the server's
``Retry-After``). A request that still fails yields ``n`` empty completions carrying an ``error``,
so one bad row never stops a batch. The API key is read from an environment variable and kept
out of every message, error string and repr.
"""

from __future__ import annotations

import http.client
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

from speed_ray.engines import Completion, Request, Sampling
from speed_ray.engines.config import EngineConfig

logger = logging.getLogger(__name__)

MAX_DELAY_S = 60.0
"""Upper bound on one wait between attempts, whatever the backoff or ``Retry-After`` asks for."""

BODY_CHARS = 200
"""How much of an error body is kept in a completion's ``error``."""


class EngineUnreachable(RuntimeError):
    """The server cannot be used at all (down, wrong URL, bad key): a setup error, not a row error."""


@dataclass(frozen=True)
class _Failure:
    """One failed attempt. ``what`` reads as "http 503" or "unreachable: timed out"."""

    what: str
    retryable: bool
    detail: str = ""
    retry_after: float | None = None

    def describe(self, attempts: int) -> str:
        plural = "attempt" if attempts == 1 else "attempts"
        tail = f": {self.detail}" if self.detail else ""
        return f"{self.what} after {attempts} {plural}{tail}"


class _RateLimiter:
    """Spaces request starts at least ``1 / per_second`` apart across all threads (0 = no limit)."""

    def __init__(self, per_second: float) -> None:
        self.interval = 1.0 / per_second if per_second > 0 else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        time.sleep(start - now)


class OpenAIGenerator:
    """Chat completions from an OpenAI-compatible server.

    Args:
        model: Model name the server knows (also this engine's ``name``).
        base_url: API root including the version, e.g. ``http://localhost:8000/v1``.
        api_key_env: Environment variable holding the API key; None sends no key.
        timeout_s: Per-attempt timeout (connect and read).
        max_retries: Retries after the first attempt for retryable failures.
        backoff_s: First backoff; attempt ``k`` waits ``backoff_s * 2**k`` (at most ``MAX_DELAY_S``).
        max_concurrency: Requests in flight at once.
        requests_per_second: Shared limit on attempts started per second (0 = no limit).
        structured_output: Send a request's JSON schema as ``response_format``; off for servers
            that reject it (callers repair JSON anyway).
        seed: Accepted so one engine config builds every engine; each request already carries its
            own seed, and that is what the server gets.
    """

    @classmethod
    def from_config(cls, config: EngineConfig, model: str, seed: int = 0) -> OpenAIGenerator:
        """From the config's own fields only: the key is read from ``api_key_env``, never stored."""
        assert config.base_url is not None, "checked by EngineConfig.validate"
        return cls(
            model,
            config.base_url,
            config.api_key_env,
            config.timeout_s,
            config.max_retries,
            max_concurrency=config.max_concurrency,
            requests_per_second=config.requests_per_second,
            seed=seed,
        )

    def __init__(
        self,
        model: str,
        base_url: str,
        api_key_env: str | None = None,
        timeout_s: float = EngineConfig.timeout_s,
        max_retries: int = EngineConfig.max_retries,
        backoff_s: float = 1.0,
        max_concurrency: int = EngineConfig.max_concurrency,
        requests_per_second: float = EngineConfig.requests_per_second,
        structured_output: bool = True,
        seed: int = 0,
    ) -> None:
        self.name = model
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_concurrency = max_concurrency
        self.structured_output = structured_output
        self.seed = seed
        self.calls = 0
        self.failed = 0
        self._key = _read_key(api_key_env)
        self._limiter = _RateLimiter(requests_per_second)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"OpenAIGenerator(model={self.name!r}, base_url={self.base_url!r}, "
            f"api_key_env={self.api_key_env!r})"
        )

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        workers = min(self.max_concurrency, len(requests))
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="openai-http") as pool:
            return list(pool.map(lambda r: self._generate_one(r, sampling), requests))

    def check_reachable(self) -> None:
        """GET ``{base_url}/models`` once; raise ``EngineUnreachable`` saying what to check if it fails."""
        url = f"{self.base_url}/models"
        try:
            with urllib.request.urlopen(self._http_request(url), timeout=self.timeout_s) as resp:
                resp.read()
        except urllib.error.HTTPError as e:
            raise EngineUnreachable(self._http_error_hint(url, e.code)) from None
        except (OSError, http.client.HTTPException) as e:
            raise EngineUnreachable(
                f"cannot reach {url}: {self._redact(_reason(e))}; check that the server is running "
                "and that base_url is right (it includes the /v1 prefix)"
            ) from None

    def _http_error_hint(self, url: str, status: int) -> str:
        if status in (401, 403) and self.api_key_env:
            return f"{url} answered http {status}: check the API key in ${self.api_key_env}"
        if status in (401, 403):
            return f"{url} answered http {status}: the server wants an API key; set api_key_env"
        return f"{url} answered http {status}; check base_url (it includes the /v1 prefix)"

    def _generate_one(self, request: Request, sampling: Sampling) -> list[Completion]:
        reply = self._call(self._body(request, sampling))
        if not isinstance(reply, str):
            try:
                return _completions(reply, sampling.n)
            except (AttributeError, TypeError, ValueError) as e:  # JSON, but not a chat completion
                reply = f"bad response: not a chat completion ({type(e).__name__})"
        self._count(failed=1)
        logger.warning("%s: request with seed %d failed: %s", self.name, request.seed, reply)
        return [Completion("", 0, 0, error=reply) for _ in range(sampling.n)]

    def _body(self, request: Request, sampling: Sampling) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.name,
            "messages": request.messages,
            "n": sampling.n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "max_tokens": sampling.max_tokens,
            "seed": request.seed,
        }
        if request.json_schema is not None and self.structured_output:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "output", "schema": request.json_schema, "strict": True},
            }
        return body

    def _call(self, body: dict[str, Any]) -> dict[str, Any] | str:
        """The parsed response, or an error string once retries are spent or the failure is final."""
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            self._count(calls=1)
            outcome = self._attempt(body)
            if not isinstance(outcome, _Failure):
                return outcome
            if not outcome.retryable or attempt == self.max_retries:
                return outcome.describe(attempt + 1)
            delay = self._delay(attempt, outcome.retry_after)
            logger.info("%s: %s, retrying in %.1f s", self.name, outcome.what, delay)
            time.sleep(delay)
        raise AssertionError("unreachable: the loop returns on its last attempt")

    def _attempt(self, body: dict[str, Any]) -> dict[str, Any] | _Failure:
        url = f"{self.base_url}/chat/completions"
        try:
            with urllib.request.urlopen(self._http_request(url, body), timeout=self.timeout_s) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            return self._http_failure(e)
        except (OSError, http.client.HTTPException) as e:
            return _Failure(f"unreachable: {self._redact(_reason(e))}", retryable=True)
        try:
            return dict(json.loads(raw))
        except (ValueError, TypeError):
            return _Failure("bad response", retryable=False, detail=self._short(raw))

    def _http_failure(self, e: urllib.error.HTTPError) -> _Failure:
        try:
            raw = e.read()
        except (OSError, http.client.HTTPException):
            raw = b""
        return _Failure(
            f"http {e.code}",
            retryable=e.code == 429 or e.code >= 500,
            detail=self._short(raw),
            retry_after=_retry_after(e.headers.get("Retry-After") if e.headers else None),
        )

    def _http_request(self, url: str, body: dict[str, Any] | None = None) -> urllib.request.Request:
        headers = {"Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        if body is None:
            return urllib.request.Request(url, headers=headers, method="GET")
        headers["Content-Type"] = "application/json"
        return urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        wanted = retry_after if retry_after is not None else self.backoff_s * 2**attempt
        return min(wanted, MAX_DELAY_S)

    def _count(self, calls: int = 0, failed: int = 0) -> None:
        with self._lock:
            self.calls += calls
            self.failed += failed

    def _short(self, raw: bytes) -> str:
        text = " ".join(raw.decode("utf-8", errors="replace").split())
        return self._redact(text[:BODY_CHARS])

    def _redact(self, text: str) -> str:
        # A misconfigured proxy or server may echo the Authorization header back in its error body.
        return text.replace(self._key, "***") if self._key else text


def _read_key(api_key_env: str | None) -> str | None:
    if api_key_env is None:
        return None
    if api_key_env not in os.environ:
        raise ValueError(f"api_key_env names ${api_key_env}, which is not set in the environment")
    return os.environ[api_key_env]


def _reason(e: BaseException) -> str:
    """'connection refused' / 'timed out' rather than '<urlopen error [Errno 111] ...>'."""
    cause = e.reason if isinstance(e, urllib.error.URLError) else e
    if isinstance(cause, OSError) and cause.strerror:
        return cause.strerror.lower()
    return str(cause).lower() or type(cause).__name__


def _retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` header; the HTTP-date form falls back to our own backoff."""
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


def _completions(reply: dict[str, Any], n: int) -> list[Completion]:
    """``n`` completions from one response; prompt tokens go on the first one only."""
    choices = sorted(reply.get("choices") or [], key=lambda c: c.get("index", 0))[:n]
    usage = reply.get("usage") or {}
    tokens = _output_tokens(choices, int(usage.get("completion_tokens") or 0))
    out = [
        Completion(
            text=(c.get("message") or {}).get("content") or "",
            num_input_tokens=0,
            num_output_tokens=t,
            finish_reason=c.get("finish_reason"),
        )
        for c, t in zip(choices, tokens, strict=True)
    ]
    missing = f"server returned {len(choices)} of {n} choices"
    out += [Completion("", 0, 0, error=missing) for _ in range(n - len(choices))]
    out[0] = replace(out[0], num_input_tokens=int(usage.get("prompt_tokens") or 0))
    return out


def _output_tokens(choices: list[dict[str, Any]], total: int) -> list[int]:
    """Per-choice counts when the server lists token ids (vLLM with ``return_token_ids``), else
    ``usage.completion_tokens`` split evenly with the remainder on the first choice."""
    if not choices:
        return []
    if all(isinstance(c.get("token_ids"), list) for c in choices):
        return [len(c["token_ids"]) for c in choices]
    share, rest = divmod(total, len(choices))
    return [share + rest] + [share] * (len(choices) - 1)
