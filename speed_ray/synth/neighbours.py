"""``synth/neighbours``: the retriever (``synth.retriever``, by default the base embedder
``embed.model``) ranks the corpus for every example's query, once, for both the round-trip filter and
the mining (``speed_ray.synth.filters``, ``speed_ray.synth.mining``).

Two Ray Data actor pools, each actor loading the model once: ``EmbedStage`` embeds the corpus, whose
matrix the driver puts in the object store once; ``NeighboursStage`` then takes the examples shard by
shard, embeds the queries and ranks the corpus exactly (blockwise matrix products over the shared,
zero-copy matrix), and writes shard ``s`` of the step with the same record as a derived step
(``speed_ray.io.shards``): a killed run keeps its finished shards and ranks only the others (the
corpus is embedded again).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from speed_ray.config import SpeedRayConfig
from speed_ray.io.schemas import DOCUMENTS, EXAMPLES, NEIGHBOURS, cast_rows, stage_shards
from speed_ray.io.shards import DONE, finish_derived, finished_shards, read_shard, write_record
from speed_ray.synth.mining import ANY, documents_corpus, rank_corpus, row_corpus
from speed_ray.synth.stage import shard_count

logger = logging.getLogger(__name__)


def load_embedder(spec: str, pooling: str, max_seq_length: int, num_cpus: float, num_gpus: float) -> Any:
    """The retriever as embed builds its base model (``embed.model.build_model``: Transformer ->
    Pooling -> Normalize), on the actor's GPU when it has one, with as many torch threads as CPUs."""
    import torch

    from speed_ray.embed.model import build_model
    from speed_ray.io.models import resolve_model

    torch.set_num_threads(max(1, int(num_cpus)))
    return build_model(resolve_model(spec), pooling, max_seq_length, "cuda" if num_gpus else "cpu")


def encode(model: Any, texts: list[str], batch_size: int) -> np.ndarray:
    """[len(texts), d] float32 unit vectors."""
    return np.asarray(
        model.encode(texts, batch_size=batch_size, convert_to_numpy=True, normalize_embeddings=True),
        dtype=np.float32,
    )


class EmbedStage:
    REQUIRED_COLUMNS = {"index": "row of the corpus matrix", "text": "the text to embed"}
    OUTPUT_COLUMNS = {"index": "row of the corpus matrix", "embedding": "unit vector (float32 list)"}

    def __init__(self, model: dict[str, Any], batch_size: int) -> None:
        self.model, self.batch_size = load_embedder(**model), batch_size

    def __call__(self, batch: pa.Table) -> pa.Table:
        vectors = encode(self.model, batch["text"].to_pylist(), self.batch_size)
        return pa.table({"index": batch["index"], "embedding": pa.array(list(vectors))})


class NeighboursStage:
    REQUIRED_COLUMNS = {"shard": "a shard of synth/examples to rank the corpus for"}
    OUTPUT_COLUMNS = {"shard": "the shard written", "rows": "its rows"}

    def __init__(
        self,
        model: dict[str, Any],
        batch_size: int,
        corpus: list,
        grouped: bool,
        out_dir: Path,
        examples: Path,
        k: int,
    ) -> None:
        """``corpus``: [ObjectRef of (embeddings [m, d], groups, texts)], put once by the driver (in a
        list, so Ray hands the actor the reference); ``grouped``: the corpus is the examples' own
        texts, kept apart by task type."""
        import ray

        self.model, self.batch_size = load_embedder(**model), batch_size
        self.matrix, self.groups, self.texts = ray.get(corpus[0])  # the matrix: zero-copy, shared
        self.index = {(g, t): i for i, (g, t) in enumerate(zip(self.groups, self.texts, strict=True))}
        self.grouped = grouped
        self.out_dir, self.examples, self.k, self.pooling = out_dir, examples, k, model["pooling"]

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.write(s) for s in batch["shard"].to_pylist()]
        return pa.table({"shard": batch["shard"], "rows": pa.array(rows, pa.int64())})

    def write(self, s: int) -> int:
        """Shard ``s``: each example's positive rank and top-k candidates, written with its record."""
        from speed_ray.embed.model import format_query

        rows = read_shard(self.examples, s, EXAMPLES).to_pylist()
        groups = [(r["task_type"] or ANY) if self.grouped else ANY for r in rows]
        missing = [r["id"] for r, g in zip(rows, groups, strict=True) if (g, r["positive"]) not in self.index]
        if missing:
            raise ValueError(
                f"synth/neighbours: the positives of examples {missing[:3]} are not in the corpus"
            )
        out = []
        if rows:
            texts = [format_query(r["instruction"], r["query"], self.pooling) for r in rows]
            positives = [self.index[(g, r["positive"])] for r, g in zip(rows, groups, strict=True)]
            q = encode(self.model, texts, self.batch_size)
            idx, scores, pos, ranks = rank_corpus(q, self.matrix, groups, self.groups, positives, self.k)
            for i, r in enumerate(rows):
                found = idx[i] >= 0
                out.append(
                    {
                        "id": r["id"],
                        "positive_score": float(pos[i]),
                        "rank": int(ranks[i]),
                        "candidates": [self.texts[j] for j in idx[i][found]],
                        "scores": [float(x) for x in scores[i][found]],
                    }
                )
        write_record(self.out_dir, s, cast_rows(out, NEIGHBOURS), NEIGHBOURS, {"counts": {}})
        return len(out)


