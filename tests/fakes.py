"""A deterministic stand-in engine for stage tests: canned JSON per prompt kind, echoing the seed."""

from __future__ import annotations

import json

from speed_ray.engines import Completion, Request, Sampling

CANNED = {
    "user_query": '{{"user_query": "query {s}", "positive_document": "relevant text {s}", "hard_negative_document": "other text"}}',
    "input_text": '{{"input_text": "input {s}", "label": "yes", "misleading_label": "no"}}',
    "S1": '{{"S1": "one {s}", "S2": "two", "S3": "three"}}',
    "input": '{{"input": "word {s}", "positive_document": "meaning"}}',
}


class FakeGenerator:
    name = "fake"

    def __init__(self) -> None:
        self.calls = 0

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        self.calls += 1
        out = []
        for r in requests:
            keys = (r.json_schema or {}).get("required", [])
            if (r.json_schema or {}).get("type") == "array":
                text = json.dumps([f"Task for seed {r.seed}.", "Another task."])
            else:
                text = CANNED[keys[0]].format(s=r.seed) if keys else "free text"
            out.append([Completion(text if k == 0 else "not json", 10, 5 + k) for k in range(sampling.n)])
        return out


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
