"""transformers engine: the fallback for machines where vLLM is not installed.

Slow but dependable: one request at a time on the CPU, each sampled under its own seed inside a
forked RNG, so a row's output never depends on the rows beside it and the caller's RNG is left
alone. It has no constrained decoding, so a request's JSON schema is ignored and callers repair
the JSON (``speed_ray.synth.parsing``), as they do for any engine.
"""

from __future__ import annotations

from typing import Any

from speed_ray.engines import Completion, Request, Sampling
from speed_ray.engines.config import EngineConfig


class HFGenerator:
    """``AutoModelForCausalLM.generate`` behind the ``Generator`` protocol.

    Args:
        model: Local model folder (or hub name on a machine with network); needs a chat template.
        dtype: Weights dtype, e.g. ``float32`` or ``bfloat16``.
        max_model_len: Prompt plus generated tokens; ``max_tokens`` is cut to fit.
        seed: Accepted so one engine config builds every engine; each request carries its own seed.
    """

    @classmethod
    def from_config(cls, config: EngineConfig, model: str, seed: int = 0) -> HFGenerator:
        return cls(model, config.dtype, config.max_model_len, seed)

    def __init__(
        self,
        model: str,
        dtype: str = "float32",
        max_model_len: int = EngineConfig.max_model_len,
        seed: int = 0,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = model
        self.max_model_len = max_model_len
        self.seed = seed
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=dtype).eval()
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        pad = self.model.generation_config.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.pad_token_id

    def generate(self, requests: list[Request], sampling: Sampling) -> list[list[Completion]]:
        return [self._generate_one(r, sampling) for r in requests]

    def _generate_one(self, request: Request, sampling: Sampling) -> list[Completion]:
        import torch

        enc: Any = self.tokenizer.apply_chat_template(
            request.messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )
        prompt_len = int(enc["input_ids"].shape[1])
        budget = min(sampling.max_tokens, self.max_model_len - prompt_len)
        if budget <= 0:
            error = f"prompt of {prompt_len} tokens leaves no room in max_model_len={self.max_model_len}"
            return [
                Completion("", prompt_len if k == 0 else 0, 0, "length", error) for k in range(sampling.n)
            ]
        greedy = sampling.temperature <= 0
        with torch.random.fork_rng(devices=[]), torch.inference_mode():
            torch.manual_seed(request.seed)
            out = self.model.generate(
                **enc,
                max_new_tokens=budget,
                num_return_sequences=1 if greedy else sampling.n,
                pad_token_id=self.pad_id,
                **self._sampling_kwargs(sampling, greedy),
            )
        rows = out[:, prompt_len:].tolist()
        rows = rows * sampling.n if greedy else rows  # greedy samples are all the same sequence
        return [self._completion(row, prompt_len if k == 0 else 0) for k, row in enumerate(rows)]

    @staticmethod
    def _sampling_kwargs(sampling: Sampling, greedy: bool) -> dict[str, Any]:
        # Override sampling defaults a model's generation_config may carry; top_k=0 turns transformers'
        # default top-k of 50 off, as in vLLM and the OpenAI API.
        if greedy:
            return {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        return {"do_sample": True, "temperature": sampling.temperature, "top_p": sampling.top_p, "top_k": 0}

    def _completion(self, tokens: list[int], num_input_tokens: int) -> Completion:
        """Cut at the first EOS (counted, as vLLM counts it); without one the budget ran out."""
        stop = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        kept = tokens if stop is None else tokens[: stop + 1]
        text = str(self.tokenizer.decode(kept, skip_special_tokens=True))  # a flat list decodes to one str
        return Completion(text, num_input_tokens, len(kept), "length" if stop is None else "stop")
