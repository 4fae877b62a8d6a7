"""Ending a launched MPI job completely: the launcher and every process it started.

Killing the launcher's process group is not enough: Open MPI's ``prterun`` puts each rank in
a process group of its own, and ranks whose launcher dies are reparented to PID 1 and run on.
A job started with ``start_new_session=True`` is found here as the launcher's descendants
(collected while it is alive) plus every process still in its session (which ranks keep when
they change process group), and is signalled as a whole.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import psutil


def job_processes(pid: int, *, descendants: bool = True) -> list[psutil.Process]:
    """The launcher ``pid`` and its descendants (while it runs), and any process of its session
    (``pid`` is the session id of a launcher started with ``start_new_session=True``; Linux
    does not reuse a pid while a session of that id has members)."""
    found: dict[int, psutil.Process] = {}
    if descendants:
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(pid)
            found[pid] = root
            for child in root.children(recursive=True):
                found[child.pid] = child
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if proc.pid not in found and os.getsid(proc.pid) == pid:
                found[proc.pid] = proc
    return list(found.values())


def signal_job(pid: int, sig: int) -> list[psutil.Process]:
    """Send ``sig`` to every process of the job; returns them."""
    procs = job_processes(pid)
    for p in procs:
        with contextlib.suppress(psutil.Error):
            p.send_signal(sig)
    return procs


def end_job(proc: subprocess.Popen, grace_s: float = 5.0) -> list[int]:
    """End the whole job of launcher ``proc``: SIGTERM to all of it (srun and mpirun forward it
    to their tasks), then SIGKILL to whatever is left after ``grace_s``. Returns once none of
    its processes runs any more (the launcher reaped by ``proc``); the pids that needed
    SIGKILL."""
    procs = [p for p in signal_job(proc.pid, signal.SIGTERM) if p.pid != proc.pid]
    deadline = time.monotonic() + grace_s
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace_s)
    _, alive = psutil.wait_procs(procs, timeout=max(0.0, deadline - time.monotonic()))
    later = job_processes(proc.pid, descendants=proc.poll() is None)  # started meanwhile
    alive += [p for p in later if p not in alive and p.pid != proc.pid]
    killed = [p.pid for p in alive]
    if proc.poll() is None:
        killed.append(proc.pid)
        proc.kill()
    for p in alive:
        with contextlib.suppress(psutil.Error):
            p.kill()
    proc.wait()
    psutil.wait_procs(alive, timeout=10)
    return killed
