"""Ray at the edges: starting or joining Ray, the checks before any pool is built, and the secrets
each worker gets.

A vLLM pool that asks for GPUs on a cluster without them waits forever instead of failing (seen with
Ray 2.60's ``ray.data.llm`` vLLM processor: the autoscaler reports "No available node types can
fulfill resource request" every ~35 s and the job never errors), so every pool, trainer and eval task
first checks what the cluster has and can add, then holds a placement group of what it asks for until
the cluster places it, for at most ``run.resource_wait_s``.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from speed_ray.config import SpeedRayConfig
from speed_ray.io import logs, secrets
from speed_ray.io.settings import ConfigError, TrainResources

logger = logging.getLogger(__name__)

S = TypeVar("S")  # a training loop's settings (``EmbedTrainSettings``, ``AlignTrainSettings``)
T = TypeVar("T")

# What every Ray worker gets (a value the driver's environment sets wins).
WORKER_ENV = {
    "TOKENIZERS_PARALLELISM": "false",
    # Ray Train sends a worker's print() to its logger and, since Ray replaces a worker's sys.stdout,
    # to stdout as well: each printed line would reach the driver twice.
    "RAY_TRAIN_ENABLE_PRINT_PATCH": "0",
    # Hugging Face's loading and saving bars in a worker reach the driver as one line once they end.
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
}
# Passed on only when the driver's environment sets them: the driver's decision to go offline
# (``speed_ray.io.hub``; HF_TOKEN never travels this way).
FOOTER_ACTORS = "RAY_DATA_PARQUET_FOOTER_NUM_ACTORS"
PASSED_ENV = (
    "HF_HUB_OFFLINE",
    "TRANSFORMERS_OFFLINE",
    "HF_DATASETS_OFFLINE",
    "SPEED_RAY_CACHE",
    FOOTER_ACTORS,
)


def worker_env() -> dict[str, str]:
    """The env vars of ``init_ray``'s runtime env, less those the Ray job's own runtime env sets (a job
    submitted with ``--runtime-env``): its workers have them already, and Ray refuses to set one twice."""
    env = {k: os.environ.get(k, v) for k, v in WORKER_ENV.items()}
    env |= {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
    env[logs.LEVEL_ENV] = logging.getLevelName(logs.level())
    job = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR") or "{}")
    taken = (job.get("runtime_env") or {}).get("env_vars") or {}
    return {k: v for k, v in env.items() if k not in taken}


def init_ray(cfg: SpeedRayConfig) -> None:
    import ray

    if ray.is_initialized():
        return
    place = where(cfg.run.ray_address, cfg.run.num_cpus)
    if place["address"] == "local":
        # Ray Data 2.60's parquet reader starts RAY_DATA_PARQUET_FOOTER_NUM_ACTORS (32) footer-reading
        # actor processes for every read_parquet, and each synth step reads its request shards that
        # way: on a small machine they take the CPUs the engine actors start on. One per 8 CPUs here;
        # a cluster keeps Ray's default unless the driver's environment sets it.
        os.environ.setdefault(FOOTER_ACTORS, str(max(1, min(32, place["num_cpus"] // 8))))
    env = worker_env()
    ray.init(
        **place,
        # Every worker process logs speed_ray lines like the driver, and Ray's known repeaters once.
        runtime_env={"env_vars": env, "worker_process_setup_hook": logs.setup_ray_worker},
        include_dashboard=False,
        log_to_driver=True,  # the workers' lines and progress bars (tqdm_ray) show on the driver
        logging_level=max(logs.level(), logging.INFO),  # Ray's own driver lines: INFO, -q: WARNING
    )
    ray.data.DataContext.get_current().enable_progress_bars = logs.bars()


def where(address: str | None, num_cpus: int | None) -> dict:
    """``ray.init`` arguments for ``run.ray_address``: the cluster it names (``auto``: the one ``ray start``
    made on this node), else the cluster a Ray job runs in (``RAY_ADDRESS``), else a new local instance
    of ``num_cpus`` CPUs. Never a cluster found only in /tmp/ray's record, which outlives a head that
    died without ``ray stop``."""
    if address is None and not os.environ.get("RAY_ADDRESS"):
        return {"address": "local", "num_cpus": num_cpus or os.cpu_count()}
    return {"address": address}


def check_shared_folder(cfg: SpeedRayConfig) -> None:
    """On a multi-node cluster this run joins, one task on every node checks that it sees the run
    folder: a file the driver writes there must be there, with the same contents, on every node. A
    node that does not stops the run before its first stage. Nodes an autoscaler adds later are not
    seen here; the cluster files mount the same volume on every node group for that reason."""
    if where(cfg.run.ray_address, cfg.run.num_cpus)["address"] == "local":
        return  # a local Ray is one node
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(cfg)
    nodes = [n for n in ray.nodes() if n["Alive"]]
    if len(nodes) < 2:
        return
    folder = cfg.run_dir
    folder.mkdir(parents=True, exist_ok=True)
    token = uuid.uuid4().hex
    probe = folder / f".node-check-{token}"
    probe.write_text(token)
    try:
        sees = ray.remote(_sees)
        refs = [
            sees.options(
                num_cpus=0,
                max_retries=0,
                name="speed-ray-folder-check",
                scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False),
            ).remote(str(probe), token)
            for n in nodes
        ]
        # Each task needs only a worker process on its node (no CPU); its start can take a while.
        seen = ray.get(refs, timeout=max(FOLDER_CHECK_S, cfg.run.resource_wait_s))
    finally:
        probe.unlink(missing_ok=True)
    blind = [
        f"{n['NodeManagerAddress']} (node id {n['NodeID']})"
        for n, ok in zip(nodes, seen, strict=True)
        if not ok
    ]
    if blind:
        raise ConfigError(
            f"run.output_dir: the run folder {folder} is not shared with {len(blind)} of {len(nodes)} "
            f"nodes: {'; '.join(blind)} (a file the driver wrote there is not there on those nodes); "
            "every node needs the same shared file system at that path (NFS, EFS, Filestore, a volume "
            "mounted in every pod)"
        )


FOLDER_CHECK_S = 120.0
"""The least time the nodes get to answer the folder check."""


def _sees(probe: str, token: str) -> bool:
    path = Path(probe)
    return path.is_file() and path.read_text() == token


def reachable_resources() -> dict[str, float] | None:
    """What the cluster has, or on an autoscaling cluster the most its autoscaler may bring up (node
    groups that start at zero count at their maximum). None for a cluster this process joined whose
    autoscaler does not publish its node groups (the v1 autoscaler of ``ray up``): it may still add
    what is missing, so there is nothing to check against."""
    import ray
    from ray._private.state import state  # the same call Ray Data sizes its shuffles by

    have = dict(ray.cluster_resources())
    node = ray._private.worker._global_node
    if node is not None and node.head:  # a local Ray this process started: what it has is all
        return have
    most = state.get_max_resources_from_cluster_config()  # autoscaler v2 (KubeRay) publishes its groups
    if most is None:
        return None
    return {k: max(have.get(k, 0), most.get(k, 0)) for k in set(have) | set(most)}


def require_resources(cfg: SpeedRayConfig, what: str, cpus: float, gpus: float, count: int = 1) -> None:
    """Wait until the cluster places ``count`` bundles of ``cpus`` CPUs and ``gpus`` GPUs (``what``: one
    engine actor, training worker or eval task each), for at most ``run.resource_wait_s``; fail at once
    when the cluster can never host them. Past the deadline: a ``ConfigError`` that says what was
    asked for and what the cluster has and can add. A placement group is what an autoscaler scales
    for; it is removed once placed, and the pool or worker group takes the freed resources."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {k: v for k, v in (("CPU", cpus), ("GPU", gpus)) if v > 0}
    if not bundle:
        return
    need = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
    asked = f"{what}: needs {count} x ({need})"
    most = reachable_resources()
    if most is not None:
        short = [k for k, v in bundle.items() if most.get(k, 0) < v * count]
        if short:
            hint = (
                "set num_gpus: 0 / use_gpu: false to run on CPU, or add GPU nodes"
                if "GPU" in short
                else "lower num_cpus, or add nodes"
            )
            raise ConfigError(
                f"{asked}, but the Ray cluster has {_amounts(most, bundle)} at most (its nodes and what "
                f"its autoscaler can add); {hint}"
            )
    wait_s = cfg.run.resource_wait_s
    group = placement_group([bundle] * count, strategy="PACK", name=f"speed-ray-wait-{what}"[:100])
    try:
        placed = group.wait(timeout_seconds=wait_s)
    finally:
        remove_placement_group(group)
    if not placed:
        can_add = (
            "unknown (its autoscaler publishes no node groups)" if most is None else _amounts(most, bundle)
        )
        raise ConfigError(
            f"{asked}; after {wait_s:g} s (run.resource_wait_s) the Ray cluster has "
            f"{_amounts(ray.cluster_resources(), bundle)} in all and {_amounts(ray.available_resources(), bundle)} "
            f"free; the most it can have: {can_add}. Add nodes, free them, or ask for less"
        )


