"""Contrastive embedding training: the per-worker loop that Ray Train runs (STYLE P9).

The driver (``speed_ray.embed.driver``) hands every worker one ``EmbedTrainSettings``: the ``embed``
section as configured, and what it resolved from it. Each step takes this worker's slice of global
batch ``s``, read from the training data's shards (``speed_ray.embed.data.WorkerBatches``), through
``speed_ray.embed.step.train_step``, seeding dropout from (seed, step, rank); checkpoints and the exported model come from
``speed_ray.embed.export``. So a run resumed from a checkpoint after a killed worker takes exactly
the steps an uninterrupted run takes.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from speed_ray.embed.config import EmbedConfig, embed_finetune
from speed_ray.embed.data import TrainingData, WorkerBatches, rows_digest
from speed_ray.embed.export import export, full_state_dict, load_state, probe, save_state, snapshot
from speed_ray.embed.prepare import setup_model, wrap
from speed_ray.embed.step import train_step
from speed_ray.io import logs

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EmbedTrainSettings:
    """What every worker needs (Ray pickles it to each): the ``embed`` section and what the driver
    resolved from it."""

    embed: EmbedConfig
    model_path: str
    """``embed.model`` as a local folder (workers run offline)."""
    num_negatives: int
    """Hard negatives per query: ``embed.hard_negatives``, or fewer if no row has that many."""
    seed: int
    snapshot_dir: str
    """Where ``embed.snapshot_steps`` exports go (``<run>/embed/snapshots``)."""
    model_card: dict[str, Any] | None = None
    """What the exported model's card says (``speed_ray.embed.driver.card_info``); None: no card."""
    data: TrainingData | None = None
    """The training data's shards, of which each worker reads its share."""

    @property
    def finetune(self) -> str:
        """``lora`` or ``full`` (``embed.finetune`` with ``auto`` decided)."""
        return embed_finetune(self.embed)


@dataclass
class Worker:
    """This worker's wrapped model, optimizer and scheduler, and its place in the group."""

    model: Any
    optimizer: Any
    scheduler: Any
    frozen: Any
    """``FrozenBlocks`` for GradCache to compute once (``embed.cache_frozen``), or None."""
    trainable: int
    rank: int
    world: int


def start_worker(s: EmbedTrainSettings) -> Worker:
    """The model built and wrapped as configured, seeded by ``s.seed``."""
    import ray.train

    ctx = ray.train.get_context()
    torch.manual_seed(s.seed)
    torch.set_num_threads(max(1, int(s.embed.resources.cpus_per_worker)))
    model, frozen = setup_model(s)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    model, optimizer, scheduler = wrap(model, s.embed)
    frozen = frozen if s.embed.cache_frozen else None
    return Worker(model, optimizer, scheduler, frozen, trainable, ctx.get_world_rank(), ctx.get_world_size())


def resume(w: Worker) -> tuple[int, list[dict[str, Any]]]:
    """(step, history) of the checkpoint Ray Train holds, its state restored; (0, []) without one."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as d:
        state = load_state(w.model, w.optimizer, w.scheduler, d)
    if w.rank == 0:
        logger.info(f"embed: resumed from the checkpoint of step {state['step']}")
    return state["step"], state["history"]


def one_step(w: Worker, s: EmbedTrainSettings, batches: WorkerBatches, step: int) -> dict[str, Any]:
    """Step ``step``: this worker's slice of global batch ``step``, dropout seeded by (seed, step, rank);
    returns the step's metrics."""
    per_worker, steps = s.embed.batch_size, s.embed.steps
    t0 = time.perf_counter()
    epoch, mine = batches(step)
    torch.manual_seed(s.seed * 1_000_003 + step * 1_009 + w.rank)
    lr = w.scheduler.get_last_lr()[0]
    metrics: dict[str, Any] = train_step(w.model, w.optimizer, mine, s, w.frozen, w.scheduler)
    seconds = time.perf_counter() - t0
    metrics |= {
        "step": step,
        "epoch": epoch,
        "lr": lr,
        "seconds": seconds,
        "examples_per_s": per_worker * w.world / seconds,
    }
    if w.rank == 0:
        logger.info(f"embed step {step}/{steps}: " + ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics | {"batch": rows_digest(mine)}


def keep(w: Worker, s: EmbedTrainSettings, step: int, history: list[dict[str, Any]]) -> None:
    """The checkpoint (``embed.save_steps``) and snapshot (``embed.snapshot_steps``) due after
    ``step``; none after the last step, whose model the loop reports."""
    import ray.train
    from ray.train import Checkpoint

    ec = s.embed
    if ec.save_steps and step % ec.save_steps == 0 and step < ec.steps:
        with tempfile.TemporaryDirectory() as d:
            wrote = save_state(
                w.model, w.optimizer, w.scheduler, {"step": step, "history": history}, d, w.rank
            )
            ray.train.report({"step": step}, checkpoint=Checkpoint.from_directory(d) if wrote else None)
    if ec.snapshot_steps and step % ec.snapshot_steps == 0 and step < ec.steps:
        snapshot(w.model, s, step, w.rank, history)


def report_model(w: Worker, s: EmbedTrainSettings, metrics: dict[str, Any]) -> None:
    """Report ``metrics`` and the probe's embeddings with the exported model (rank 0) as the last
    checkpoint. Every rank calls this (ZeRO-3 gathers the weights)."""
    import ray.train
    from ray.train import Checkpoint

    weights = full_state_dict(w.model)
    report = metrics | {"probe": probe(w.model)}
    with tempfile.TemporaryDirectory() as d:
        checkpoint = None
        if w.rank == 0:
            export(weights, s, d, metrics["history"])
            checkpoint = Checkpoint.from_directory(d)
        ray.train.report(report, checkpoint=checkpoint)


def train_loop(s: EmbedTrainSettings) -> None:
    """One Ray Train worker: train from the last checkpoint (if any) to ``embed.steps``, then report
    the exported model."""
    w = start_worker(s)
    assert s.data is not None
    batches = WorkerBatches(s.data, s.embed.batch_size, w.world, w.rank, s.seed)
    step, history = resume(w)
    resumed_from = step
    bar = logs.worker_bar(s.embed.steps, "embed", done=step) if w.rank == 0 else None
    while step < s.embed.steps:
        step += 1
        history.append(one_step(w, s, batches, step))
        if bar is not None:
            bar.update(1)
        keep(w, s, step, history)
    if bar is not None:
        bar.close()
    metrics = {"history": history, "steps": step, "resumed_from_step": resumed_from}
    report_model(w, s, metrics | {"trainable_params": w.trainable})
