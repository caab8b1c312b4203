"""Secrets (the teacher's API key, ``HF_TOKEN``) from the driver to the Ray processes that use them.

The driver reads each secret from its own environment and hands it to the engine actors, training
workers and eval tasks with their arguments, where ``export`` puts it back into the process
environment that the engine or library reads. So a key only has to be in the environment of the
process that starts the run: the head pod, the ``ray start`` of the head, or the shell of
``speed-ray run``, whatever node the actors land on. It never travels in a Ray runtime env (which
``ray job list``, the dashboard and every worker's log show), a config, a manifest or a log: a
``Secret`` prints as stars.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

HUB_TOKEN = "HF_TOKEN"
"""The Hugging Face token for gated models, read by huggingface_hub, transformers and vLLM."""


class Secret:
    """A value that never shows in a ``repr``, a ``str`` or a log line."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('********')"

    __str__ = __repr__


def collect(names: Iterable[str]) -> dict[str, Secret]:
    """The variables among ``names`` that are set in this process's environment, as secrets."""
    return {name: Secret(os.environ[name]) for name in dict.fromkeys(names) if os.environ.get(name)}


def export(secrets: dict[str, Secret] | None) -> None:
    """Set the handed secrets in this process's environment (a worker's), for the libraries that read
    them there."""
    for name, secret in (secrets or {}).items():
        os.environ[name] = secret.reveal()