def _amounts(resources: dict[str, float], keys: dict[str, float]) -> str:
    return ", ".join(f"{resources.get(k, 0):g} {k}" for k in keys)


def run_secrets(cfg: SpeedRayConfig) -> dict[str, secrets.Secret]:
    """The secrets this run's workers need, from the driver's environment: the API keys its ``openai``
    engines name, and ``HF_TOKEN`` for gated hub models."""
    keys = [e.api_key_env for e in cfg.engines().values() if e.kind == "openai" and e.api_key_env]
    return secrets.collect([*keys, secrets.HUB_TOKEN])


def run_task(cfg: SpeedRayConfig, name: str, fn: Callable[..., T], *args: Any, cpus: float, gpus: float) -> T:
    """``fn(*args)`` in a Ray task that holds ``cpus`` CPUs and ``gpus`` GPUs (the cluster must be able
    to host it), not in the driver; its result comes back. Not retried: ``fn`` writes its own records."""
    import ray

    init_ray(cfg)
    require_resources(cfg, name, cpus, gpus)
    task = ray.remote(_with_secrets).options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=name)
    return ray.get(task.remote(run_secrets(cfg), fn, *args))


def _with_secrets(handed: dict[str, secrets.Secret], fn: Callable[..., T], *args: Any) -> T:
    secrets.export(handed)
    return fn(*args)


