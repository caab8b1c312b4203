"""Engine processes end with the process that started them.

vLLM runs its engine core (and, with tensor parallelism, one worker per rank) in child processes that
outlive a parent killed with SIGKILL and keep their GPU memory (vllm-project/vllm#55510; vLLM 0.32 has
no option against it). Ray 2.60 kills a dead worker's process group, which holds them, but only while
its raylet lives: a driver with its own local Ray takes the raylet down with it, and the engine
workers, grandchildren of the actor, are left to vLLM's own shutdown (5-15 s on CPU; never, upstream
reports, for a GPU worker stuck in a collective). Without process-group cleanup (the default only since
ray-project/ray#64407; ``RAY_process_group_cleanup_enabled=0`` turns it off), a SIGKILLed actor leaves
its engine core and workers running for good.

``watch_descendants()`` starts a watcher of the calling process. The watcher is detached: its own
session (out of the reach of a kill of the caller's process group) and nobody's child (a Ray worker
kills its children on exit). It notes the caller's descendants, often at first and then every
``longest`` seconds once they stop changing, waits for the caller to end (on a pidfd: no polling),
then ends what it noted and their own descendants: SIGTERM, then SIGKILL for those still there
``grace`` seconds later. It signals only processes it saw as descendants (psutil checks each pid's start
time first, so a reused pid is never hit), and exits. It runs this file as a script, needing psutil
(a dependency of vLLM, and vendored by Ray) but not speed_ray.
"""

from __future__ import annotations

import contextlib
import os
import select
import subprocess
import sys
import time

import psutil


def watch_descendants(first: float = 0.5, longest: float = 5.0, grace: float = 5.0) -> int:
    """Start the watcher of this process; returns its pid. ``first``: seconds between looks at the
    descendants while they change, doubling up to ``longest`` while they do not."""
    me = psutil.Process()
    args = [str(me.pid), repr(me.create_time()), str(first), str(longest), str(grace)]
    out = subprocess.run(
        [sys.executable, "-P", __file__, *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,  # its pid; stderr stays the caller's, for its one line
        text=True,
        check=True,
        start_new_session=True,
    )
    return int(out.stdout)


def watch(pid: int, started: float, first: float, longest: float, grace: float) -> None:
    """Note the descendants of ``pid`` until it ends, then end them."""
    try:
        parent = psutil.Process(pid)
        if parent.create_time() != started:
            return  # the caller ended before the watch began: its pid is someone else's now
        fd: int | None = os.pidfd_open(pid)
    except psutil.NoSuchProcess:
        return
    except OSError:  # pidfds need Linux 5.3
        fd = None
    seen: dict[int, psutil.Process] = {}
    wait = first / 2
    while True:
        now = {p.pid: p for p in descendants(parent)}
        wait = first if now.keys() - seen.keys() else min(2 * wait, longest)
        seen = {k: p for k, p in {**seen, **now}.items() if alive(p)}
        if ended(parent, fd, wait):
            break
    end(list(seen.values()), grace)


def descendants(parent: psutil.Process) -> list[psutil.Process]:
    with contextlib.suppress(psutil.Error):
        return [p for p in parent.children(recursive=True) if p.pid != os.getpid()]
    return []


def alive(p: psutil.Process) -> bool:
    with contextlib.suppress(psutil.Error):
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    return False


def ended(parent: psutil.Process, fd: int | None, wait: float) -> bool:
    """Whether ``parent`` ended within ``wait`` seconds."""
    if fd is not None:
        return bool(select.select([fd], [], [], wait)[0])
    time.sleep(wait)
    return not alive(parent)


def end(noted: list[psutil.Process], grace: float) -> None:
    """SIGTERM ``noted`` and their descendants; SIGKILL those left after ``grace`` seconds."""
    procs = {p.pid: p for q in noted if alive(q) for p in [q, *descendants(q)] if alive(p)}
    if not procs:
        return
    print(f"speed-ray watch: parent gone, ending {sorted(procs)}", file=sys.stderr, flush=True)
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    _, left = psutil.wait_procs(list(procs.values()), timeout=grace)
    for p in left:
        with contextlib.suppress(psutil.Error):
            p.kill()


def main(argv: list[str]) -> None:
    """``PID START_TIME FIRST LONGEST GRACE``: fork the watcher, print its pid, and return."""
    watcher = os.fork()
    if watcher:
        print(watcher, flush=True)
        os._exit(0)
    # The watcher: its stdout is the caller's pipe, which must close for the caller to go on.
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    pid, started, first, longest, grace = argv
    watch(int(pid), float(started), float(first), float(longest), float(grace))


if __name__ == "__main__":
    main(sys.argv[1:])
