"""A deterministic stand-in engine for stage tests: canned JSON per prompt kind, echoing the seed."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler
from typing import Any

from speed_ray.engines import Completion, Request, Sampling

CANNED = {
    "user_query": '{{"user_query": "query {s}", "positive_document": "relevant text {s}", "hard_negative_document": "other text"}}',
    "input_text": '{{"input_text": "input {s}", "label": "yes", "misleading_label": "no"}}',
    "S1": '{{"S1": "one {s}", "S2": "two", "S3": "three"}}',
    "input": '{{"input": "word {s}", "positive_document": "meaning"}}',
}


class FakeGenerator:
    name = "fake"

    def __init__(self, seconds_per_request: float = 0.0) -> None:
        self.calls = 0
        self.seconds_per_request = seconds_per_request  # a busy engine, for autoscaling tests

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        self.calls += 1
        time.sleep(self.seconds_per_request * len(requests))
        out = []
        for r in requests:
            keys = (r.json_schema or {}).get("required", [])
            if (r.json_schema or {}).get("type") == "array":
                text = json.dumps([f"Task for seed {r.seed}.", "Another task."])
            else:
                text = CANNED[keys[0]].format(s=r.seed) if keys else "free text"
            out.append([Completion(text if k == 0 else "not json", 10, 5 + k) for k in range(sampling.n)])
        return out


class SchemaGenerator(FakeGenerator):
    """Answers every request from its JSON schema as ``FakeTeacher`` does: a task list, an example, a
    verdict (best 1, worst 0) or a revision. A request whose seed is a multiple of ``duplicate_every``
    is answered as seed 0 is, so the examples hold exact duplicates for dedup to find."""

    name = "schema-fake"

    def __init__(self, duplicate_every: int = 0) -> None:
        super().__init__()
        self.duplicate_every = duplicate_every

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        out = []
        for r in requests:
            seed = 0 if self.duplicate_every and r.seed % self.duplicate_every == 0 else r.seed
            texts = [FakeTeacher.answer(r.json_schema or {}, seed, k) for k in range(sampling.n)]
            out.append([Completion(t, 100, 20) for t in texts])
        return out


class DiesOnce(FakeGenerator):
    """A fake engine whose process exits in the middle of its ``die_at``-th batch, the first time only
    (a marker file remembers it across the restarted actor): a generation actor killed mid-batch."""

    def __init__(self, marker: str, die_at: int = 2) -> None:
        super().__init__()
        self.marker, self.die_at = marker, die_at

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        import os

        if self.calls + 1 == self.die_at and not os.path.exists(self.marker):
            with open(self.marker, "w") as f:
                f.write(str(os.getpid()))
            os._exit(1)
        return super().generate(requests, sampling)


class FakeTeacher:
    """An OpenAI-compatible chat server on 127.0.0.1 (a thread of the test process) that answers every
    SPEED prompt from its ``response_format`` schema: a task list, an example, a verdict or a revision.
    Requests whose seed is a multiple of ``fail_every`` get HTTP 400 (not retried): error rows; judge
    requests whose seed is a multiple of ``tie_every`` get best == worst (an unusable verdict).

    Use as a context manager; ``url`` is the base URL, ``requests`` counts chat calls.
    """

    def __init__(self, fail_every: int = 0, tie_every: int = 0) -> None:
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        teacher = self
        self.fail_every, self.tie_every, self.requests, self.auth = fail_every, tie_every, 0, set()

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                self._send(200, {"object": "list", "data": [{"id": "teacher"}]})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                teacher.requests += 1
                teacher.auth.add(self.headers.get("Authorization"))
                if teacher.fail_every and body["seed"] % teacher.fail_every == 0:
                    self._send(400, {"error": {"message": "bad request"}})
                    return
                schema = body.get("response_format", {}).get("json_schema", {}).get("schema", {})
                tie = bool(teacher.tie_every) and body["seed"] % teacher.tie_every == 0
                texts = [teacher.answer(schema, body["seed"], k, tie) for k in range(body["n"])]
                usage = {"prompt_tokens": 100, "completion_tokens": 20 * body["n"]}
                choices = [
                    {"index": k, "message": {"content": t}, "finish_reason": "stop"}
                    for k, t in enumerate(texts)
                ]
                self._send(200, {"choices": choices, "usage": usage})

            def _send(self, status: int, payload: object) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_port}/v1"
        self.thread = threading.Thread(
            target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    @staticmethod
    def answer(schema: dict, seed: int, k: int, tie: bool = False) -> str:
        props = schema.get("properties", {})
        if schema.get("type") == "array":
            return json.dumps([f"Find documents about subject {seed}.", "Another task here."])
        if "best" in props:
            if tie:
                return json.dumps({"reason": "all alike", "best": 0, "worst": 0})
            return json.dumps({"reason": "sample 1 follows the guidelines", "best": 1, "worst": 0})
        if "revision" in props:
            keys = props["revision"]["required"]
            return json.dumps(
                {"reason": "tightened", "revision": {key: f"revised {key} {seed}" for key in keys}}
            )
        keys = schema.get("required", [])
        return json.dumps({key: f"{key} text {seed} sample {k} " + "word " * 12 for key in keys})

    def __enter__(self) -> FakeTeacher:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@dataclass
class FakeServer:
    """Programmable behaviour plus a record of what the client sent."""

    url: str = ""
    fail_first: int = 0
    """Answer the first K chat requests with ``fail_status``."""
    fault: str = ""
    """A broken answer with status 200: ``truncated`` (half the promised bytes, then hang up),
    ``garbage`` (not JSON), ``not an object`` (a JSON list), ``bad choices`` (choices that are
    strings), ``no choices``; for the first ``fault_first`` requests, or all when that is 0."""
    fault_first: int = 0
    slow_first: int = 0
    """The first K chat requests sleep ``slow_s`` before answering (past a client's timeout)."""
    slow_s: float = 0.0
    fail_status: int = 500
    status: int = 0
    """When set, answer every request with this status and an error body echoing the auth header."""
    sleep_s: float = 0.0
    stagger: bool = False
    """Sleep 20 ms x (seed % 3) more, so replies come back out of request order."""
    choices: int | None = None
    """Return this many choices instead of n."""
    token_ids: bool = False
    """Add vLLM-style per-choice ``token_ids`` (choice i gets i + 2 ids)."""
    headers: list[dict[str, str]] = field(default_factory=list)
    bodies: list[dict[str, Any]] = field(default_factory=list)
    peak: int = 0
    inflight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def enter(self, headers: dict[str, str], body: dict[str, Any]) -> int:
        with self.lock:
            self.headers.append(headers)
            self.bodies.append(body)
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            return len(self.bodies)

    def leave(self) -> None:
        with self.lock:
            self.inflight -= 1

    def reply(self, number: int, headers: dict[str, str], body: dict[str, Any]) -> tuple[int, Any, dict]:
        if number <= self.fail_first:
            extra = {"Retry-After": "0"} if self.fail_status == 429 else {}
            return self.fail_status, {"error": "try again later"}, extra
        if self.status:
            return self.status, {"error": f"rejected {headers.get('Authorization')}"}, {}
        return 200, completion(body, self.choices, self.token_ids), {}


def completion(body: dict[str, Any], choices: int | None, token_ids: bool) -> dict[str, Any]:
    last = body["messages"][-1]["content"]
    n = body["n"] if choices is None else choices
    out = [
        {
            "index": i,
            "message": {"role": "assistant", "content": expected_text(last, body["seed"], i)},
            "finish_reason": "stop",
        }
        | ({"token_ids": list(range(i + 2))} if token_ids else {})
        for i in range(n)
    ]
    usage = {
        "prompt_tokens": len(last),
        "completion_tokens": 3 * n + 1,
        "total_tokens": len(last) + 3 * n + 1,
    }
    return {
        "id": "cmpl-1",
        "object": "chat.completion",
        "model": body["model"],
        "choices": out,
        "usage": usage,
    }


def expected_text(content: str, seed: int, index: int) -> str:
    return json.dumps({"echo": content, "seed": seed, "choice": index})


class Handler(BaseHTTPRequestHandler):
    server: Any

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        fake = self.server.fake
        if fake.status:
            self.send(fake.status, {"error": "no"}, {})
        else:
            self.send(200, {"object": "list", "data": [{"id": "fake-model"}]}, {})

    def do_POST(self) -> None:
        fake = self.server.fake
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        headers = dict(self.headers)
        number = fake.enter(headers, body)
        try:
            time.sleep(fake.sleep_s + (0.02 * (body["seed"] % 3) if fake.stagger else 0.0))
            time.sleep(fake.slow_s if number <= fake.slow_first else 0.0)
        finally:
            # Leave before replying: once the reply is written the client may send its next
            # request at once, and counting this one still in flight would overstate the peak.
            fake.leave()
        if fake.fault and (not fake.fault_first or number <= fake.fault_first):
            self.send_fault(fake.fault, completion(body, None, False))
        else:
            self.send(*fake.reply(number, headers, body))

    def send_fault(self, fault: str, good: dict[str, Any]) -> None:
        payload = {
            "not an object": [good],
            "bad choices": good | {"choices": ["text"] * len(good["choices"])},
            "no choices": {k: v for k, v in good.items() if k != "choices"},
        }
        data = (
            b"<html>502 Bad Gateway</html>"
            if fault == "garbage"
            else json.dumps(payload.get(fault, good)).encode()
        )
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2] if fault == "truncated" else data)
        self.close_connection = True

    def send(self, status: int, payload: Any, headers: dict[str, str]) -> None:
        data = json.dumps(payload).encode()
        try:
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client timed out and hung up
