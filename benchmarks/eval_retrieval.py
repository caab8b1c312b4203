"""speed-ray's mteb evaluation of the whole Debian retrieval set (5,000 documents, 1,000 queries) with
all-MiniLM-L6-v2, against the reference: sentence-transformers alone (encode the corpus and the
queries, cosine top-10, nDCG@10 computed here), side by side in one run.

  (a) ours, cold: ``speed_ray.eval.tasks`` (the task read from the BEIR folder, mteb's retrieval
      evaluator, results in mteb's layout), embeddings cache empty;
  (b) ours, warm: the same again, every embedding from the cache;
  (c) reference: ``SentenceTransformer.encode`` + ``sentence_transformers.util.semantic_search``.

Same model, max_seq_length, batch size and thread count. The target (issue 7): (a) under 3 minutes
on this 2-core box; ratio = reference seconds / ours (>= 1.0: ours as fast). Both nDCG@10 figures are
recorded: they must agree.

    python benchmarks/eval_retrieval.py [--seq-len 128] [--batch 64]

Writes benchmarks/results/eval_retrieval.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from speed_ray.io.data import locate  # noqa: E402

RETRIEVAL = locate("builtin:debian/retrieval")
for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(var, "1")

from benchmarks.trainer_vs_st import code_state  # noqa: E402


def reference(model, seq_len: int, batch: int) -> tuple[float, float]:
    """(seconds, nDCG@10) with sentence-transformers alone."""
    from sentence_transformers.util import semantic_search

    from speed_ray.io.data import read_beir

    t0 = time.perf_counter()
    corpus, queries, qrels = read_beir(RETRIEVAL)
    docs = model.encode(
        [(d["title"] + " " + d["text"]).strip() for d in corpus], batch_size=batch, convert_to_tensor=True
    )
    qs = model.encode([q["text"] for q in queries], batch_size=batch, convert_to_tensor=True)
    hits = semantic_search(qs, docs, top_k=10)
    seconds = time.perf_counter() - t0
    ndcgs = []
    for q, found in zip(queries, hits, strict=True):
        rel = qrels.get(q["id"], {})
        dcg = sum(
            1 / math.log2(rank + 2) for rank, h in enumerate(found) if corpus[h["corpus_id"]]["id"] in rel
        )
        ideal = sum(1 / math.log2(rank + 2) for rank in range(min(len(rel), 10)))
        ndcgs.append(dcg / ideal if ideal else 0.0)
    return seconds, sum(ndcgs) / len(ndcgs)


def ours(model, cache: Path, out: Path, batch: int) -> tuple[float, float]:
    from speed_ray.eval.tasks import as_mteb_model, evaluate, retrieval_task

    t0 = time.perf_counter()
    s = evaluate(
        as_mteb_model(model, "all-minilm-l6-v2", cache),
        retrieval_task("DebianPackageRetrieval", RETRIEVAL),
        out,
        batch,
    )
    return time.perf_counter() - t0, s["ndcg_at_10"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--out", default=str(REPO / "benchmarks/results/eval_retrieval.json"))
    args = p.parse_args()

    import torch

    from speed_ray.embed.model import build_model
    from speed_ray.io.models import resolve_model

    model = build_model(resolve_model("all-minilm-l6-v2"), "mean", args.seq_len)
    with tempfile.TemporaryDirectory() as tmp:
        cold_s, cold_ndcg = ours(model, Path(tmp) / "cache", Path(tmp), args.batch)
        warm_s, warm_ndcg = ours(model, Path(tmp) / "cache", Path(tmp), args.batch)
    ref_s, ref_ndcg = reference(model, args.seq_len, args.batch)
    result = {
        "benchmark": "eval_retrieval",
        "task": "Debian retrieval: 5,000 documents, 1,000 queries",
        "model": "all-MiniLM-L6-v2",
        "seq_len": args.seq_len,
        "batch": args.batch,
        "ours_cold_s": round(cold_s, 1),
        "ours_warm_cache_s": round(warm_s, 1),
        "reference_st_s": round(ref_s, 1),
        "ratio_cold": round(ref_s / cold_s, 3),
        "ndcg_at_10": {
            "ours": round(cold_ndcg, 5),
            "ours_warm": round(warm_ndcg, 5),
            "reference": round(ref_ndcg, 5),
        },
        "target_s": 180,
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "platform": platform.platform(),
        },
        "code": code_state(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
