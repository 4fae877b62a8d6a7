"""One run owns an output at a time: the ``OUT.lock`` rules, the writer that never renames a
file it did not write, and two real runs given the same ``--out``."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from conftest import REPO, mpi_command, run_mpi, snake_mpi
from snake_mpi.outlock import LockError, OutputLock, lock_path
from snake_mpi.store import ResultWriter, read_result

TINY = REPO / "tests" / "configs" / "tiny.toml"


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_lock(out, **fields) -> None:
    holder = {
        "host": socket.gethostname(),
        "pid": dead_pid(),
        "started": 1.0,
        "slurm_job_id": "",
        "slurm_restart_count": 0,
        "created": time.time(),
        "token": "theirs",
    } | fields
    lock_path(out).write_text(json.dumps(holder))


def test_the_lock_names_its_holder_and_a_second_taker_is_refused(tmp_path):
    out = tmp_path / "r.h5"
    with OutputLock(out) as lock:
        held = json.loads(lock_path(out).read_text())
        assert held["pid"] == lock.holder.pid and held["host"] == socket.gethostname()
        with pytest.raises(LockError, match=r"being written by another run \(host .*pid "):
            OutputLock(out).acquire()
    assert not lock_path(out).exists()


def test_a_lock_of_a_dead_process_on_this_host_is_taken_over(tmp_path):
    out = tmp_path / "r.h5"
    write_lock(out)
    lock = OutputLock(out).acquire()
    assert "is gone" in lock.took_over
    assert json.loads(lock_path(out).read_text())["token"] == lock.holder.token
    lock.release()


def test_a_reused_pid_does_not_keep_a_lock(tmp_path):
    out = tmp_path / "r.h5"
    me = OutputLock(out).holder
    write_lock(out, pid=me.pid, started=me.started - 1000)
    assert "belongs to another process" in OutputLock(out).acquire().took_over


def test_a_lock_from_another_host_is_refused_unless_it_is_this_jobs_earlier_attempt(
    tmp_path, monkeypatch
):
    out = tmp_path / "r.h5"
    write_lock(out, host="node-elsewhere", pid=4242, slurm_job_id="77")
    with pytest.raises(LockError, match=r"host node-elsewhere, pid 4242, Slurm job 77"):
        OutputLock(out).acquire()
    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "0")
    with pytest.raises(LockError):  # the same attempt elsewhere: may be live
        OutputLock(out).acquire()
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")  # requeued: the holder was an earlier try
    assert "earlier attempt of this Slurm job (77)" in OutputLock(out).acquire().took_over


def test_release_leaves_a_lock_that_is_no_longer_ours(tmp_path):
    out = tmp_path / "r.h5"
    lock = OutputLock(out).acquire()
    write_lock(out, token="someone-else")
    assert not lock.still_held()
    lock.release()
    assert json.loads(lock_path(out).read_text())["token"] == "someone-else"


def test_a_lock_that_cannot_be_created_says_where(tmp_path):
    with pytest.raises(LockError, match="cannot create files in /proc"):
        OutputLock("/proc/r.h5").acquire()


def test_the_writer_never_renames_a_partial_file_it_did_not_write(tmp_path):
    out = tmp_path / "r.h5"
    kw = dict(world_size=1, round_fields={"x": "f8"}, eval_fields={}, attrs={}, config_toml="")
    w = ResultWriter(out, **kw)
    w.append_round({"x": np.zeros(1)})
    other = ResultWriter(tmp_path / "other.h5", **kw)
    other.complete()
    (tmp_path / "other.h5").replace(w.partial)  # another run's file under our .partial name
    with pytest.raises(RuntimeError, match="no longer the file this run wrote"):
        w.complete()
    assert not out.exists()


@pytest.mark.mpi
def test_a_second_run_on_the_same_output_is_refused_and_the_first_result_is_intact(tmp_path):
    """The red-team's reproduction: two runs with one --out, the second with another seed,
    started while the first runs. The second exits 2 naming the first; the first completes
    with its own data."""
    import os

    out = tmp_path / "s.h5"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    args = ["run", str(TINY), "--set", "train.rounds=15", "--set", "emulate.latency_s=0.2"]
    first = subprocess.Popen(
        mpi_command(2, snake_mpi(*args, "--out", str(out))),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not out.with_name("s.h5.partial").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        second = run_mpi(2, snake_mpi(*args, "--set", "seed=7", "--out", str(out)))
        first_out, _ = first.communicate(timeout=240)
    finally:
        if first.poll() is None:
            first.kill()
    assert second.returncode == 2, second.output
    assert f"{out} is being written by another run (host " in second.output
    assert first.returncode == 0, first_out
    res = read_result(out)
    assert "seed = 3" in res.config_toml and res.n_rounds == 15
    assert not lock_path(out).exists()


@pytest.mark.mpi
def test_locks_after_a_failed_run_a_killed_rank_0_and_a_stale_lock(tmp_path):
    """A rank's exception ends the job and leaves no lock; SIGKILL of rank 0 leaves one,
    which the next run on this host takes over with a message."""
    out = tmp_path / "r.h5"
    failed = run_mpi(
        2, snake_mpi("run", str(TINY), "--set", "debug.fail_rank=1", "--out", str(out))
    )
    assert failed.returncode != 0 and "injected fault" in failed.output
    assert not lock_path(out).exists()
    killed = run_mpi(
        2,
        snake_mpi(
            "run", str(TINY), "--set", "debug.fail_rank=0", "--set", 'debug.fail_kind="kill"',
            "--out", str(out),
        ),
    )  # fmt: skip
    assert killed.returncode != 0 and lock_path(out).exists()
    rerun = run_mpi(2, snake_mpi("run", str(TINY), "--out", str(out)))
    assert rerun.returncode == 0, rerun.output
    assert f"took over the stale lock {lock_path(out)}" in rerun.output
    assert "is gone" in rerun.output and not lock_path(out).exists()
    assert read_result(out).status == "complete"
