"""Ray at the edges: starting or joining Ray, and resource checks before any pool is built.

A vLLM pool that asks for GPUs on a cluster without them waits forever instead of failing (seen with
Ray 2.60's ``ray.data.llm`` vLLM processor: the autoscaler reports "No available node types can
fulfill resource request" every ~35 s and the job never errors), so every pool and trainer checks
``cluster_resources`` first.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from speed_ray.config import SpeedRayConfig
from speed_ray.io import logs
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
PASSED_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE", "SPEED_RAY_CACHE")


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
    env = worker_env()
    ray.init(
        **where(cfg.run.ray_address, cfg.run.num_cpus),
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


def require_resources(what: str, cpus: float, gpus: float) -> None:
    """Fail at once when the cluster can never host ``what`` (rather than hang waiting for it)."""
    have = reachable_resources()
    if have is None:
        import ray

        now = ray.cluster_resources()
        if now.get("GPU", 0) < gpus or now.get("CPU", 0) < cpus:
            logger.warning(
                f"{what}: needs {gpus} GPU(s) and {cpus} CPUs per actor, the cluster has "
                f"{now.get('GPU', 0)} and {now.get('CPU', 0)} now: waiting for its autoscaler to add nodes"
            )
        return
    if gpus > 0 and have.get("GPU", 0) < gpus:
        raise ConfigError(
            f"{what}: needs {gpus} GPU(s) but the Ray cluster has {have.get('GPU', 0)}; "
            "set num_gpus: 0 / use_gpu: false to run on CPU, or add GPU nodes"
        )
    if have.get("CPU", 0) < cpus:
        raise ConfigError(f"{what}: needs {cpus} CPUs but the Ray cluster has {have.get('CPU', 0)}")


def run_task(cfg: SpeedRayConfig, name: str, fn: Callable[..., T], *args: Any, cpus: float, gpus: float) -> T:
    """``fn(*args)`` in a Ray task that holds ``cpus`` CPUs and ``gpus`` GPUs (the cluster must be able
    to host it), not in the driver; its result comes back. Not retried: ``fn`` writes its own records."""
    import ray

    init_ray(cfg)
    require_resources(name, cpus, gpus)
    return ray.get(
        ray.remote(fn).options(num_cpus=cpus, num_gpus=gpus, max_retries=0, name=name).remote(*args)
    )


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
    require_resources(name, res.workers * res.cpus_per_worker, res.workers * int(res.use_gpu))
    # [2] Ray Train: the loop on every worker, the dataset sharded across them.
    trainer = torch_trainer(cfg, name, {"loop": loop, "settings": settings}, res, dataset, max_failures)
    result = trainer.fit()
    # [3] The model comes back as the last checkpoint.
    if result.checkpoint is None or result.metrics is None:
        raise RuntimeError(f"{name}: training finished without a checkpoint ({result.error})")
    keep_checkpoint(result.checkpoint, target)
    shutil.rmtree(cfg.run_dir / "ray" / name, ignore_errors=True)
    return result.metrics


def run_loop(config: dict[str, Any]) -> None:
    """What every Ray Train worker runs: the stage's loop on its settings. Ray's ``train_loop_config``
    is a dict, so both travel in one (``train``)."""
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
