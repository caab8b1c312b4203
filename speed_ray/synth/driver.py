"""synth: topics -> tasks -> k samples per example prompt -> judge -> drafts -> revision -> MinHash
dedup, with every model call in an autoscaling Ray Data actor pool.

Produces under ``<run>/synth/``, one folder per step, each finished by a ``_manifest.json``:
- ``tasks/``: one task per topic for its task type (mix from config); STS takes the topic (TASKS);
- ``generations/``: ``samples_per_prompt`` samples per example prompt, parsed or with an ``error``;
- ``judgments/``: best and worst sample per prompt from ``synth.judge`` (JUDGMENTS; only with a judge);
- ``pairs/``: preference pairs for DPO, from the judge or, without one, a rule-based score;
- ``drafts/``: one example per prompt: the judge's best sample, else the first valid one;
- ``revisions/``: each draft rewritten once by ``synth.reviser`` (only with a reviser);
- ``examples/``: the final rows (revision where it parsed, else the draft), near duplicates removed,
  with their instruction, task type, topic and provenance (EXAMPLES);
- ``neighbours/``: the retriever's ranking of the corpus for each example's query (NEIGHBOURS; only
  with the round-trip filter or mining on, ``speed_ray.synth.neighbours``);
- ``filtered/``: the examples the quality filters keep, with their mined hard negatives (FILTERED;
  every drop counted by reason in its manifest, ``speed_ray.synth.filters``);
- ``train/``: the filtered rows as the embedding training set in sentence-transformers' columns,
  exactly ``anchor`` (``Instruct: {instruction}\nQuery: {query}``), ``positive`` and ``negative``
  (TRIPLETS), or ``negative_1`` .. ``negative_n`` when rows have more than one negative:
  ``datasets.load_dataset("parquet", ...)`` loads it and ``SentenceTransformerTrainer`` trains on it.

With ``synth.source: pairs`` the user's pairs file is the ``examples/`` step, and only the steps
after it run (no engine).

The loop's steps are ``speed_ray.synth.loop.Loop``'s, which align runs too. The model-calling steps
write fixed shards as they complete (``speed_ray.io.shards``): a killed run keeps them, and the rerun
only sends the missing shards' rows to the engine.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from itertools import islice
from pathlib import Path
from typing import Any

import pyarrow as pa

from speed_ray.config import SpeedRayConfig
from speed_ray.io.data import iter_pairs, locate_input
from speed_ray.io.fingerprint import path_hash
from speed_ray.io.models import resolve_model
from speed_ray.io.schemas import (
    DOCUMENTS,
    EXAMPLES,
    FILTERED,
    GENERATIONS,
    MANIFEST,
    NEIGHBOURS,
    QUERIES,
    cast_rows,
    finished_manifest,
    shard_name,
    split_query,
    triplets_schema,
    write_json_atomic,
    write_manifest,
    write_stage,
)
from speed_ray.io.settings import ConfigError
from speed_ray.io.steps import log, pending, remove, step
from speed_ray.synth import filters, grounded, speed
from speed_ray.synth.dedup import drop_shard
from speed_ray.synth.loop import Loop
from speed_ray.synth.stage import SHARD_MAP_CPUS, derive_step

logger = logging.getLogger(__name__)

# What each step's output depends on (``speed_ray.io.fingerprint``): config keys, as dotted prefixes,
# besides the outputs of the steps it reads and its engine's section (named where the step runs).
SAMPLING = ("synth.sampling.temperature", "synth.sampling.top_p")
KEYS = {
    "tasks": (
        "run.seed",
        "synth.taxonomy",
        "synth.num_topics",
        "synth.mix",
        "synth.sampling.max_field_chars",
        "synth.sampling.brainstorm_max_tokens",
        *SAMPLING,
    ),
    "generations": (
        "run.seed",
        "synth.examples_per_task",
        "synth.sampling.max_field_chars",
        "synth.sampling.max_tokens",
        "synth.sampling.samples_per_prompt",
        *SAMPLING,
    ),
    "judgments": ("run.seed", "synth.sampling.max_field_chars", "synth.sampling.judge_max_tokens"),
    "pairs": (),
    "drafts": (),
    "revisions": (
        "run.seed",
        "synth.sampling.max_field_chars",
        "synth.sampling.revise_max_tokens",
        *SAMPLING,
    ),
    "documents": (
        "synth.corpus.path",
        "synth.corpus.exclude",
        "synth.corpus.min_chars",
        "synth.corpus.chunk_chars",
        "synth.shard_rows",
    ),
    "queries": (
        "run.seed",
        "synth.corpus.kinds",
        "synth.corpus.max_docs",
        "synth.sampling.max_field_chars",
        "synth.sampling.max_tokens",
        *SAMPLING,
    ),
    "examples": ("run.seed", "synth.dedup"),
    "neighbours": ("synth.retriever", "synth.mining.top_k"),
    "filtered": ("synth.filters", "synth.mining.negatives", "synth.mining.max_ratio"),
    "train": (),  # the filtered examples alone
}


def synth_keys(cfg: SpeedRayConfig) -> dict[str, tuple[str, ...]]:
    """``KEYS``, with ``embed.model`` / ``embed.pooling`` under ``neighbours`` where the retriever
    takes them (``synth.retriever.model`` / ``pooling`` null)."""
    r = cfg.synth.retriever
    defaults = tuple(k for k, v in (("embed.model", r.model), ("embed.pooling", r.pooling)) if v is None)
    return KEYS | {"neighbours": (*KEYS["neighbours"], *defaults)}


def run(cfg: SpeedRayConfig, generator: Any = None) -> dict:
    """Every synth step; ``generator``: an engine object for every call instead of the configured
    engines (benchmarks)."""
    loop = Loop(cfg, "synth", synth_keys(cfg), generator)
    for eng in cfg.synth.engines().values():
        if eng.model.startswith("run:"):
            resolve_model(
                eng.model, cfg.run_dir
            )  # fails now, not after the first steps, if align has not run
    m = {}
    if cfg.synth.has_documents():
        m["documents"] = loop.step("documents", lambda: documents_step(cfg, loop.out / "documents"))
    sources = {"taxonomy": speed_steps, "corpus": grounded_steps, "pairs": pairs_steps}
    m |= sources[cfg.synth.source](cfg, loop)
    m |= filtered_steps(cfg, loop)
    m["train"] = loop.step("train", lambda: training_set_step(cfg, loop.out), ("filtered",))
    return m


def speed_steps(cfg: SpeedRayConfig, loop: Loop) -> dict:
    """SPEED: tasks brainstormed per topic -> samples -> judge -> pairs -> drafts -> revisions ->
    examples."""
    sc = cfg.synth
    try:
        topics = speed.load_topics(sc.taxonomy.path, sc.taxonomy.topics, sc.num_topics, cfg.run.seed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    logger.info(f"synth: {len(topics)} topics, mix {sc.mix}, generator {sc.engine.kind}:{sc.engine.model}")
    brainstormer = "synth.brainstormer" if sc.brainstormer is not None else "synth.engine"
    m = {"tasks": loop.tasks(topics, brainstormer)}
    m["generations"] = loop.samples(
        "generations", "synth.engine", sc.examples_per_task, sc.sampling.samples_per_prompt
    )
    judged = _optional(loop, m, "judgments", "synth.judge", lambda: loop.judge("generations", "synth.judge"))
    m["pairs"] = loop.pairs("generations", judged)
    m["drafts"] = loop.drafts("generations", judged)
    revised = _optional(loop, m, "revisions", "synth.reviser", lambda: loop.revise("drafts", "synth.reviser"))
    reads = ("drafts", "revisions") if revised else ("drafts",)
    folders = [(loop.out / name, GENERATIONS) for name in reads]
    build = lambda: examples_step(cfg, loop.out, folders, speed.final_shard)  # noqa: E731
    m["examples"] = loop.step("examples", build, reads)
    return m


def grounded_steps(cfg: SpeedRayConfig, loop: Loop) -> dict:
    """Queries grounded in the user's corpus: documents (chunks) -> one query of each kind per chunk,
    by ``synth.engine`` -> examples (each query with its chunk as the positive), near duplicates
    removed."""
    c, s = cfg.synth.corpus, cfg.synth.sampling
    logger.info(f"synth: queries ({', '.join(c.kinds)}) grounded in {c.path}, by {cfg.synth.engine.model}")
    m = {}

    def queries() -> dict:
        kw = {"seed": cfg.run.seed, "kinds": c.kinds, "max_chars": s.max_field_chars}
        kw["only"] = sampled_chunks(loop.out / "documents", c.max_docs, cfg.run.seed)
        reads = [(loop.out / "documents", DOCUMENTS)]
        params = loop.params(s.max_tokens)
        parse = grounded.parse_queries
        return loop.generate_from(
            "queries", "synth.engine", reads, grounded.query_requests, kw, QUERIES, parse, params
        )

    m["queries"] = loop.step("queries", queries, ("documents",), "synth.engine")
    reads = [(loop.out / "queries", QUERIES)]
    build = lambda: examples_step(cfg, loop.out, reads, grounded.grounded_examples)  # noqa: E731
    m["examples"] = loop.step("examples", build, ("queries",))
    return m


def documents_step(cfg: SpeedRayConfig, out: Path) -> dict:
    """The corpus as DOCUMENTS shards of ``synth.shard_rows`` chunks, streamed a document at a time:
    the excluded documents left out, long documents cut into chunks, short chunks counted and
    dropped. Every chunk stays here, the corpus that mining and the round trip rank; only a sample
    of them gets queries (``sampled_chunks``)."""
    from collections import Counter

    from speed_ray.embed.data import chunks
    from speed_ray.io.data import document_ids, iter_corpus

    started, c = time.time(), cfg.synth.corpus
    path = locate_input(str(c.path))
    excluded = document_ids(locate_input(c.exclude)) if c.exclude else set()
    counts = Counter[str]({"excluded": len(excluded)})  # filled as the shards are written
    docs = (d for d in iter_corpus(path) if d["id"] not in excluded)
    rows = grounded.document_chunks(docs, c.chunk_chars, c.min_chars, counts)
    tables = chunks(rows, DOCUMENTS, cfg.synth.shard_rows)
    manifest = write_stage(out, tables, DOCUMENTS, counts, started)
    logger.info(f"synth/documents: {dict(counts)}")
    return manifest


def sampled_chunks(documents: Path, max_docs: int, seed: int) -> set[str] | None:
    """The ids of the chunks that get queries: a seeded sample of ``max_docs`` (a smaller sample
    lies inside a larger one), or None for all."""
    from speed_ray.io.data import nested_sample
    from speed_ray.io.schemas import stage_shards

    if not max_docs:
        return None
    ids = [i for shard in stage_shards(documents, DOCUMENTS, ["id"]) for i in shard["id"].to_pylist()]
    return set(nested_sample(ids, max_docs, seed))


def pairs_steps(cfg: SpeedRayConfig, loop: Loop) -> dict:
    """A user's pairs file as the examples: nothing is generated, the filters and mining still apply."""
    path = cfg.synth.pairs
    assert path is not None  # validated
    fingerprint = cfg.fingerprint(("synth.pairs",), {"synth.pairs": path_hash(path)})
    out = loop.out / "examples"
    return {"examples": step(out, "synth/examples", lambda: pairs_examples_step(cfg, out), fingerprint)}


