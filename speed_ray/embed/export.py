"""What a worker writes: checkpoints it resumes from, and the trained model exported for
sentence-transformers (pooling, normalisation, the query/document prompts and sentence-transformers'
model card), at the end and as snapshots along the way."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from speed_ray.embed.prepare import base_model, configured_lora, is_deepspeed, unwrap

if TYPE_CHECKING:
    from speed_ray.embed.train import EmbedTrainSettings

PROBE_TEXTS = ["a command-line tool to convert images", "library for parsing XML documents"]
STATE = "state.pt"


def save_state(model, optimizer, scheduler, state: dict[str, Any], folder: str, rank: int) -> bool:
    """Write this rank's part of a checkpoint; True if it wrote anything (to report)."""
    if is_deepspeed(model):
        model.save_checkpoint(folder, tag="state", client_state=state)
        return True
    if rank != 0:
        return False
    trainable = {k: v for k, v in unwrap(model).named_parameters() if v.requires_grad}
    torch.save(
        {
            "model": {k: v.detach().cpu() for k, v in trainable.items()},
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            **state,
        },
        os.path.join(folder, STATE),
    )
    return True


def load_state(model, optimizer, scheduler, folder: str) -> dict[str, Any]:
    """Restore what ``save_state`` wrote; returns its ``state`` (step, history)."""
    if is_deepspeed(model):
        _, client = model.load_checkpoint(folder, tag="state")
        return client
    # weights_only: tensors, numbers, strings and containers only; a checkpoint cannot run code.
    saved = torch.load(os.path.join(folder, STATE), weights_only=True, map_location="cpu")
    missing = unwrap(model).load_state_dict(saved.pop("model"), strict=False)
    assert not missing.unexpected_keys, missing.unexpected_keys
    optimizer.load_state_dict(saved.pop("optimizer"))
    scheduler.load_state_dict(saved.pop("scheduler"))
    return saved


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """Every weight on CPU; under ZeRO-3 gathered from all ranks (all ranks must call this)."""
    st = unwrap(model)
    ctx = contextlib.nullcontext()
    if is_deepspeed(model) and model.zero_optimization_stage() == 3:
        import deepspeed

        ctx = deepspeed.zero.GatheredParameters(list(st.parameters()))
    with ctx:
        return {k: v.detach().float().cpu().clone() for k, v in st.state_dict().items()}


def export(
    state: dict[str, torch.Tensor], s: EmbedTrainSettings, folder: str, history: list[dict] | None = None
) -> None:
    """A fresh copy of the model with the trained weights, LoRA merged, saved for sentence-transformers
    with pooling, normalisation, the query/document prompts and sentence-transformers' model card
    (README.md) from ``s.model_card`` and the losses so far (``history``)."""
    from speed_ray.embed.model import merge_lora, model_card_data, set_prompts, use_card

    model = base_model(s)
    if s.finetune == "lora":
        configured_lora(model, s.embed)
    model.load_state_dict(state)
    merge_lora(model)
    set_prompts(model, s.embed.query_instruction, s.embed.pooling)
    if s.model_card is not None:
        use_card(model, model_card_data(s.model_card, history or []))
    model.save(folder)


def snapshot(model, s: EmbedTrainSettings, step: int, rank: int, history: list[dict] | None = None) -> None:
    """Export the model as it is at ``step`` to ``<snapshot_dir>/step_<step>`` (written under a
    temporary name and renamed, so a folder there is whole; a resumed run keeps it)."""
    import shutil

    weights = full_state_dict(model)  # every rank: ZeRO-3 gathers
    target = Path(s.snapshot_dir) / f"step_{step:05d}"
    if rank != 0 or target.exists():
        return
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    export(weights, s, str(tmp), history)
    tmp.rename(target)


def probe(model) -> dict[str, Any]:
    """The trained model's own embeddings of fixed texts (as documents and as queries); the exported
    folder must reproduce them. Every rank calls this (ZeRO-3 gathers weights in forward)."""
    st = unwrap(model)
    st.eval()
    with torch.no_grad():
        kw: dict[str, Any] = {"convert_to_tensor": True, "show_progress_bar": False}
        docs = st.encode(PROBE_TEXTS, **kw).float().cpu().tolist()
        queries = st.encode(PROBE_TEXTS, prompt_name="query", **kw).float().cpu().tolist()
    st.train()
    return {
        "texts": PROBE_TEXTS,
        "query_prompt": st.prompts.get("query", ""),
        "embeddings": docs,
        "query_embeddings": queries,
    }
