"""The engine section (``synth.engine``, ``synth.judge``, ``align.teacher``, ...): which engine, which
model, and how the pool of engine actors is sized. One dataclass for every kind; each engine class reads
the fields it needs (``from_config``)."""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from typing import Any

from speed_ray.io.settings import ConfigError, check_positive

KINDS = ("vllm", "transformers", "openai")
# Settings that size, place or pace a pool, or price its calls: never the text it writes.
# ``engine_kwargs`` is not one: some vLLM arguments (quantization, kv_cache_dtype) change the text.
RUNTIME = (
    "num_cpus",
    "num_gpus",
    "min_actors",
    "max_actors",
    "batch_size",
    "max_concurrency",
    "requests_per_second",
    "timeout_s",
    "max_retries",
    "api_key_env",
    "kv_cache_gib",
    "gpu_memory_utilization",
    "enforce_eager",
    "tensor_parallel_size",
    "price_per_million_input_tokens",
    "price_per_million_output_tokens",
)
# vLLM engine arguments speed-ray sets from a config key of its own: that key (``{engine}``: the
# engine's place in the config, ``synth.judge``), which ``engine_kwargs`` must not contradict.
OWNED_ENGINE_ARGS = {
    "model": "{engine}.model",
    "dtype": "{engine}.dtype",
    "max_model_len": "{engine}.max_model_len",
    "gpu_memory_utilization": "{engine}.gpu_memory_utilization",
    "enforce_eager": "{engine}.enforce_eager",
    "tensor_parallel_size": "{engine}.tensor_parallel_size",
    "seed": "run.seed",
}


@dataclass
class EngineConfig:
    kind: str = "vllm"
    """vllm (CPU or CUDA build, same code) | transformers (fallback, no vLLM) | openai (an
    OpenAI-compatible HTTP server: a teacher such as GPT-4o, or ``vllm serve``)."""
    model: str = "smollm2-135m-instruct"
    """Model spec: a built-in name (see ``speed-ray doctor``), a local folder, or a hub name;
    for ``openai`` the server's model name."""
    dtype: str = "bfloat16"
    """Weights dtype in the engine (bf16 is ~1.75x faster than fp32 on the CPU build)."""
    max_model_len: int = 1536
    """Prompt plus completion tokens per request."""
    kv_cache_gib: float = 0.5
    """KV-cache size on the CPU build of vLLM, which needs it given (its memory probe reads NUMA
    node 0 alone and refuses to start). Ignored on GPUs: there ``gpu_memory_utilization`` rules."""
    gpu_memory_utilization: float = 0.9
    """GPUs: the share of each GPU's memory the engine takes (weights, activations, KV cache);
    vLLM's own default. Ignored by the CPU build (``kv_cache_gib``)."""
    enforce_eager: bool | None = None
    """Skip torch.compile and CUDA graphs. None: True on the CPU build (17 s start instead of
    50-90 s, same speed), False on GPUs (CUDA graphs speed up decoding)."""
    tensor_parallel_size: int = 1
    num_gpus: float = 0.0
    """GPUs per tensor-parallel rank of an engine actor (0 on CPU); an actor takes
    ``num_gpus * tensor_parallel_size``."""
    num_cpus: float = 0.5
    """CPUs Ray reserves per engine actor. Keep below 1 on a 2-core box (read tasks need a CPU)."""
    min_actors: int = 1
    max_actors: int = 1
    """The actor pool autoscales between min_actors and max_actors."""
    batch_size: int = 32
    """Rows per engine call."""
    base_url: str | None = None
    """openai: the server's base URL, e.g. ``https://api.openai.com/v1`` or ``http://host:8000/v1``."""
    api_key_env: str | None = None
    """openai: the environment variable that holds the API key (the key itself never goes in a config,
    a log or a manifest). On a cluster, set it on the worker nodes (e.g. a Kubernetes secret)."""
    timeout_s: float = 60.0
    max_retries: int = 4
    """openai: retries with exponential backoff on timeouts, connection errors, 429 and 5xx."""
    max_concurrency: int = 8
    """openai: requests in flight per actor."""
    requests_per_second: float = 0.0
    """openai: rate limit per actor (0: none)."""
    price_per_million_input_tokens: float = 0.0
    price_per_million_output_tokens: float = 0.0
    """openai: prices for the cost column of the accounting (e.g. GPT-4o-2024-05-13: 5.0 and 15.0 USD)."""
    engine_kwargs: dict[str, Any] = field(default_factory=dict)
    """vllm: more ``vllm.LLM`` engine arguments (``max_num_seqs``, ``quantization``,
    ``kv_cache_dtype``...), applied over the ones speed-ray sets; names are checked against vLLM's
    ``EngineArgs`` at config load. Part of the fingerprint: some change the text."""

    def validate(self, key: str) -> None:
        """Checks of this engine's own fields; ``key`` is its place in the config (``synth.judge``)."""
        if self.kind not in KINDS:
            raise ConfigError(f"{key}.kind: expected one of {', '.join(KINDS)}, got {self.kind!r}")
        names = ("batch_size", "min_actors", "max_concurrency", "tensor_parallel_size")
        check_positive({f"{key}.{name}": getattr(self, name) for name in names})
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                f"{key}.gpu_memory_utilization: expected a share in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.max_actors < self.min_actors:
            raise ConfigError(
                f"{key}.max_actors: expected >= {key}.min_actors ({self.min_actors}), got {self.max_actors}"
            )
        if self.kind == "openai":
            if not self.base_url or not self.base_url.startswith(("http://", "https://")):
                raise ConfigError(
                    f"{key}.base_url: expected an http(s):// URL for kind openai, got {self.base_url!r}"
                )
            if self.api_key_env is not None and not os.environ.get(self.api_key_env):
                raise ConfigError(
                    f"{key}.api_key_env: environment variable {self.api_key_env} is not set or empty "
                    "(export it; the key is never read from a config file)"
                )
        if self.engine_kwargs:
            if self.kind != "vllm":
                raise ConfigError(
                    f"{key}.engine_kwargs: vLLM engine arguments, only for kind vllm (got {self.kind})"
                )
            check_engine_kwargs(key, self.engine_kwargs)


def check_engine_kwargs(engine: str, kwargs: dict[str, Any]) -> None:
    """Each name in ``{engine}.engine_kwargs`` must be a ``vllm.LLM`` engine argument that speed-ray
    does not set from a key of its own."""
    key = f"{engine}.engine_kwargs"
    for name in map(str, kwargs):
        if name in OWNED_ENGINE_ARGS:
            raise ConfigError(
                f"{key}.{name}: set by speed-ray; use {OWNED_ENGINE_ARGS[name].format(engine=engine)} instead"
            )
    try:
        from speed_ray.engines.vllm_engine import engine_arg_names

        names = engine_arg_names()
    except ImportError as e:
        raise ConfigError(
            f"{key}: checking vLLM engine arguments needs vllm, which cannot be imported ({e})"
        ) from None
    for name in map(str, kwargs):
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3, cutoff=0.6)
            hint = f"closest: {', '.join(close)}" if close else "see vllm.engine.arg_utils.EngineArgs"
            raise ConfigError(f"{key}.{name}: not a vLLM engine argument ({hint})")