def train(
    cfg: SpeedRayConfig,
    name: str,
    loop: Callable[[S], None],
    settings: S,
    res: TrainResources,
    dataset: Any,
    target: Path,
    max_failures: int = 0,
) -> dict[str, Any]:
    """Run ``loop(settings)`` on a Ray Train worker group; the checkpoint rank 0 reports last becomes
    ``target``.

    ``settings`` is the loop's typed settings object (Ray pickles it to every worker). ``dataset`` (a
    pyarrow table, or None when the loop reads its own data) is sharded across the workers. A dead
    worker restarts the group up to ``max_failures`` times, and the loop resumes from the latest
    checkpoint it reported; so does a rerun after the driver died, since Ray Train keeps its checkpoint
    state under ``<run>/ray/<name>``. Returns the final metrics. Once ``target`` holds the model, Ray's
    copies (that folder) are removed, so a run directory keeps one copy of each model.
    """
    import shutil

    # [1] Ray: the worker group must fit the cluster, or fail now.
    init_ray(cfg)
    require_resources(cfg, name, res.cpus_per_worker, int(res.use_gpu), count=res.workers)
    # [2] Ray Train: the loop on every worker, the dataset sharded across them.
    loop_config = {"loop": loop, "settings": settings, "secrets": run_secrets(cfg)}
    trainer = torch_trainer(cfg, name, loop_config, res, dataset, max_failures)
    result = trainer.fit()
    # [3] The model comes back as the last checkpoint.
    if result.checkpoint is None or result.metrics is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint ({result.error})")
    keep_checkpoint(result.checkpoint, target)
    shutil.rmtree(cfg.run_dir / "ray" / name, ignore_errors=True)
    return result.metrics


def run_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the stage's loop on its settings, with the run's secrets in its
    environment. Ray's ``train_loop_config`` is a dict, so they travel in one (``train``)."""
    secrets.export(config.get("secrets"))
    config["loop"](config["settings"])


def torch_trainer(
    cfg: SpeedRayConfig,
    name: str,
    loop_config: dict[str, Any],
    res: TrainResources,
    dataset: Any,
    max_failures: int,
):
    """Ray Train's TorchTrainer of ``run_loop`` on ``res``'s workers, its state under ``<run>/ray``."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        run_loop,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=res.workers, use_gpu=res.use_gpu, resources_per_worker={"CPU": res.cpus_per_worker}
        ),
        torch_config=TorchConfig(backend="nccl" if res.use_gpu else "gloo"),
        run_config=RunConfig(
            name=name,
            storage_path=str(cfg.run_dir / "ray"),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
            # Ray Train v2's RunConfig (the one ray.train exports); mypy reads v1's, which lacks it.
            logging_config=LoggingConfig(log_level=logs.library_level()),  # type: ignore[call-arg]
        ),
        datasets={"train": ray.data.from_arrow(dataset)} if dataset is not None else None,
    )


def keep_checkpoint(checkpoint: Any, target: Path) -> None:
    """``checkpoint``'s folder copied to ``target`` (through ``<target>.tmp``, then renamed)."""
    import shutil

    tmp = target.with_name(target.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    checkpoint.to_directory(str(tmp))
    if target.exists():  # a model left by a run that died before its manifest was written
        shutil.rmtree(target)
    tmp.rename(target)
