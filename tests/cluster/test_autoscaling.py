"""The synth stage on an autoscaling cluster: Ray's own fake multi-node cloud (``AutoscalingCluster``,
the provider Ray tests its autoscaler with) starts with a head and no GPU nodes; GPU nodes come up as
the engine pool asks for GPU actors, and one is killed midway (a spot node taken back). The stage still
finishes with every row once.

Starting the fake cloud runs ``ray stop --force``, which stops every Ray process of this user, so these
tests run on their own (``make test-cluster``, marked ``cluster``), never beside the default suite.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil
import pytest

pytestmark = pytest.mark.cluster

GPU_NODE = "gpu-l4"
MAX_GPU_NODES = 4


class FakeCloud:
    """``ray.cluster_utils.AutoscalingCluster`` with its config built here: the wheel lacks the
    example.yaml it reads its defaults from."""

    def __new__(cls, head_resources: dict, worker_node_types: dict) -> Any:
        from ray.cluster_utils import AutoscalingCluster

        class Cluster(AutoscalingCluster):
            def _generate_config(self, head_resources, worker_node_types, autoscaler_v2=False, **kw):
                types = dict(worker_node_types)
                types["ray.head.default"] = {"resources": head_resources, "node_config": {}, "max_workers": 0}
                return {
                    "cluster_name": "fake_multinode",
                    "max_workers": sum(t.get("max_workers", 0) for t in worker_node_types.values()),
                    "provider": {
                        "type": "fake_multinode",
                        "use_node_id_as_ip": True,
                        "disable_node_updaters": True,
                        "disable_launch_config_check": True,
                    },
                    "available_node_types": types,
                    "head_node_type": "ray.head.default",
                    "auth": {},
                    "upscaling_speed": 1.0,
                    "idle_timeout_minutes": 5,
                    "docker": {},
                    **{k: [] for k in ("initialization_commands", "setup_commands", "head_setup_commands")},
                    **{k: [] for k in ("worker_setup_commands", "head_start_ray_commands")},
                    "worker_start_ray_commands": [],
                    "file_mounts": {},
                    "cluster_synced_files": [],
                    "file_mounts_sync_continuously": False,
                    "rsync_exclude": [],
                    "rsync_filter": [],
                }

        return Cluster(head_resources, worker_node_types)


@pytest.fixture(scope="module")
def cloud():
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    # AutoscalingCluster calls the `ray` command: this interpreter's, whether or not its venv is active
    os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    cluster = FakeCloud(
        head_resources={"CPU": 2},
        worker_node_types={
            GPU_NODE: {
                "resources": {"CPU": 1, "GPU": 1},
                "node_config": {},
                "min_workers": 0,
                "max_workers": MAX_GPU_NODES,
            }
        },
    )
    cluster.start()
    ray.init(address="auto", log_to_driver=False)
    yield ray
    ray.shutdown()
    cluster.shutdown()


def gpu_nodes(ray) -> dict[str, bool]:
    """Node id -> alive, for every node of the GPU type seen so far."""
    return {n["NodeID"]: n["Alive"] for n in ray.nodes() if n["Resources"].get("GPU") or not n["Alive"]}


def kill_node(node_id: str) -> int:
    """SIGKILL the raylet of a fake node (found by the node id the fake provider gives it); returns
    how many processes were killed."""
    killed = 0
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if (
                "raylet" in (p.info["name"] or "")
                and p.environ().get("RAY_OVERRIDE_NODE_ID_FOR_TESTING") == node_id
            ):
                p.send_signal(signal.SIGKILL)
                killed += 1
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return killed


class Watcher(threading.Thread):
    """Samples the GPU nodes every half second; once ``kill_after`` output shards are written and two
    GPU nodes are up, kills one of them."""

    def __init__(self, ray, step_dir, kill_after: int) -> None:
        super().__init__(daemon=True)
        self.ray, self.step_dir, self.kill_after = ray, step_dir, kill_after
        self.samples: list[tuple[float, int]] = []
        self.killed: str | None = None
        self.killed_at = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.5):
            alive = [n for n, up in gpu_nodes(self.ray).items() if up]
            self.samples.append((time.time(), len(alive)))
            written = len(list(self.step_dir.glob("shard_*.parquet")))
            ready = self.killed is None and written >= self.kill_after and len(alive) >= 2
            if ready and kill_node(alive[-1]):
                self.killed, self.killed_at = alive[-1], time.time()


def test_the_engine_pool_grows_onto_new_gpu_nodes_and_survives_losing_one(cloud, tmp_path):
    import pyarrow.parquet as pq

    from speed_ray.config import load_config
    from speed_ray.io.schemas import GENERATIONS
    from speed_ray.synth import speed
    from speed_ray.synth.stage import generate_step, sampling_params
    from tests.conftest import DEBIAN
    from tests.fakes import FakeGenerator

    ray = cloud
    assert not any(gpu_nodes(ray).values())  # min 0: the cloud starts without GPU nodes
    cfg = load_config(
        None,
        [
            "run.ray_address=auto",
            f"run.output_dir={tmp_path}",
            "synth.shard_rows=20",
            "synth.engine.num_gpus=1",
            "synth.engine.num_cpus=1",
            "synth.engine.batch_size=4",
            "synth.engine.min_actors=1",
            "synth.engine.max_actors=3",
            f"eval.retrieval.path={DEBIAN / 'retrieval'}",
        ],
    )
    tasks = [
        {"id": f"t{i}", "topic": "A/B", "task_type": "retrieval", "kind": "retrieval"}
        | {"task": f"Find package {i}.", "error": None}
        for i in range(240)
    ]
    rows = list(speed.example_requests(tasks, seed=0, max_chars=100))
    step_dir = tmp_path / "generations"
    step_dir.mkdir()
    watcher = Watcher(ray, step_dir, kill_after=3)
    watcher.start()
    started = time.time()
    manifest = generate_step(
        cfg,
        cfg.synth.engine,
        step_dir,
        GENERATIONS,
        rows,
        sampling_params(32, 1.0, 1.0, 2),
        speed.parse_generations,
        generator=FakeGenerator(seconds_per_request=0.1),
    )
    watcher.stop.set()
    watcher.join()

    got = [
        (r["id"], r["sample"])
        for f in manifest["files"]
        for r in pq.read_table(step_dir / f["name"], columns=["id", "sample"]).to_pylist()
    ]
    expected = [(r["id"], k) for r in rows for k in range(2)]
    assert sorted(got) == sorted(expected)  # none lost, none twice
    most = max(n for _, n in watcher.samples)
    assert watcher.samples[0][1] <= 1 and most >= 2, watcher.samples  # the pool grew onto new nodes
    assert watcher.killed is not None, "no GPU node was killed: the pool never reached two nodes"
    # Ray saw the node die (its health check may mark it dead a few seconds after the step ends)
    deadline = time.time() + 60
    while gpu_nodes(ray)[watcher.killed] and time.time() < deadline:
        time.sleep(1)
    assert gpu_nodes(ray)[watcher.killed] is False
    figures = {
        "benchmark": "autoscaling",
        "what": "synth generation step (fake engine, 0.1 s per request) on Ray's fake autoscaling cloud: "
        "head 2 CPUs, GPU node group min 0 max 4 (1 GPU, 1 CPU each), engine pool min 1 max 3 actors "
        "of 1 GPU; one GPU node's raylet SIGKILLed once 3 shards were written",
        "rows": len(rows),
        "outputs": len(got),
        "rows_lost": len(set(expected) - set(got)),
        "rows_duplicated": len(got) - len(set(got)),
        "seconds": round(time.time() - started, 1),
        "gpu_nodes_at_start": watcher.samples[0][1],
        "gpu_nodes_most": most,
        "killed_node": watcher.killed,
        "killed_at_s": round(watcher.killed_at - started, 1),
        "gpu_nodes_over_time": [[round(t - started, 1), n] for t, n in watcher.samples],
    }
    if os.environ.get("AUTOSCALING_REPORT"):
        Path(os.environ["AUTOSCALING_REPORT"]).write_text(json.dumps(figures, indent=2) + "\n")
