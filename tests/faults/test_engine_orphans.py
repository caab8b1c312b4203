"""A killed driver leaves no vLLM process behind: vLLM's engine processes outlive the Ray actor that
started them (vllm-project/vllm#55510), so the engine actor starts a watch (``speed_ray.engines.watch``)
that ends them when the actor ends. Every process of a run is found by a marker in its environment,
which the driver (and a cluster head) pass down to all they start."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

pytestmark = pytest.mark.faults
REPO = Path(__file__).resolve().parents[2]
MARK = "SPEED_RAY_ORPHAN_TEST"


def marked(marker: str) -> dict[int, str]:
    """The live processes whose environment holds ``MARK=marker``: pid -> command line."""
    want = f"{MARK}={marker}".encode()
    found = {}
    for proc in Path("/proc").iterdir():
        with contextlib.suppress(OSError):
            if proc.name.isdigit() and want in (proc / "environ").read_bytes().split(b"\0"):
                found[int(proc.name)] = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    return {pid: cmd for pid, cmd in found.items() if alive(pid)}


def alive(pid: int) -> bool:
    with contextlib.suppress(psutil.Error):
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    return False


def engine_processes(marker: str) -> dict[int, str]:
    """vLLM's processes (they name themselves ``VLLM::EngineCore``, ``VLLM::Worker``...) and the watch."""
    return {p: c for p, c in marked(marker).items() if c.startswith("VLLM::") or "watch.py" in c}


def kill_marked(marker: str) -> None:
    for pid in marked(marker):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def fake_actor() -> None:
    """Starts the watch, then a child that starts a grandchild deaf to SIGTERM; prints their pids."""
    from speed_ray.engines.watch import watch_descendants

    watcher = watch_descendants(first=0.05, longest=0.2, grace=1.0)
    deaf = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    code = f"import subprocess, sys, time; print(subprocess.Popen([sys.executable, '-c', {deaf!r}]).pid, flush=True); time.sleep(600)"
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert child.stdout is not None
    pids = {"watcher": watcher, "child": child.pid, "grandchild": int(child.stdout.readline())}
    print(json.dumps(pids), flush=True)
    time.sleep(600)


def wait_until_gone(pids: list[int], seconds: float) -> float:
    """Seconds until none of ``pids`` is alive; fails after ``seconds``."""
    start = time.time()
    while any(alive(p) for p in pids):
        assert time.time() - start < seconds, {p: alive(p) for p in pids}
        time.sleep(0.05)
    return time.time() - start


def test_the_watch_ends_the_descendants_of_a_killed_process_and_nothing_else():
    code = "from tests.faults.test_engine_orphans import fake_actor; fake_actor()"
    actor = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    bystander = subprocess.Popen(["sleep", "60"])  # not the actor's: must survive
    pids: dict[str, int] = {}
    try:
        assert actor.stdout is not None
        pids = json.loads(actor.stdout.readline())
        watcher = psutil.Process(pids["watcher"])
        assert watcher.ppid() != actor.pid and os.getsid(watcher.pid) != os.getsid(actor.pid)
        time.sleep(0.5)  # the watch looks every 0.2 s at most
        os.kill(actor.pid, signal.SIGKILL)
        actor.wait()
        # SIGTERM ends the child; the grandchild ignores it and gets SIGKILL after the 1 s grace
        took = wait_until_gone(list(pids.values()), 10)
        assert 1.0 <= took < 10 and bystander.poll() is None
    finally:
        bystander.kill()
        actor.kill()
        for pid in pids.values():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def head_node(env: dict[str, str]):
    """A `ray start --head` cluster that outlives the driver, as on a real cluster; its address. Ray
    before process-group cleanup (or with it off, as here) leaves a killed actor's children running."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="sr-", dir="/tmp") as tmp:  # Ray's sockets need a short path
        cmd = [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}"]
        cmd += ["--node-ip-address=127.0.0.1", "--num-cpus=2", "--include-dashboard=false"]
        cmd += [f"--temp-dir={tmp}", "--disable-usage-stats"]
        try:
            subprocess.run(cmd, env=env | {"RAY_process_group_cleanup_enabled": "0"}, check=True, timeout=300)
            yield f"127.0.0.1:{port}"
        finally:
            kill_marked(env[MARK])  # the head's processes, before their folder goes


@pytest.mark.vllm
@pytest.mark.slow  # a vLLM start on 2 CPUs, 1.5-3 minutes each; make test-faults runs them
# the cluster case also runs in make test-cluster (CI), beside the other tests that start Ray nodes
@pytest.mark.parametrize("ray", ["local", pytest.param("cluster", marks=pytest.mark.cluster)])
def test_a_killed_driver_leaves_no_vllm_process(tmp_path, model_cache, fault_record, ray):
    """local: the driver's own Ray goes down with it (the actor exits and kills its children, but not
    vLLM's workers, its grandchildren). cluster: a head that stays up, without process-group cleanup
    (Ray before it was the default); the engine actor is SIGKILLed with the driver."""
    marker = uuid.uuid4().hex
    env = os.environ | {MARK: marker}
    cmd = [sys.executable, "-m", "tests.faults.driver", str(tmp_path), "200", "vllm"]
    with contextlib.ExitStack() as stack:
        stack.callback(kill_marked, marker)  # what is left of the run and its Ray
        if ray == "cluster":
            cmd.append(f"run.ray_address={stack.enter_context(head_node(env))}")
        log = tmp_path / "driver.log"
        with log.open("w") as err:
            proc = subprocess.Popen(cmd, cwd=REPO, env=env, stderr=err, start_new_session=True)
        gens = tmp_path / "generations"
        deadline = time.time() + 600
        while not any(gens.glob("shard_*.parquet")):  # generation is under way
            assert proc.poll() is None, f"the step ended before it could be killed: {log.read_text()[-3000:]}"
            assert time.time() < deadline, "no shard within 600 s"
            time.sleep(0.05)
        before = engine_processes(marker)
        kinds = {c.split()[0] if c.startswith("VLLM") else "watch" for c in before.values()}
        assert kinds == {"VLLM::EngineCore", "VLLM::Worker", "watch"}, before
        if ray == "cluster":  # the actor too, as a node's OOM killer would: it gets no exit request
            [actor] = [p for p, c in marked(marker).items() if c.startswith("ray::MapWorker(MapBatches(Gen")]
            os.kill(actor, signal.SIGKILL)
        os.kill(proc.pid, signal.SIGKILL)  # the driver, as a crashed head would
        proc.wait(timeout=60)
        took = wait_until_gone(list(before), 30)
    what = "driver" if ray == "local" else "driver and engine actor"
    fault_record(f"{what} SIGKILL mid-generation, real vLLM, {ray} Ray", vllm_gone_after_s=round(took, 1))
