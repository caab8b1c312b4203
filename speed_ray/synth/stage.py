"""Ray Data stage classes: thin shells over engines and pure functions (STYLE P5).

``GenerateStage`` is built once per actor (loads the engine) and called per batch. It checks its
input columns, sends one request per row, and returns one output row per sample with the raw text and
token counts; every input column is carried through so outputs never depend on row order.
"""

from __future__ import annotations

import json
from typing import Any

import pyarrow as pa

from speed_ray.engines import Request, Sampling, build_generator


class GenerateStage:
    REQUIRED_COLUMNS = {
        "id": "stable row id",
        "messages": "the chat, as a JSON list of {role, content}",
        "json_schema": "JSON schema for structured output, or '' for free text",
        "seed": "per-row sampling seed",
    }
    OUTPUT_COLUMNS = {
        "sample": "sample index within the row (0..n-1)",
        "raw": "generated text",
        "generator": "engine model name",
        "num_input_tokens": "prompt tokens",
        "num_output_tokens": "generated tokens",
        "engine_error": "why the engine gave no text for this sample (null when it did)",
    }

    def __init__(self, engine: dict[str, Any], sampling: dict[str, Any], generator: Any = None) -> None:
        self.engine = generator if generator is not None else build_generator(**engine)
        self.sampling = Sampling(**sampling)

    def __call__(self, batch: pa.Table) -> pa.Table:
        missing = [c for c in self.REQUIRED_COLUMNS if c not in batch.column_names]
        if missing:
            need = ", ".join(f"{c} ({self.REQUIRED_COLUMNS[c]})" for c in missing)
            raise ValueError(f"GenerateStage: input batch lacks the columns {need}")
        rows = batch.to_pylist()
        requests = [
            Request(
                json.loads(r["messages"]),
                int(r["seed"]),
                json.loads(r["json_schema"]) if r["json_schema"] else None,
            )
            for r in rows
        ]
        outputs = self.engine.generate(requests, self.sampling)
        out = []
        for row, completions in zip(rows, outputs, strict=True):
            for k, c in enumerate(completions):
                out.append(
                    {
                        **row,
                        "sample": k,
                        "raw": c.text,
                        "generator": self.engine.name,
                        "num_input_tokens": c.num_input_tokens,
                        "num_output_tokens": c.num_output_tokens,
                        "engine_error": c.error,
                    }
                )
        return pa.Table.from_pylist(out)
