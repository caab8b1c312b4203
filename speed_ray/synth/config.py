"""The ``synth.*`` section: topics, task mix, the engines of each step, sampling, dedup, sharding."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from speed_ray.engines.config import EngineConfig
from speed_ray.io.schemas import QUERY_KINDS
from speed_ray.io.settings import (
    ConfigError,
    check_choices,
    check_non_negative,
    check_positive,
    check_rows,
)

TASK_TYPES = ("classification", "sts", "retrieval", "text_matching")
SOURCES = ("taxonomy", "corpus", "pairs")
# Keys that change how fast synth runs, never what it writes (``speed_ray.io.fingerprint``).
RUNTIME = (
    "synth.shard_rows",
    "synth.retriever.batch_size",
    "synth.retriever.num_cpus",
    "synth.retriever.num_gpus",
    "synth.retriever.actors",
)


@dataclass
class SamplingConfig:
    temperature: float = 1.0
    """SPEED App. B: temperature 1.0 and top_p 1.0 for all synthesis."""
    top_p: float = 1.0
    max_tokens: int = 512
    """Completion budget for one example."""
    samples_per_prompt: int = 2
    """Samples per example prompt (k); with k > 1 the judge forms preference pairs."""
    brainstorm_max_tokens: int = 160
    judge_max_tokens: int = 256
    """The judge samples at temperature 0 (SPEED App. B)."""
    revise_max_tokens: int = 768
    max_field_chars: int = 800
    """Upper bound on each generated JSON string field (keeps structured output finite)."""


@dataclass
class TaxonomyConfig:
    path: str | None = None
    """A file with one ``A/B/C`` topic path per line (``#`` comments); None: the built-in taxonomy."""
    topics: list[str] = field(default_factory=list)
    """Inline topic paths; when given they replace the file."""


@dataclass
class DedupConfig:
    enabled: bool = True
    threshold: float = 0.8
    """MinHash LSH: rows whose estimated Jaccard similarity reaches this are near duplicates."""
    num_perm: int = 128
    shingle_size: int = 3
    """Word n-grams per shingle."""


@dataclass
class CorpusConfig:
    """``synth.source: corpus``: queries grounded in the user's own documents (Promptagator, InPars;
    NVIDIA's domain-specific embedding recipe): for each document or chunk the generator writes one
    query of each kind, and the document is the positive."""

    path: str | None = None
    """The documents: a JSONL file (or .jsonl.gz) with ``id`` and ``text`` per row, a built-in set
    (``builtin:debian/labelled``) or a file on object storage. With any source, also the corpus
    that hard negatives are mined from and the round trip ranks (else the rows' own texts)."""
    exclude: str | None = None
    """Leave out the documents whose ids are in this corpus (a JSONL file or a BEIR folder such as
    ``builtin:debian/retrieval``): the documents an evaluation scores are never trained on."""
    max_docs: int = 0
    """Queries for every document (0), or for a seeded sample of N documents (chunks; a smaller
    sample lies inside a larger one). Every document stays in the corpus that mining ranks."""
    min_chars: int = 100
    """Documents (or chunks) shorter than this give no query; counted in the manifest."""
    chunk_chars: int = 1500
    """Longer documents are cut into chunks of at most this many characters, at paragraph or
    sentence ends; each chunk is a positive of its own (id ``<doc id>#<n>``)."""
    kinds: list[str] = field(default_factory=lambda: list(QUERY_KINDS))
    """The queries written per chunk: keyword (a short search-box query), question (a natural
    question the chunk answers), paraphrase (one sentence saying what the chunk says in other words)."""

    def validate(self) -> None:
        if self.path is None:
            raise ConfigError("synth.corpus.path: required when synth.source is 'corpus' (a JSONL corpus)")
        unknown = [k for k in self.kinds if k not in QUERY_KINDS]
        if unknown or not self.kinds:
            raise ConfigError(
                f"synth.corpus.kinds: expected a non-empty list of {', '.join(QUERY_KINDS)}, got {self.kinds}"
            )
        check_non_negative({"synth.corpus.max_docs": self.max_docs, "synth.corpus.min_chars": self.min_chars})
        check_positive({"synth.corpus.chunk_chars": self.chunk_chars})
        if self.min_chars > self.chunk_chars:
            raise ConfigError(
                f"synth.corpus.min_chars: expected at most chunk_chars ({self.chunk_chars}), got {self.min_chars}"
            )
        check_rows("synth.corpus.path", self.path, "iter_corpus")
        if self.exclude is not None:
            check_rows("synth.corpus.exclude", self.exclude, "document_ids")


@dataclass
class SynthConfig:
    source: str = "taxonomy"
    """taxonomy: SPEED, tasks brainstormed per topic | corpus: queries grounded in ``synth.corpus``
    | pairs: a user's pairs file (``synth.pairs``), no generation: only the filters and mining."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    pairs: str | None = None
    """``synth.source: pairs``: parquet, JSONL, a step folder or a ``datasets`` folder with anchor,
    positive[, negative*] columns."""
    taxonomy: TaxonomyConfig = field(default_factory=TaxonomyConfig)
    num_topics: int = 4
    """How many topics to use (the first N after a seeded shuffle); one task per topic (SPEED Table 3)."""
    mix: dict[str, float] = field(
        default_factory=lambda: {"classification": 7, "sts": 7, "retrieval": 7, "text_matching": 2}
    )
    """Share of topics per task type (SPEED §4.1: 7:7:7:2). Text matching is split evenly into
    short-short and long-long."""
    examples_per_task: int = 1
    """Example prompts per task, each with its own sampled placeholders (scale beyond one per topic)."""
    engine: EngineConfig = field(default_factory=EngineConfig)
    """The generator of the examples."""
    brainstormer: EngineConfig | None = None
    """Brainstorms the tasks (SPEED: the teacher); None: the generator."""
    judge: EngineConfig | None = None
    """Picks best and worst of the k samples per prompt (SPEED §3.2.3); None: a rule-based score."""
    reviser: EngineConfig | None = None
    """Rewrites each example once (SPEED §3.2.4); None: no revision pass."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    shard_rows: int = 256
    """Input rows per output shard: a killed run keeps finished shards and redoes the rest."""
    filters: FiltersConfig = field(default_factory=lambda: FiltersConfig())
    mining: MiningConfig = field(default_factory=lambda: MiningConfig())
    retriever: RetrieverConfig = field(default_factory=lambda: RetrieverConfig())

    def needs_retriever(self) -> bool:
        """Whether a filter or the mining ranks the corpus (``synth/neighbours``), which loads a model."""
        return (self.filters.enabled and self.filters.round_trip_k > 0) or self.mining.negatives > 0

    def has_documents(self) -> bool:
        """Whether the run cuts ``synth.corpus.path`` into ``synth/documents``: what grounded queries
        are written for and, for any source, what the round trip and mining rank."""
        return self.corpus.path is not None

    def engines(self) -> dict[str, EngineConfig]:
        """The configured engines by dotted key (brainstormer, judge and reviser are optional)."""
        engines = {
            "synth.engine": self.engine,
            "synth.brainstormer": self.brainstormer,
            "synth.judge": self.judge,
            "synth.reviser": self.reviser,
        }
        if self.source == "pairs":  # a user's pairs: nothing is generated
            return {}
        return {k: e for k, e in engines.items() if e is not None}

    def validate(self) -> None:
        check_choices({"synth.source": (self.source, SOURCES)})
        if self.source == "corpus" or self.corpus.path is not None:
            self.corpus.validate()
        if self.source == "pairs":
            if self.pairs is None:
                raise ConfigError("synth.pairs: required when synth.source is 'pairs' (a pairs file)")
            if not _later_step(self.pairs):
                check_rows("synth.pairs", self.pairs, "iter_pairs")
        for t, w in self.mix.items():
            if t not in TASK_TYPES:
                raise ConfigError(
                    f"synth.mix.{t}: unknown task type (expected one of {', '.join(TASK_TYPES)})"
                )
            if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
                raise ConfigError(f"synth.mix.{t}: expected a non-negative number, got {w!r}")
        if not any(w > 0 for w in self.mix.values()):
            raise ConfigError("synth.mix: expected at least one task type with a positive share")
        if not 0.0 < self.dedup.threshold <= 1.0:
            raise ConfigError(
                f"synth.dedup.threshold: expected a value in (0, 1], got {self.dedup.threshold}"
            )
        if not 0.0 <= self.sampling.top_p <= 1.0:
            raise ConfigError(f"synth.sampling.top_p: expected a value in [0, 1], got {self.sampling.top_p}")
        check_positive(
            {
                "synth.num_topics": self.num_topics,
                "synth.sampling.max_tokens": self.sampling.max_tokens,
                "synth.sampling.samples_per_prompt": self.sampling.samples_per_prompt,
                "synth.shard_rows": self.shard_rows,
                "synth.examples_per_task": self.examples_per_task,
                "synth.dedup.num_perm": self.dedup.num_perm,
                "synth.dedup.shingle_size": self.dedup.shingle_size,
            }
        )
        self.filters.validate()
        self.mining.validate()
        self.retriever.validate()
        tax = self.taxonomy
        if tax.path is not None and not tax.topics and not Path(tax.path).is_file():
            raise ConfigError(f"synth.taxonomy.path: file {tax.path} not found")


# ----------------------------------------------------------------------------------------------
# Quality filters and hard-negative mining (``synth/neighbours`` and ``synth/filtered``)


@dataclass
class FiltersConfig:
    """What ``synth/filtered`` drops (``speed_ray.synth.filters``), each drop counted by reason."""

    enabled: bool = True
    """The rule filters (placeholders, positive = query, short queries, a negative equal to the
    positive) and, with ``round_trip_k``, the round-trip check; false keeps every row as it is."""
    min_query_words: int = 2
    """A query with fewer words is dropped. 2, not 3: a grounded keyword query ("nginx modules") has
    two; one-word queries ("S1", "it") are what a small generator writes when it fails."""
    min_query_chars: int = 6
    """...and with fewer characters (surrounding blanks aside): two tiny words ("a b") say nothing."""
    round_trip_k: int = 0
    """Round-trip consistency (Promptagator, InPars): a row is kept only when ``synth.retriever``
    ranks its own positive within the top k of the corpus for its query. 0: off (no model loaded
    for it); 20 suits an all-MiniLM-L6-v2-class retriever."""

    def validate(self) -> None:
        check_non_negative(
            {
                "synth.filters.min_query_words": self.min_query_words,
                "synth.filters.min_query_chars": self.min_query_chars,
                "synth.filters.round_trip_k": self.round_trip_k,
            }
        )


@dataclass
class MiningConfig:
    """Hard negatives mined from the corpus by ``synth.retriever`` (NV-Retriever, arXiv 2407.15831)."""

    negatives: int = 0
    """Mined negatives per row, added after the row's own (generated or given) negative where the
    filters kept one. 0: off."""
    top_k: int = 30
    """Candidates ranked per query (``synth/neighbours``): the negatives are the first ``negatives``
    of them that survive the false-negative guard."""
    max_ratio: float = 0.95
    """NV-Retriever's TopK-PercPos guard: a candidate scoring above ``max_ratio`` x the positive's
    score is likely a false negative (another relevant text) and is skipped."""

    def validate(self) -> None:
        check_non_negative({"synth.mining.negatives": self.negatives})
        check_positive({"synth.mining.top_k": self.top_k})
        if self.top_k < self.negatives:
            raise ConfigError(
                f"synth.mining.top_k: expected at least synth.mining.negatives ({self.negatives}), got {self.top_k}"
            )
        if not 0.0 < self.max_ratio <= 1.0:
            raise ConfigError(f"synth.mining.max_ratio: expected a value in (0, 1], got {self.max_ratio}")


@dataclass
class RetrieverConfig:
    """The embedder that ranks the corpus for the round-trip filter and the mining, in a Ray Data actor
    pool (each actor loads it once)."""

    model: str | None = None
    """A model spec (``speed_ray.io.models``); None: ``embed.model``, the base the run fine-tunes."""
    pooling: str | None = None
    """mean | cls | lasttoken; None: ``embed.pooling``."""
    max_seq_length: int = 256
    batch_size: int = 64
    """Texts per encode call."""
    num_cpus: float = 1.0
    """Per actor."""
    num_gpus: float = 0.0
    """Per actor."""
    actors: int = 1

    def validate(self) -> None:
        from speed_ray.embed.config import POOLING_MODES

        if self.pooling is not None:
            check_choices({"synth.retriever.pooling": (self.pooling, POOLING_MODES)})
        check_positive(
            {
                "synth.retriever.max_seq_length": self.max_seq_length,
                "synth.retriever.batch_size": self.batch_size,
                "synth.retriever.num_cpus": self.num_cpus,
                "synth.retriever.actors": self.actors,
            }
        )
        check_non_negative({"synth.retriever.num_gpus": self.num_gpus})


def _later_step(path: str) -> bool:
    """A run's training set not made yet (``<run>/synth/train``, an experiment's shared run that
    comes first): read when the step needs it, which fails then if it is still missing."""
    p = Path(path)
    return not p.exists() and p.parts[-2:] == ("synth", "train")