def pairs_examples_step(cfg: SpeedRayConfig, out_dir: Path) -> dict:
    """``synth.pairs`` read row by row (``iter_pairs``) into EXAMPLES shards of ``synth.shard_rows``."""
    started = time.time()
    path = str(cfg.synth.pairs)
    rows = (pair_example(n, p) for n, p in enumerate(iter_pairs(locate_input(path)), 1))
    tables = (cast_rows(list(chunk), EXAMPLES) for chunk in batched(rows, cfg.synth.shard_rows))
    manifest = write_stage(out_dir, tables, EXAMPLES, {"source": "pairs", "pairs": path}, started)
    logger.info(f"synth/examples: {manifest['num_rows']} rows from {path}")
    return manifest


def pair_example(n: int, pair: dict[str, Any]) -> dict[str, Any]:
    """Row ``n`` (from 1) of a pairs file (``iter_pairs``) as an EXAMPLES row: the anchor split into
    instruction and query, the first negative kept (EXAMPLES has one; mining adds more), and an id
    from the row's number and texts, the same on every run."""
    instruction, query = split_query(pair["anchor"])
    negatives = pair["negatives"]
    return {
        "id": speed.stable_id("pairs", n, pair["anchor"], pair["positive"]),
        "instruction": instruction,
        "query": query,
        "positive": pair["positive"],
        "negative": negatives[0] if negatives else None,
        "task_type": "pairs",
        "round": "pairs",
    }


