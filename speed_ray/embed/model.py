"""Embedding models as sentence-transformers modules, so training and inference share one code path.

Decoders follow SPEED/E5 (§3.3): queries are ``Instruct: {task}\\nQuery: {query}``, documents carry no
instruction, an EOS token is appended to every text and its last hidden state is the embedding
(``lasttoken`` pooling). Encoders use mean or CLS pooling and no instruction. Every embedding is L2
normalised, so a dot product is the cosine.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from speed_ray.io.schemas import instructed_query, query_prefix


def format_query(instruction: str | None, query: str, pooling: str) -> str:
    """The text a model sees for a query: instruction-prefixed for decoders (lasttoken pooling)."""
    return instructed_query(instruction, query) if pooling == "lasttoken" else query


def dropout_settings(model_path: str, p: float) -> dict[str, float]:
    """Every dropout probability in the model's config set to ``p`` (BERT: hidden and attention;
    Llama-family decoders: attention only, as they have no other dropout)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path)
    keys = [
        k
        for k, v in config.to_dict().items()
        if isinstance(v, float) and k.endswith(("dropout", "dropout_prob"))
    ]
    return {k: p for k in keys if not k.startswith("classifier")}


def build_model(
    model_path: str, pooling: str, max_seq_length: int, device: str = "cpu", dropout: float | None = None
) -> Any:
    """A SentenceTransformer: Transformer -> Pooling(pooling) -> Normalize, from a local model folder;
    ``dropout`` overrides every dropout probability of the model (None keeps its own)."""
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]

    processor_kwargs: dict[str, Any] = {}
    if pooling == "lasttoken":
        processor_kwargs = {"add_eos_token": True}
    # Plain text in, last hidden states out: a tokenizer's chat template (SmolLM2 has one) would
    # otherwise wrap every text in a system prompt. Saved with the model, so reloading keeps it.
    transformer = models.Transformer(
        model_path,
        max_seq_length=max_seq_length,
        processor_kwargs=processor_kwargs,
        modality_config={"text": {"method": "forward", "method_output_name": "last_hidden_state"}},
        module_output_name="token_embeddings",
        config_kwargs=None if dropout is None else dropout_settings(model_path, dropout),
    )
    tok = transformer.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pool = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pool, models.Normalize()], device=device)


# ----------------------------------------------------------------------------------------------
# The model card: sentence-transformers' own (SentenceTransformerModelCardData -> README.md)

# mteb's task kinds as the model card names an evaluator's task.
TASK_DESCRIPTIONS = {
    "retrieval": "Information Retrieval",
    "knn": "Classification",
    "clustering": "Clustering",
    "mteb": "MTEB",
}


class TaskScores:
    """One task's scores from the eval stage (mteb), in the shape sentence-transformers' model card
    takes an evaluator's results (``set_evaluation_metrics``): name, description, primary metric."""

    greater_is_better = True

    def __init__(self, name: str, kind: str, main_score: str) -> None:
        self.name, self.kind, self.primary_metric = name, kind, main_score

    @property
    def description(self) -> str:
        return TASK_DESCRIPTIONS.get(self.kind, self.kind.title())

    def get_config_dict(self) -> dict[str, Any]:
        return {"task": self.name, "evaluated_with": "mteb (speed-ray eval stage)"}


def model_card_data(
    card: dict[str, Any], history: list[dict[str, Any]], scores: dict[str, dict[str, Any]] | None = None
) -> Any:
    """sentence-transformers' card data for a trained model: ``card`` (``embed.driver.card_info``:
    base model, training set, loss, hyperparameters), the loss per step from ``history``, and the
    eval stage's ``scores`` ({task: {"kind", "main_score", "scores"}}) once it has run. Nothing is
    looked up on the Hub (``local_files_only``): the names are written as given."""
    from sentence_transformers import SentenceTransformerModelCardData

    data = SentenceTransformerModelCardData(
        model_name=card["model_name"],
        train_datasets=[card["dataset"] | {"loss": card["loss"]}],
        local_files_only=True,
    )
    data.add_tags(card.get("tags", []))
    data.base_model = card["base_model"]
    data.datasets = [card["dataset"]["name"]]
    data.all_hyperparameters = dict(card["hyperparameters"])
    data.training_logs = [
        {
            "Epoch": h["epoch"],
            "Step": h["step"],
            "Training Loss": round(h["loss"], 4),
            **({"In-batch Accuracy": round(h["accuracy"], 4)} if "accuracy" in h else {}),
        }
        for h in history
    ]
    for task, result in (scores or {}).items():
        # Named as sentence-transformers' evaluators name theirs (``<task>_<metric>``): the card's
        # tables show the bare metric, its training-log column the task too.
        evaluator: Any = TaskScores(task, result["kind"], f"{task}_{result['main_score']}")
        metrics = {f"{task}_{k}": v for k, v in result["scores"].items() if card_metric(k)}
        data.set_evaluation_metrics(evaluator, metrics, step=history[-1]["step"] if history else 0)
    return data


def card_metric(name: str) -> bool:
    """A score the model card lists: mteb's metrics, less its calibration diagnostics (``nauc_*``,
    dozens per task), its ``main_score`` copy, the eval stage's timing and its per-item scores."""
    return name not in ("main_score", "seconds", "per_item") and not name.startswith("nauc_")


def use_card(model: Any, data: Any) -> None:
    """Make ``data`` (``model_card_data``) the model's card data, which ``model.save`` writes README.md
    from. Call it once the prompts are set: a model with a query prompt gets the retrieval usage
    example (``encode_query`` / ``encode_document``)."""
    model.model_card_data = data
    data.register_model(model)


