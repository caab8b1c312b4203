"""Generation engines behind one small protocol. Nothing here imports Ray; vLLM is imported lazily.

A ``Request`` is one chat with its own seed and optional JSON schema; ``generate`` returns, per
request, exactly ``n`` ``Completion``s with token counts. The prompt's tokens are counted once, on
the first completion (later ones carry 0), so summing a column gives the true total. Stage classes wrap an engine; engines know nothing
about Ray.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from speed_ray.engines.config import EngineConfig


@dataclass(frozen=True)
class Request:
    messages: list[dict[str, str]]
    seed: int
    json_schema: dict[str, Any] | None = None


@dataclass(frozen=True)
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 256
    n: int = 1


@dataclass(frozen=True)
class Completion:
    text: str
    num_input_tokens: int
    num_output_tokens: int
    finish_reason: str | None = None
    error: str | None = None
    """Set when the engine could not produce this completion (e.g. an HTTP call failed after its
    retries); ``text`` is then empty and the row is kept with this error, never dropped."""


class Generator(Protocol):
    name: str

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]: ...


def build_generator(config: EngineConfig, model: str, seed: int = 0) -> Generator:
    """The engine of ``config.kind`` for ``model`` (a resolved local folder, or a server's model
    name), built by the engine class from the settings it reads (``from_config``)."""
    if config.kind == "vllm":
        from speed_ray.engines.vllm_engine import VllmGenerator

        return VllmGenerator.from_config(config, model, seed)
    if config.kind == "transformers":
        from speed_ray.engines.hf_engine import HFGenerator

        return HFGenerator.from_config(config, model, seed)
    if config.kind == "openai":
        from speed_ray.engines.openai_http import OpenAIGenerator

        return OpenAIGenerator.from_config(config, model, seed)
    raise ValueError(f"unknown engine kind {config.kind!r}; expected 'vllm', 'transformers' or 'openai'")
