"""A real multi-node Ray cluster on this machine (Ray's ``cluster_utils``, the way Ray tests itself): a
head with no CPUs, so every actor and task lands on a worker node, and runs submitted as Ray jobs or
joined by a driver, as on a cloud cluster.

- The teacher's API key is in the head's environment only. Submitted with ``ray job submit``, the run
  reaches the teacher from actors on the worker node, and the key is in no file of the run or the Ray
  session, no log line, and no runtime env or job listing.
- A pool the cluster can never place stops the run after ``run.resource_wait_s`` with exit 2.
- A node that does not see the run folder (its own mount namespace, with an empty file system over the
  output folder) stops the run before its first stage, named.

Marked ``cluster`` with the fake-cloud tests (``make test-cluster``), run one after another.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fakes import FakeTeacher

pytestmark = pytest.mark.cluster

KEY_ENV = "SPEED_RAY_NODE_TEST_KEY"  # not the suite's key: this one only the head's processes have
KEY = "sk-multinode-7c1e-d0-not-leak"
ROLES = ("engine", "brainstormer", "judge", "reviser")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["no_proxy"] = os.environ["NO_PROXY"] = "127.0.0.1,localhost"  # the fake teacher
    os.environ[KEY_ENV] = KEY  # the head's processes (and the jobs it runs) inherit it ...
    dashboard = free_port()
    head = {"num_cpus": 0, "include_dashboard": True, "dashboard_port": dashboard}
    try:
        c = Cluster(initialize_head=True, head_node_args=head)
    finally:
        del os.environ[KEY_ENV]  # ... the worker node's do not
    c.add_node(num_cpus=2)
    c.wait_for_nodes()
    c.dashboard_url = f"http://127.0.0.1:{dashboard}"
    yield c
    c.shutdown()


def driver(*args: str, env: dict[str, str] | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "speed_ray.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )


def empty_config(tmp_path: Path) -> str:
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


def teacher_overrides(tmp_path: Path, url: str) -> list[str]:
    out = [
        f"run.output_dir={tmp_path / 'runs'}",
        "run.name=teacher",
        "synth.num_topics=4",
        "synth.shard_rows=4",
    ]
    for role in ROLES:
        out += [
            f"synth.{role}.kind=openai",
            f"synth.{role}.model=teacher-model",
            f"synth.{role}.base_url={url}",
            f"synth.{role}.api_key_env={KEY_ENV}",
            f"synth.{role}.num_cpus=0.25",
            f"synth.{role}.batch_size=4",
        ]
    return out


def test_the_key_reaches_teacher_actors_on_worker_nodes_and_nowhere_else(tmp_path, cluster):
    from ray.util import state

    assert KEY_ENV not in os.environ
    with FakeTeacher() as teacher:
        cmd = [sys.executable, "-m", "speed_ray.cli", "synth", empty_config(tmp_path)]
        submitted = subprocess.run(
            [shutil.which("ray") or "ray", "job", "submit", "--address", cluster.dashboard_url, "--", *cmd]
            + teacher_overrides(tmp_path, teacher.url),
            capture_output=True,
            text=True,
            timeout=600,
            env={**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"},
        )
    printed = submitted.stdout + submitted.stderr
    assert submitted.returncode == 0, printed[-3000:]
    assert "succeeded" in printed.lower()

    # the teacher got the key from every call, made by actors on the worker node (the head has no CPU)
    assert teacher.requests > 0 and teacher.auth == {f"Bearer {KEY}"}
    head = cluster.head_node.node_id
    actors = state.list_actors(address=cluster.dashboard_url, detail=True, limit=1000)
    pool = [a for a in actors if "MapWorker" in a.class_name]
    assert pool and all(a.node_id != head for a in pool)

    # nowhere else: no file of the run or of the Ray session (every log, the job's driver log included),
    # no line printed, no job or actor listing with its runtime env
    session = Path(cluster.head_node.get_session_dir_path())
    files = [p for root in (tmp_path / "runs", session) for p in root.rglob("*") if p.is_file()]
    assert len([p for p in files if p.is_relative_to(session / "logs")]) > 10
    assert [p for p in files if KEY.encode() in p.read_bytes()] == []
    assert KEY not in printed
    jobs = state.list_jobs(address=cluster.dashboard_url, detail=True)
    listings = json.dumps([j.__dict__ for j in jobs] + [a.__dict__ for a in actors], default=str)
    assert jobs and "runtime_env" in listings and KEY not in listings


def test_a_pool_the_cluster_can_never_place_stops_at_the_deadline(tmp_path, cluster):
    started = time.monotonic()
    done = driver(
        "synth",
        empty_config(tmp_path),
        f"run.ray_address={cluster.address}",
        f"run.output_dir={tmp_path}",
        "run.resource_wait_s=3",
        "synth.num_topics=2",
        "synth.engine.model=tiny-llama",
        "synth.engine.num_gpus=1",
    )
    assert done.returncode == 2, done.stderr[-3000:]
    error = [line for line in done.stderr.splitlines() if line.startswith("speed-ray: error:")]
    assert len(error) == 1
    assert "vllm engine tiny-llama: needs 1 x (0.5 CPU, 1 GPU)" in error[0]
    assert "after 3 s (run.resource_wait_s) the Ray cluster has 2 CPU, 0 GPU in all" in error[0]
    assert "the most it can have: unknown" in error[0]
    assert time.monotonic() - started < 120


def test_a_node_that_does_not_see_the_run_folder_stops_the_run(tmp_path, cluster):
    import ray

    if subprocess.run(["unshare", "-m", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -m` (root, or user namespaces) to give one node its own mounts")
    hidden = tmp_path / "runs"
    hidden.mkdir()
    ports = " ".join(
        f"--{flag}={free_port()}"
        for flag in (
            "dashboard-agent-listen-port",
            "dashboard-agent-grpc-port",
            "metrics-export-port",
            "runtime-env-agent-port",
            "node-manager-port",
            "object-manager-port",
        )
    )
    ray_cli = Path(sys.executable).parent / "ray"
    start = (
        f"mount -t tmpfs blind {hidden} && exec {ray_cli} start --address={cluster.address} "
        f"--num-cpus=1 --resources='{{\"blind\": 1}}' --block {ports}"
    )
    node = subprocess.Popen(
        ["unshare", "-m", "--propagation", "private", "sh", "-c", start],
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        ray.init(address=cluster.address)
        for _ in range(60):
            blind = [n for n in ray.nodes() if n["Alive"] and "blind" in n["Resources"]]
            if blind:
                break
            time.sleep(1)
        assert blind, "the blind node did not join"
        done = driver(
            "synth", empty_config(tmp_path), f"run.ray_address={cluster.address}", f"run.output_dir={hidden}"
        )
        assert done.returncode == 2, done.stderr[-3000:]
        error = [line for line in done.stderr.splitlines() if line.startswith("speed-ray: error:")]
        assert len(error) == 1
        assert (
            f"run.output_dir: the run folder {hidden / 'quickstart'} is not shared with 1 of 3 nodes"
            in error[0]
        )
        assert f"(node id {blind[0]['NodeID']})" in error[0]
        assert list(hidden.iterdir()) == [hidden / "quickstart"]  # the probe file is gone again
        assert list((hidden / "quickstart").iterdir()) == []
    finally:
        os.killpg(node.pid, 15)
        node.wait(timeout=60)
        ray.shutdown()