def filtered_steps(cfg: SpeedRayConfig, loop: Loop) -> dict:
    """``neighbours`` (only when a filter or the mining needs the retriever's ranking), then
    ``filtered``: the examples the quality filters keep, with their mined negatives."""
    from speed_ray.synth.neighbours import neighbours_step

    m = {}
    if cfg.synth.needs_retriever():
        reads = ("examples", "documents") if cfg.synth.has_documents() else ("examples",)
        m["neighbours"] = loop.step("neighbours", lambda: neighbours_step(cfg, loop.out), reads)
    else:
        _no_longer_configured(
            loop.out / "neighbours", "synth/neighbours", "synth.mining.negatives/round_trip_k"
        )
    reads = ("examples", "neighbours") if "neighbours" in m else ("examples",)
    m["filtered"] = loop.step("filtered", lambda: filtered_step(cfg, loop.out, "neighbours" in m), reads)
    return m


def filtered_step(cfg: SpeedRayConfig, out: Path, ranked: bool) -> dict:
    """``synth/filtered`` shard by shard (``filters.filtered_shard``), with at most three dropped rows
    per reason kept in the manifest."""
    f, mining = cfg.synth.filters, cfg.synth.mining
    kw = {
        "enabled": f.enabled,
        "min_query_words": f.min_query_words,
        "min_query_chars": f.min_query_chars,
        "round_trip_k": f.round_trip_k,
        "negatives": mining.negatives,
        "max_ratio": mining.max_ratio,
    }
    reads = [(out / "examples", EXAMPLES)] + ([(out / "neighbours", NEIGHBOURS)] if ranked else [])
    manifest = derive_step(cfg, out / "filtered", FILTERED, reads, filters.filtered_shard, kw)
    manifest["samples"] = filters.trim_samples(manifest.get("samples", {}))
    write_json_atomic(out / "filtered" / MANIFEST, manifest)
    dropped = sum(manifest.get("dropped", {}).values())
    logger.info(
        f"synth/filtered: kept {manifest['num_rows']} of {manifest.get('rows_in', 0)} rows "
        f"(dropped {dropped}: {manifest.get('dropped', {})}; negatives dropped "
        f"{manifest.get('negatives_dropped', {})}; {manifest.get('mined', 0)} negatives mined)"
    )
    return manifest