def write_model_card(model: Any, folder: str | Path, card: dict[str, Any], history, scores=None) -> None:
    """(Re)write ``folder/README.md`` for ``model`` with sentence-transformers' model card generator,
    from ``model_card_data(card, history, scores)``; the weights are not touched."""
    try:
        from sentence_transformers.base.model_card import generate_model_card
    except ImportError:  # sentence-transformers 5
        from sentence_transformers.model_card import generate_model_card  # type: ignore[no-redef]

    from speed_ray.io.schemas import write_text_atomic

    use_card(model, model_card_data(card, history, scores))
    model.model_card_data.save_dir = str(folder)
    write_text_atomic(Path(folder) / "README.md", generate_model_card(model))


def pooling_module(model: Any) -> Any:
    """The Pooling module of a SentenceTransformer (the one whose config names a pooling mode), or None."""
    return next((m for m in model if "pooling_mode" in getattr(m, "get_config_dict", dict)()), None)


def transformer_blocks(model: Any) -> Any:
    """The ``nn.ModuleList`` of transformer blocks inside a SentenceTransformer (BERT, Llama, ...)."""
    import torch

    hf = model[0].auto_model
    n = hf.config.num_hidden_layers
    for module in hf.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"no list of {n} transformer blocks found in {type(hf).__name__}")


def train_last_blocks(model: Any, n: int) -> int:
    """Freeze everything below the last ``n`` blocks (embeddings included); returns trainable params.

    The frozen part then builds no autograd graph: its inputs need no gradient and its weights have
    none, so PyTorch stores none of its activations and the backward pass stops at block ``-n``.
    """
    blocks = transformer_blocks(model)
    if not 0 < n <= len(blocks):
        raise ValueError(f"embed.train_last_blocks: expected 1..{len(blocks)} for this model, got {n}")
    for p in model.parameters():
        p.requires_grad_(False)
    for block in list(blocks)[-n:]:
        for p in block.parameters():
            p.requires_grad_(True)
    hf = model[0].auto_model
    for name, module in hf.named_children():  # final norms after the blocks (Llama's ``norm``)
        if "norm" in name.lower():
            for p in module.parameters():
                p.requires_grad_(True)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def set_prompts(model: Any, instruction: str, pooling: str) -> None:
    """Save the query/document prompts in the model so ``encode(..., prompt_name="query")`` is right."""
    if pooling == "lasttoken":
        model.prompts = {"query": query_prefix(instruction), "document": ""}
    else:
        model.prompts = {"query": "", "document": ""}


def add_lora(
    model: Any, r: int, alpha: int, dropout: float, target_modules: Any, last_blocks: int = 0
) -> int:
    """Wrap the transformer in a LoRA adapter (PEFT), only in the last ``last_blocks`` blocks when set;
    returns the trainable parameter count. ``merge_lora`` folds it back before export."""
    from peft import LoraConfig, get_peft_model

    hf = model[0].auto_model
    modules: Any = list(target_modules)
    if last_blocks:
        # Exact module names: PEFT's layers_to_transform misses a bare backbone's "layers.N." names.
        blocks = transformer_blocks(model)
        prefix = next(n for n, m in hf.named_modules() if m is blocks)
        wanted = set(modules)
        modules = [
            f"{prefix}.{i}.{n}"
            for i in range(len(blocks) - last_blocks, len(blocks))
            for n, m in blocks[i].named_modules()
            if isinstance(m, torch.nn.Linear) and ("all-linear" in wanted or n.split(".")[-1] in wanted)
        ]
    elif modules == ["all-linear"]:
        modules = "all-linear"
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=modules)
    model[0].model = get_peft_model(hf, config)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: Any) -> None:
    """Fold a LoRA adapter into the base weights, leaving a plain transformers model."""
    from peft import PeftModel

    if isinstance(model[0].auto_model, PeftModel):
        model[0].model = model[0].auto_model.merge_and_unload()


class FrozenBlocks:
    """The blocks below the last ``n``: frozen (``train_last_blocks``) and run under ``no_grad``.

    Inside a GradCache step they need computing only once: ``record()`` keeps the last frozen block's
    output for each chunk of the no-grad pass (with the RNG state at that point, so the trainable
    blocks draw the same dropout masks on replay), and ``replay(i)`` makes the frozen blocks hand back
    chunk ``i``'s output instead of recomputing it. The replay pass then runs only the trainable top.
    """

    def __init__(self, model: Any, n: int) -> None:
        self.trainable = train_last_blocks(model, n)
        blocks = list(transformer_blocks(model))
        self.frozen = blocks[: len(blocks) - n]
        self.outputs: list[Any] = []
        self.rng: list[torch.Tensor] = []
        for block in self.frozen:
            block.forward = torch.no_grad()(block.forward)

    @contextlib.contextmanager
    def record(self) -> Iterator[None]:
        self.outputs, self.rng = [], []
        if not self.frozen:
            yield
            return

        def keep(module, args, output) -> None:
            self.outputs.append(output)
            self.rng.append(torch.get_rng_state())

        handle = self.frozen[-1].register_forward_hook(keep)
        try:
            yield
        finally:
            handle.remove()

    @contextlib.contextmanager
    def replay(self, i: int) -> Iterator[None]:
        if not self.frozen:
            yield
            return
        output, rng = self.outputs[i], self.rng[i]

        def first(*args, **kwargs):
            torch.set_rng_state(rng)
            return output

        def passthrough(*args, **kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            return (hidden,) if isinstance(output, tuple) else hidden

        saved = [block.forward for block in self.frozen]
        self.frozen[0].forward = first
        for block in self.frozen[1:]:
            block.forward = passthrough
        try:
            yield
        finally:
            for block, forward in zip(self.frozen, saved, strict=True):
                block.forward = forward
