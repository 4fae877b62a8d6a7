"""SIGUSR1 that reaches a rank while it starts (torch's import, MPI's start, the data's loading:
seconds, before the run installs its checkpoint handler) is kept for the first round end, not
fatal: ``snake-mpi run`` notes it from the moment the config is read. Slurm's
``--signal=B:USR1`` can come then when a job is preempted, or when its time limit is short."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys

import pytest

from conftest import REPO

TINY = REPO / "tests" / "configs" / "tiny.toml"

# `snake-mpi run` in one process, its run module replaced by one whose import gets SIGUSR1
# (as if it came while torch and MPI start) and whose main reports whether a stop was asked.
PROGRAM = """
import importlib.abc, importlib.util, os, signal, sys


class SignalledImport(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "snake_mpi.run" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        os.kill(os.getpid(), signal.SIGUSR1)
        from snake_mpi.checkpoint import stop_requested

        module.main = lambda cfg, out, **_kw: 75 if stop_requested() else 0


sys.meta_path.insert(0, SignalledImport())
from snake_mpi.cli import main

sys.exit(main(["run", sys.argv[1], "--out", sys.argv[2], *sys.argv[3:]]))
"""


@pytest.mark.parametrize(("every", "code"), [(5, 75), (0, -signal.SIGUSR1)])
def test_sigusr1_while_the_run_starts_is_kept_for_the_first_round_end(tmp_path, every, code):
    """With checkpoints the signal becomes the stop request (the run would checkpoint and exit
    75); with ``checkpoint.every = 0`` there is no handler and the signal ends the process."""
    argv = [sys.executable, "-c", PROGRAM, str(TINY), str(tmp_path / "r.h5")]
    done = subprocess.run(
        [*argv, "--set", f"checkpoint.every={every}"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == code, done.stderr


def _wait_for_mapping(pid: int, fragment: str, timeout_s: float = 60) -> None:
    """Return once process ``pid`` has a library whose path holds ``fragment`` mapped (its
    import has begun)."""
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/maps") as f:
                if fragment in f.read():
                    return
        except OSError:
            pass
        time.sleep(0.001)
    raise AssertionError(f"process {pid} never loaded {fragment}")


def test_sigusr1_while_torch_is_imported_in_a_real_run_checkpoints_and_exits_75(tmp_path):
    """The red team's case on the real command: the signal lands while torch's libraries are
    being loaded (before the config is even read); the rank keeps it, checkpoints at the first
    round end and exits 75, as a signal later does (it used to die of it: exit 138)."""
    import os

    from conftest import mpi_env, snake_mpi

    out = tmp_path / "r.h5"
    argv = snake_mpi(
        "run", str(TINY), "--set", 'scheme="centralised"', "--set", "checkpoint.every=1",
        "--out", str(out),
    )  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env())  # fmt: skip
    try:
        _wait_for_mapping(proc.pid, "libtorch")
        os.kill(proc.pid, signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 75, stdout + stderr
    assert "stopped on request after round 1 of 3" in stdout, stdout
    assert (tmp_path / "r.h5.ckpt" / "round-000001" / "manifest.json").is_file()


def _start(argv: list[str]) -> subprocess.Popen:
    from conftest import mpi_env

    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=mpi_env(), start_new_session=True)  # fmt: skip


def _until_round(proc: subprocess.Popen, k: int) -> str:
    """Read the run's output until rank 0 reports round ``k``."""
    seen = ""
    assert proc.stdout is not None
    for line in proc.stdout:
        seen += line
        if f"round {k} of " in line:
            return seen
    raise AssertionError(f"the run ended before round {k}:\n{seen}")


LONG = ["--set", "train.rounds=400", "--set", "checkpoint.every=2", "--set", "probes.enabled=false"]


def test_sigterm_to_a_one_rank_run_says_what_was_kept(tmp_path):
    """The red team's case: SIGTERM ended a 1-rank run with exit 143 and no word. The run now
    says where it stopped and what it kept, also beside the result (``OUT.stopped``), which
    ``snake-mpi show OUT.partial`` prints; it still dies of the signal (143 in a shell)."""
    from conftest import snake_mpi

    out = tmp_path / "r.h5"
    proc = _start(snake_mpi("run", str(TINY), "--set", 'scheme="centralised"', *LONG,
                            "--out", str(out)))  # fmt: skip
    try:
        _until_round(proc, 3)
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGTERM, stderr
    line = next(x for x in stderr.splitlines() if "stopped by SIGTERM" in x)
    kept = r"r.h5.partial keeps \d+ complete round\(s\) of 400; the checkpoint after round \d+"
    assert re.search(rf"stopped by SIGTERM in round \d+ of 400: .*{kept} is kept", line), line
    assert "--resume continues from it" in line
    assert "or the launcher ending the job after another rank failed" in line  # as after a
    # peer's timeout, when the launcher sends SIGTERM to the ranks still running
    assert (tmp_path / "r.h5.stopped").read_text().strip() == line
    shown = subprocess.run(snake_mpi("show", str(tmp_path / "r.h5.partial")), capture_output=True,
                           text=True, timeout=60)  # fmt: skip
    assert line in shown.stdout, shown.stdout + shown.stderr
    assert not (tmp_path / "r.h5.lock").exists()


@pytest.mark.mpi
def test_sigterm_to_mpirun_leaves_the_line_beside_the_result(tmp_path):
    """Open MPI's mpirun stops relaying the ranks' output once it is signalled, so the line
    rank 0 writes cannot reach the terminal: it is in ``OUT.stopped``, and ``show`` says it."""
    from conftest import mpi_command, snake_mpi

    out = tmp_path / "r.h5"
    proc = _start(mpi_command(2, snake_mpi("run", str(TINY), *LONG, "--out", str(out))))
    try:
        _until_round(proc, 3)
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode != 0
    note = (tmp_path / "r.h5.stopped").read_text()
    assert re.search(r"stopped by SIGTERM in round \d+ of 400: ", note), note
    assert not (tmp_path / "r.h5.lock").exists() and not out.exists()
