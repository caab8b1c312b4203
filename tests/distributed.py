"""Run a function on N gloo ranks in fresh processes (OLMo-core's run_distributed_test, smaller), and
find Ray Train's worker processes and checkpoints, to kill a worker once a checkpoint is recorded."""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()  # no rank tears gloo down while another still talks to it
    dist.destroy_process_group()
    # gloo's threads sometimes abort in C++ static destructors at interpreter exit ("terminate called
    # without an active exception"), after all the work is done; skip those destructors.
    os._exit(0)


def run_gloo(fn: Callable, world: int, *args) -> None:
    """``fn(rank, world, *args)`` on ``world`` gloo ranks; raises if any rank fails."""
    torch.multiprocessing.spawn(_entry, args=(world, free_port(), fn, args), nprocs=world, join=True)


def train_worker_pids() -> list[int]:
    pids = []
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        if proc.name.isdigit() and "RayTrainWorker" in cmd:
            pids.append(int(proc.name))
    return pids


def registered_checkpoint(storage: Path) -> bool:
    """Ray Train has recorded a checkpoint (its snapshot names one), not just received the files."""
    try:
        snapshot = json.loads((storage / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):
        return False
    return snapshot.get("latest_checkpoint_result") is not None