def _optional(loop: Loop, manifests: dict, name: str, key: str, build: Callable[[], dict]) -> bool:
    """Step ``name`` when its engine ``key`` is configured; a folder left from a run that had it is
    stale, so removed. Whether the step ran."""
    if key in loop.cfg.synth.engines():
        manifests[name] = build()
        return True
    _no_longer_configured(loop.out / name, f"synth/{name}", key)
    return False


def _no_longer_configured(out_dir: Path, name: str, key: str) -> None:
    """An optional step's folder from a run that had it configured: stale, so removed."""
    if out_dir.exists():
        log(f"{name}: stale: {key} is null now; removed {out_dir}")
    for path in (out_dir, pending(out_dir)):
        remove(path)


def examples_step(cfg: SpeedRayConfig, out: Path, reads: list[tuple[Path, pa.Schema]], fn: Callable) -> dict:
    """The example rows ``fn`` makes from each shard of ``reads`` (SPEED: each draft's revision where
    it parsed; grounded: a row per query), then MinHash LSH near-duplicate removal on Ray Data: the candidates are written to ``examples/_candidates``, read by ``near_duplicates``,
    and written again without the removed ids, shard by shard; only the duplicate edges and removed
    ids pass through the driver."""
    started = time.time()
    dd = cfg.synth.dedup
    if not dd.enabled:
        return derive_step(cfg, out / "examples", EXAMPLES, reads, fn)
    candidates = out / "examples" / CANDIDATES
    found = derive_step(cfg, candidates, EXAMPLES, reads, fn)
    made = ("drafts", "revised", "chunks", "queries", "copied_example", "failed")
    extra = {k: found[k] for k in made if k in found}
    removed = pa.array([], pa.string())
    if found["num_rows"] > 1:
        import ray

        from speed_ray.synth.dedup import near_duplicates

        files = [str(candidates / f["name"]) for f in found["files"]]
        gone, extra["dedup"], removed = near_duplicates(
            ray.data.read_parquet(files),
            # a grounded row's positive is a whole document that each of its queries shares
            ["query"] if cfg.synth.source == "corpus" else ["query", "positive"],
            threshold=dd.threshold,
            num_perm=dd.num_perm,
            shingle_size=dd.shingle_size,
            seed=cfg.run.seed,
            # Shuffle partitions grow with the data (Ray's default of 200 is slow on a laptop).
            num_partitions=min(200, max(2, found["num_rows"] // 5000)),
        )
        logger.info(f"synth/examples: MinHash dedup removed {len(gone)} of {found['num_rows']} rows")
    reads = [(candidates, EXAMPLES)]
    kw = {"removed": removed}
    manifest = derive_step(cfg, out / "examples", EXAMPLES, reads, drop_shard, kw, extra, started)
    remove(candidates)
    return manifest


def batched(rows: Iterator[dict[str, Any]], n: int) -> Iterator[list[dict[str, Any]]]:
    """``rows`` in lists of ``n`` (the last one shorter); ``itertools.batched`` from Python 3.12."""
    while chunk := list(islice(rows, n)):
        yield chunk


CANDIDATES = "_candidates"
"""The examples before dedup, inside the examples folder until it is finished."""


def training_set_step(cfg: SpeedRayConfig, out: Path) -> dict:
    """``filtered/`` as the embedding training set: the text columns and nothing else, since
    sentence-transformers embeds every column of its training dataset; as many negative columns as
    the row with the most negatives has (``triplets_schema``).

    The rows are in example-id order (a hash of the prompt: a seeded shuffle of the examples that does
    not depend on how they were sharded), so training draws the same batches however the steps before
    were split: a Ray Data sort by id, each sorted block written as one shard by the worker that holds
    it. The step is cheap next to the ones before, so a killed run makes it again whole."""
    import ray

    from speed_ray.ray_utils import init_ray

    started = time.time()
    dest = out / "train"
    remove(dest)  # parts of a killed run
    dest.mkdir(parents=True)
    examples = finished_manifest(out / "filtered")
    negatives = max([1, *map(int, examples.get("negatives_per_row", {}))])
    parts: list[dict[str, Any]] = []
    if examples["num_rows"]:
        init_ray(cfg)
        ds: Any = ray.data.read_parquet([str(out / "filtered" / f["name"]) for f in examples["files"]])
        ds = ds.sort("id").map_batches(
            speed.write_triplets_part,
            fn_kwargs={"out_dir": dest, "negatives": negatives},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=SHARD_MAP_CPUS,
        )
        parts = [r for b in ds.iter_batches(batch_format="pyarrow", batch_size=None) for r in b.to_pylist()]
    files = []
    for i, part in enumerate(sorted(parts, key=lambda p: p.pop("first_id"))):
        (dest / part["name"]).rename(dest / shard_name(i))
        files.append(part | {"name": shard_name(i)})
    n = sum(f["num_rows"] for f in files)
    extra = {"examples": n, "order": "example id", "negatives": negatives}
    return write_manifest(dest, triplets_schema(negatives), files, extra, started)
