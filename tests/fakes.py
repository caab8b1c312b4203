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
