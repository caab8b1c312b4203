"""Embedding models as sentence-transformers modules, so training and inference share one code path.

Decoders follow SPEED/E5 (§3.3): queries are ``Instruct: {task}\\nQuery: {query}``, documents carry no
instruction, an EOS token is appended to every text and its last hidden state is the embedding
(``lasttoken`` pooling). Encoders use mean or CLS pooling and no instruction. Every embedding is L2
normalised, so a dot product is the cosine.
"""

from __future__ import annotations

from typing import Any


def query_prefix(instruction: str) -> str:
    return f"Instruct: {instruction}\nQuery: "


def format_query(instruction: str | None, query: str, pooling: str) -> str:
    """The text a model sees for a query: instruction-prefixed for decoders (lasttoken pooling)."""
    if pooling == "lasttoken" and instruction:
        return query_prefix(instruction) + query
    return query


def build_model(model_path: str, pooling: str, max_seq_length: int, device: str = "cpu") -> Any:
    """A SentenceTransformer: Transformer -> Pooling(pooling) -> Normalize, from a local model folder."""
    from sentence_transformers import SentenceTransformer, models  # type: ignore[attr-defined]

    processor_kwargs: dict[str, Any] = {}
    if pooling == "lasttoken":
        processor_kwargs = {"add_eos_token": True}
    transformer = models.Transformer(
        model_path, max_seq_length=max_seq_length, processor_kwargs=processor_kwargs
    )
    tok = transformer.tokenizer
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    pool = models.Pooling(transformer.get_embedding_dimension(), pooling_mode=pooling)
    return SentenceTransformer(modules=[transformer, pool, models.Normalize()], device=device)


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
