"""Layer analysis (the crops paper's section 5, Fig. 4): every layer's hidden states, pooled as the
model pools its last one (mean for the paper's encoders) and L2-normalised, scored on the kNN task.
Layer 0 is the token-embedding output; the last layer is the model's own embedding.

One forward pass gives every layer; each layer is then scored through mteb like any model, so the
numbers follow exactly the protocol of the kNN task.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np


def layer_embeddings(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """[layers + 1, len(texts), dim]: each layer's pooled, normalised hidden states."""
    import torch

    from speed_ray.embed.model import pooling_module

    hf, pool = model[0].auto_model, pooling_module(model)
    if pool is None:
        raise ValueError("the model has no Pooling module to pool each layer with")
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: np.ndarray | None = None
    hf.eval()
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            idx = order[start : start + batch_size]
            features = model.tokenize([texts[i] for i in idx])
            mask = features["attention_mask"]
            hidden = hf(
                input_ids=features["input_ids"], attention_mask=mask, output_hidden_states=True
            ).hidden_states
            pooled = [
                pool({"token_embeddings": h, "attention_mask": mask})["sentence_embedding"] for h in hidden
            ]
            emb = torch.nn.functional.normalize(torch.stack(pooled).float(), dim=-1).numpy()
            if out is None:
                out = np.zeros((len(hidden), len(texts), emb.shape[-1]), dtype=np.float32)
            out[:, idx] = emb
    assert out is not None
    return out


def precomputed_encoder(name: str, vectors: dict[str, np.ndarray]) -> Any:
    """An mteb encoder that answers each text with a vector computed beforehand."""
    from speed_ray.eval.tasks import text_encoder

    return text_encoder(name, "layers", lambda texts: np.stack([vectors[t] for t in texts]))


def layer_scores(
    model: Any, build_task: Any, texts: list[str], out: Path, batch_size: int
) -> dict[str, float]:
    """{layer: kNN accuracy} for every layer of ``model`` on the task ``build_task()`` makes, whose
    texts are ``texts``."""
    from speed_ray.eval.tasks import evaluate

    label = model.model_card_data.model_name or "model"
    texts = list(dict.fromkeys(texts))
    emb = layer_embeddings(model, texts, batch_size)
    scores = {}
    for layer in range(emb.shape[0]):
        encoder = precomputed_encoder(f"{label}-layer{layer}", dict(zip(texts, emb[layer], strict=True)))
        scores[str(layer)] = evaluate(encoder, build_task(), out / "layers", batch_size)["accuracy"]
    return scores


def plot_layers(layers: dict[str, dict[str, float]], task: str, path: Path) -> None:
    """kNN accuracy against layer, one line per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for label, scores in layers.items():
        xs = [int(k) for k in scores]
        ax.plot(xs, [100 * scores[str(x)] for x in xs], marker="o", label=label)
    ax.set_title(f"kNN accuracy of each layer's pooled hidden states ({task})")
    ax.set_xlabel("layer (0 = token embeddings)")
    ax.set_ylabel("kNN accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
