"""The suite runner: one MPI job per cell, a manifest, resumable, failures recorded."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from conftest import REPO
from snake_mpi.suite import load_suite, main

pytestmark = pytest.mark.mpi
TINY = REPO / "tests" / "configs" / "tiny.toml"


def write_suite(tmp_path, limit_s=30):
    fail = tmp_path / "fails.toml"
    fail.write_text(TINY.read_text().replace("[probes]", "[debug]\nfail_rank = 1\n\n[probes]"))
    hang = tmp_path / "hangs.toml"
    hang.write_text(
        TINY.read_text().replace(
            "[probes]",
            '[debug]\nfail_rank = 0\nfail_kind = "hang"\n\n[comm]\ndeadline_s = 600\n\n[probes]',
        )
    )
    suite = tmp_path / "mini.toml"
    suite.write_text(
        f'configs = ["{TINY}", "{fail}", "{hang}@2"]\nranks = [2]\nseeds = [0]\n'
        f'set = ["probes.enabled=false"]\ntime_limit_s = {limit_s}\n'
    )
    return suite


def test_cells_are_the_matrix_of_configs_ranks_and_seeds():
    cells, limit = load_suite("scaling")
    assert limit == 1800
    assert [c.name for c in cells][:4] == [f"snake-p2p-n{n}-s0" for n in (2, 4, 8, 16)]
    cells, _ = load_suite("smoke")
    assert {c.ranks for c in cells if "centralised" in c.name} == {1}


def test_a_suite_runs_records_failures_and_resumes(tmp_path, capsys):
    """Three cells: one completes, one fails (an injected fault), one hangs until the time
    limit; run again, the complete cell is skipped and the others run. (The matrix of configs,
    ranks and seeds: ``test_cells_are_the_matrix_of_configs_ranks_and_seeds``.)"""
    suite = write_suite(tmp_path, limit_s=20)
    out = tmp_path / "out"
    assert main([str(suite), "--out", str(out)]) == 1  # some cells failed
    text = capsys.readouterr().out
    assert "[3/3]" in text and "s elapsed" in text
    # a line when each cell starts, with its size and log, and the time on every line
    assert f"[1/3] tiny-n2-s0: started, 2 rank(s) x 3 round(s), log {out}/tiny-n2-s0.log" in text
    progress = [line for line in text.splitlines() if "/3] " in line]
    assert len(progress) == 6  # 3 started, 3 ended
    assert all(re.match(r"suite: \d\d:\d\d:\d\d \[", line) for line in progress)
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert {k: v["status"] for k, v in cells.items()} == {
        "tiny-n2-s0": "complete",
        "fails-n2-s0": "failed",
        "hangs-n2-s0": "failed",
    }
    assert cells["fails-n2-s0"]["exit_code"] not in (0, None)
    assert "injected fault" in cells["fails-n2-s0"]["stderr_tail"]
    assert cells["hangs-n2-s0"]["exit_code"] is None
    assert "killed at the time limit of 20 s" in cells["hangs-n2-s0"]["stderr_tail"]
    assert processes_of(out) == []  # the hung cell's launcher and ranks all ended
    assert (out / "tiny-n2-s0.h5").exists() and not (out / "fails-n2-s0.h5").exists()
    # resumed: complete cells are skipped, failed ones run again
    (tmp_path / "fails.toml").write_text(TINY.read_text())
    (tmp_path / "hangs.toml").write_text(TINY.read_text())
    assert main([str(suite), "--out", str(out)]) == 0
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    # a skipped cell keeps the record of the run that made its result, and notes the skip
    tiny = cells["tiny-n2-s0"]
    assert tiny["status"] == "complete" and tiny["exit_code"] == 0 and tiny["command"]
    assert tiny["elapsed_s"] > 0 and len(tiny["skipped_at"]) == 1
    assert cells["fails-n2-s0"]["status"] == "complete" and "skipped_at" not in cells["fails-n2-s0"]


def processes_of(out_dir) -> list[str]:
    """Live processes whose command line names ``out_dir`` (a cell's launcher and ranks)."""
    import psutil

    found = []
    for p in psutil.process_iter(["cmdline", "status"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if str(out_dir) in cmd and p.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(f"{p.pid}: {cmd[:200]}")
    return found


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGINT"])
def test_a_signal_to_the_suite_ends_the_running_cell_whole_and_is_recorded(tmp_path, sig):
    """TERM/INT to ``snake-mpi suite`` reach the running cell; within the grace time every
    process of the cell (launcher and ranks, which sit in process groups of their own) is gone,
    the manifest says "interrupted", and the exit status is 128 + the signal."""
    import os
    import signal
    import subprocess
    import sys
    import time

    suite = tmp_path / "hang.toml"
    hang = write_suite(tmp_path).parent / "hangs.toml"
    suite.write_text(f'configs = ["{hang}@2"]\nseeds = [0]\ntime_limit_s = 600\n')
    out = tmp_path / "out"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [sys.executable, "-m", "snake_mpi.cli", "suite", str(suite), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while len(processes_of(out)) < 3 and time.monotonic() < deadline:  # launcher + 2 ranks
            time.sleep(0.2)
        assert len(processes_of(out)) >= 3, processes_of(out)
        time.sleep(3)  # the ranks are past start-up: rank 0 hangs, rank 1 waits for it
        proc.send_signal(getattr(signal, sig))
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + getattr(signal, sig), err
    assert "completed cells are kept, run the suite again to resume" in err
    assert processes_of(out) == []
    cell = json.loads((out / "manifest.json").read_text())["cells"]["hangs-n2-s0"]
    assert cell["status"] == "interrupted" and f"interrupted by {sig}" in cell["stderr_tail"]


def test_an_unknown_suite_is_a_clear_error(capsys):
    assert main(["nonesuch", "--out", "/tmp/x"]) == 2
    known = ", ".join(sorted(p.stem for p in (REPO / "bench" / "suites").glob("*.toml")))
    assert "smoke" in known and "label-skew" in known
    assert f"unknown suite 'nonesuch'; known: {known}" in capsys.readouterr().err


def test_array_tasks_run_one_cell_each_and_share_the_manifest(tmp_path, capsys):
    """As Slurm array tasks do: --count, then --cell K in parallel processes; the manifest
    (updated under a lock) ends up with every cell; a cell number out of range is exit 2."""
    import os
    import subprocess
    import sys

    suite = tmp_path / "two.toml"
    suite.write_text(
        f'configs = ["{TINY}"]\nranks = [2]\nseeds = [0, 1]\n'
        'set = ["probes.enabled=false", "train.rounds=1"]\ntime_limit_s = 120\n'
    )
    assert main([str(suite), "--out", "x", "--count"]) == 0
    assert capsys.readouterr().out.strip() == "2"
    assert main([str(suite), "--out", "x", "--list"]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith("1 tiny-n2-s1 ranks=2 seed=1")
    out = tmp_path / "out"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [sys.executable, "-m", "snake_mpi.cli", "suite", str(suite), "--out", str(out)]
    procs = [subprocess.Popen([*cmd, "--cell", str(k)], env=env) for k in (0, 1)]
    assert [p.wait(timeout=240) for p in procs] == [0, 0]
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert {k: v["status"] for k, v in cells.items()} == {
        "tiny-n2-s0": "complete",
        "tiny-n2-s1": "complete",
    }
    assert main([str(suite), "--out", str(out), "--cell", "2"]) == 2
    assert "cell 2 does not exist: suite" in capsys.readouterr().err


def test_sigusr1_stops_the_cell_at_a_checkpoint_and_the_rerun_resumes_it(tmp_path):
    """SIGUSR1 to ``snake-mpi suite`` (what slurm/suite.sbatch passes on from Slurm's
    ``--signal=B:USR1``) reaches the running cell's ranks: they checkpoint at the end of their
    round and exit 75; the suite records the cell as interrupted, starts no other cell and exits
    75. Run again, the suite resumes the cell from that checkpoint (--resume): the result has
    two attempts."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from snake_mpi.store import is_complete, partial_path, read_result
    from snake_mpi.suite import load_suite, resume_flag

    rounds = 8
    suite = tmp_path / "slow.toml"
    sets = [
        "probes.enabled=false",
        f"train.rounds={rounds}",
        "checkpoint.every=100",  # no periodic checkpoint: only the one SIGUSR1 asks for
        "emulate.latency_s=0.2",  # rounds long enough to signal one mid-run
    ]
    suite.write_text(
        f'configs = ["{TINY}"]\nranks = [2]\nseeds = [0, 1]\nset = {json.dumps(sets)}\n'
        "time_limit_s = 300\n"
    )
    out = tmp_path / "out"
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    cmd = [sys.executable, "-m", "snake_mpi.cli", "suite", str(suite), "--out", str(out)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = out / "tiny-n2-s0.log"
    try:
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline and proc.poll() is None:
            if log.exists() and "round 1 of" in log.read_text():
                break
            time.sleep(0.2)
        assert log.exists() and "round 1 of" in log.read_text(), proc.poll()
        proc.send_signal(signal.SIGUSR1)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 75, stdout + stderr
    assert "stopped by SIGUSR1 at tiny-n2-s0" in stderr
    assert "tiny-n2-s1: not started" not in stdout  # the second cell was never reached...
    assert "tiny-n2-s1" not in stdout  # ...nor announced
    assert processes_of(out) == []
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert list(cells) == ["tiny-n2-s0"]
    cell = cells["tiny-n2-s0"]
    assert cell["status"] == "interrupted" and cell["exit_code"] == 75, cell
    assert "stopped after a checkpoint" in cell["stderr_tail"]
    result = out / "tiny-n2-s0.h5"
    assert not is_complete(result)
    done = read_result(partial_path(result), allow_incomplete=True).n_rounds
    assert 1 <= done < rounds

    cells_, _ = load_suite(str(suite))
    assert resume_flag(cells_[0], result) == ("--resume", "")
    changed = dataclasses.replace(cells_[0], overrides=(*cells_[0].overrides, "train.lr=0.5"))
    flag, note = resume_flag(changed, result)  # a checkpoint of another config: start again
    assert flag == "--overwrite" and "is of another run" in note, note

    assert main([str(suite), "--out", str(out)]) == 0  # run again: resumes, then the next cell
    cells = json.loads((out / "manifest.json").read_text())["cells"]
    assert {k: v["status"] for k, v in cells.items()} == {
        "tiny-n2-s0": "complete",
        "tiny-n2-s1": "complete",
    }
    assert "--resume" in cells["tiny-n2-s0"]["command"]
    text = log.read_text()
    assert "runs again with --resume" in text and "resuming from" in text, text
    res = read_result(result)
    assert res.n_rounds == rounds
    a = res.tables["attempts"]
    assert a["start_round"].tolist() == [0, done] and a["end_round"].tolist() == [done, rounds]
    assert a["resumed_from_round"].tolist() == [0, done]
    assert read_result(out / "tiny-n2-s1.h5").tables["attempts"]["start_round"].tolist() == [0]
    assert processes_of(out) == []


def one_cell_suite(tmp_path, seeds="[0, 1]"):
    suite = tmp_path / "one.toml"
    suite.write_text(f'configs = ["{TINY}"]\nranks = [2]\nseeds = {seeds}\ntime_limit_s = 60\n')
    return suite


def test_a_suite_directory_is_owned_by_one_suite_at_a_time(tmp_path, capsys):
    """The red team's case: two suites on one --out both reported every cell FAILED with the
    reason in neither log nor manifest. A whole suite holds OUT/suite.lock (the rules of a
    run's output lock): a second is refused at once (exit 2, naming the holder) and touches
    nothing; so is a --cell task while a whole suite runs."""
    from snake_mpi.outlock import OutputLock

    suite, out = one_cell_suite(tmp_path), tmp_path / "out"
    out.mkdir()
    with OutputLock(out / "suite", owner="suite"):  # a live suite (this process) holds it
        assert main([str(suite), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert f"suite: {out}/suite is being written by another suite (host " in err
        assert main([str(suite), "--out", str(out), "--cell", "0"]) == 2
        assert f"{out} is being run by a whole suite (host " in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == []  # no log, no manifest, no result


def test_a_cell_another_suite_process_runs_is_not_touched_and_says_why(tmp_path, capsys):
    """A cell held by another process (a --cell task) is reported with the reason on the
    suite's own output; its log and manifest record stay the other process's. Progress
    counts a --cell task's cell within the whole suite ([2/2], not [1/1])."""
    from snake_mpi.outlock import OutputLock

    suite, out = one_cell_suite(tmp_path), tmp_path / "out"
    out.mkdir()
    with OutputLock(out / "tiny-n2-s1.cell", owner="suite"):
        assert main([str(suite), "--out", str(out), "--cell", "1"]) == 1
    text = capsys.readouterr().out
    assert "[2/2] tiny-n2-s1: not run: " in text and "being written by another suite" in text
    assert "suite: FAILED tiny-n2-s1: not run: " in text
    assert not (out / "tiny-n2-s1.log").exists() and not (out / "manifest.json").exists()
    assert not (out / "suite.lock").exists()  # a --cell task takes no directory lock
