"""The models the eval stage scores: ``eval.models`` entries (``label=spec``), which tasks a model can
score, loading one as a SentenceTransformer, and this run's trained model's card with its scores.

A spec is ``base`` (the untouched ``embed.model``), ``trained`` (this run's ``embed/model``), a
baseline (``tfidf``, ``bm25``), another run's model (``run:...``), a folder or a hub name."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from speed_ray.config import SpeedRayConfig
from speed_ray.io.steps import log

if TYPE_CHECKING:
    from speed_ray.eval.task_specs import TaskSpec

BASELINES = ("tfidf", "bm25")


def parse_model(entry: str) -> tuple[str, str]:
    """``label=spec`` or ``spec`` -> (label, spec); a spec's label is its last path part."""
    label, sep, spec = entry.partition("=")
    if not sep:
        spec, label = entry, Path(entry.rstrip("/")).name
    return label, spec


def can_score(spec: str, ts: TaskSpec) -> bool:
    """Whether model ``spec`` scores task ``ts`` at all (BM25 only retrieves; TF-IDF needs texts)."""
    return not (spec == "bm25" and ts.kind != "retrieval" or spec == "tfidf" and ts.texts is None)


def load_model(spec: str, cfg: SpeedRayConfig) -> Any:
    """A SentenceTransformer for ``spec`` with the configured maximum length, and the query/document
    prompts it saved (a model that saved none gets ``eval.retrieval.query_instruction``)."""
    from speed_ray.embed.model import build_model, set_prompts
    from speed_ray.io.models import resolve_model

    ec, ev = cfg.embed, cfg.eval
    if spec == "base":
        model, pooling = build_model(resolve_model(ec.model), ec.pooling, ev.max_seq_length), ec.pooling
    else:
        model, pooling = _load_folder(_model_folder(spec, cfg), ec.pooling, ev.max_seq_length)
    model.max_seq_length = ev.max_seq_length
    if not (model.prompts or {}).get("query"):  # sentence-transformers starts with empty prompts
        set_prompts(model, ev.retrieval.query_instruction, pooling)
    return model


def _model_folder(spec: str, cfg: SpeedRayConfig) -> str:
    """The folder (or hub name) a spec other than ``base`` names; this run's trained model must exist."""
    from speed_ray.io.models import resolve_model

    if spec != "trained":
        return resolve_model(spec, cfg.run_dir)
    path = cfg.run_dir / "embed" / "model"
    if not (path / "_manifest.json").is_file():
        raise FileNotFoundError(f"{path}: no trained model; run `speed-ray embed` first")
    return str(path)


def _load_folder(folder: str, pooling: str, max_seq_length: int) -> tuple[Any, str]:
    """(model, its pooling): a saved SentenceTransformer with the pooling it saved, or a plain
    transformer pooled as ``pooling`` says."""
    from sentence_transformers import SentenceTransformer

    from speed_ray.embed.model import build_model, pooling_module

    if Path(folder).is_dir() and not (Path(folder) / "modules.json").is_file():
        return build_model(folder, pooling, max_seq_length), pooling  # a plain transformer
    model = SentenceTransformer(folder, device="cpu")
    found = pooling_module(model)
    return model, found.get_config_dict()["pooling_mode"] if found else pooling


def card_with_scores(cfg: SpeedRayConfig, model: Any, results: dict[str, tuple[str, str, dict]]) -> None:
    """Regenerate this run's trained model's README.md (sentence-transformers' model card) with the
    eval scores added: ``results`` is {task: (kind, main score name, scores)}."""
    from speed_ray.embed.model import write_model_card
    from speed_ray.io.schemas import read_manifest

    folder = cfg.run_dir / "embed" / "model"
    manifest = read_manifest(folder) or {}
    card = manifest.get("model_card")
    if card is None:  # a model trained before the card was generated: its README stays
        return
    scores = {t: {"kind": k, "main_score": m, "scores": s} for t, (k, m, s) in results.items()}
    length = model.max_seq_length
    model.max_seq_length = card["hyperparameters"]["max_seq_length"]  # the saved one, not eval's
    try:
        write_model_card(model, folder, card, manifest.get("history", []), scores)
    finally:
        model.max_seq_length = length
    log(f"eval: {folder / 'README.md'}: model card with the scores of {len(scores)} task(s)")