def neighbours_step(cfg: SpeedRayConfig, out: Path) -> dict:
    """``synth/neighbours`` from ``synth/examples``, against ``synth/documents`` when the run has it
    (grounded queries), else against the examples' own positives and negatives."""
    import ray

    from speed_ray.ray_utils import init_ray, require_resources

    started = time.time()
    dest, examples = out / "neighbours", out / "examples"
    num_shards = shard_count([(examples, EXAMPLES)])
    dest.mkdir(parents=True, exist_ok=True)
    (dest / DONE).mkdir(exist_ok=True)
    todo = [s for s in range(num_shards) if s not in finished_shards(dest)]
    grouped = not cfg.synth.has_documents()  # else every row ranks against the documents
    corpus = _corpus(out, grouped)
    r = cfg.synth.retriever
    spec, pooling = cfg.retriever()
    extra = {"model": spec, "pooling": pooling, "corpus": len(corpus), "top_k": cfg.synth.mining.top_k}
    if todo and corpus:
        model = dict(
            spec=spec,
            pooling=pooling,
            max_seq_length=r.max_seq_length,
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
        )
        # [1] Ray: start or join the cluster, and wait for room for the pool.
        init_ray(cfg)
        require_resources(cfg, f"retriever {spec}", r.num_cpus, r.num_gpus, count=r.actors)
        # [2] The corpus embedded by one actor pool, into one matrix put in the object store once.
        matrix = _embed_corpus(corpus, model, r.batch_size, r.actors)
        ref = ray.put((matrix, [g for g, _ in corpus], [t for _, t in corpus]))
        logger.info(f"synth/neighbours: {len(corpus)} corpus texts embedded; ranking {len(todo)} shards")
        # [3] The queries, shard by shard, ranked by a second pool that reads the matrix in place.
        kw = dict(
            model=model,
            batch_size=r.batch_size,
            corpus=[ref],
            grouped=grouped,
            out_dir=dest,
            examples=examples,
        )
        ds: Any = ray.data.from_items([{"shard": s} for s in todo])
        ds = ds.map_batches(
            NeighboursStage,
            fn_constructor_kwargs=kw | {"k": cfg.synth.mining.top_k},
            batch_size=1,
            batch_format="pyarrow",
            compute=ray.data.ActorPoolStrategy(size=r.actors),
            num_cpus=r.num_cpus,
            num_gpus=r.num_gpus,
        )
        # [4] Only shard numbers and row counts come back.
        written = sum(b["rows"] for b in ds.iter_rows())
    else:
        written = 0
        for s in todo:  # no corpus (no examples): empty shards
            write_record(dest, s, NEIGHBOURS.empty_table(), NEIGHBOURS, {"counts": {}})
    return finish_derived(dest, NEIGHBOURS, num_shards, extra, started, written)


def _corpus(out: Path, grouped: bool) -> list[tuple[str, str]]:
    """The texts to rank: the examples' own, by task type (``grouped``); else ``synth/documents``
    and after them any positive or negative of the examples that is not a document (a pairs file's
    rows ranked against the user's corpus)."""
    rows = row_corpus(stage_shards(out / "examples", EXAMPLES, ["task_type", "positive", "negative"]))
    if grouped:
        return rows
    docs = documents_corpus(stage_shards(out / "documents", DOCUMENTS, ["text"]))
    known = {t for _, t in docs}
    extra = dict.fromkeys((ANY, t) for _, t in rows if t not in known)
    return docs + list(extra)


def _embed_corpus(
    corpus: list[tuple[str, str]], model: dict[str, Any], batch_size: int, actors: int
) -> np.ndarray:
    """[len(corpus), d] float32: the texts through an ``EmbedStage`` pool, put back in corpus order."""
    import ray

    ds: Any = ray.data.from_items([{"index": i, "text": t} for i, (_, t) in enumerate(corpus)])
    ds = ds.map_batches(
        EmbedStage,
        fn_constructor_kwargs={"model": model, "batch_size": batch_size},
        batch_size=batch_size * 4,
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=model["num_cpus"],
        num_gpus=model["num_gpus"],
    )
    matrix: np.ndarray | None = None
    for b in ds.iter_batches(batch_format="numpy", batch_size=None):
        vectors = np.stack(list(b["embedding"])).astype(np.float32)
        if matrix is None:
            matrix = np.empty((len(corpus), vectors.shape[1]), dtype=np.float32)
        matrix[b["index"]] = vectors
    assert matrix is not None
    return matrix
