"""The slurm/ scripts on a real one-node Slurm (slurm/local-cluster.sh: Debian's slurmctld,
slurmd and munge). Skipped, with the reason, where Slurm cannot be installed or started."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import REPO, mpi_run
from snake_mpi.store import read_result

CLUSTER = REPO / "slurm" / "local-cluster.sh"
pytestmark = pytest.mark.mpi


@pytest.fixture(scope="session")
def slurm():
    """The local cluster, up once for the session (or pytest-xdist worker) that needs it."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (it writes /etc/slurm and starts daemons)")
    if shutil.which("sbatch") is None and shutil.which("apt-get") is None:
        pytest.skip("no Slurm and no apt-get to install it")
    up = subprocess.run([str(CLUSTER), "up"], capture_output=True, text=True, timeout=900)
    if up.returncode != 0:
        pytest.skip(f"could not start a local Slurm cluster: {(up.stderr or up.stdout)[-800:]}")
    yield
    subprocess.run([str(CLUSTER), "down"], capture_output=True, text=True, timeout=120)


def sbatch(*args: str, env: dict[str, str], timeout_s: float = 600) -> str:
    """Submit with ``--wait``; returns the job id (fails the test on a non-zero exit)."""
    job = subprocess.run(
        ["sbatch", "--parsable", "--wait", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env=dict(os.environ, **env),
    )
    assert job.returncode == 0, f"sbatch {' '.join(args)}: {job.stdout}\n{job.stderr}"
    job_id = job.stdout.strip().split(";")[0]
    wait_until_gone(job_id)
    return job_id


def wait_until_gone(job_id: str, timeout_s: float = 120) -> None:
    """Until no task of ``job_id`` is queued or running (``sbatch --wait`` on a job array can
    return while a task is still ending)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        queued = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%i %T"],
                                capture_output=True, text=True, timeout=60)  # fmt: skip
        gone = queued.returncode != 0 and "Invalid job id" in queued.stderr  # purged already
        if gone or (queued.returncode == 0 and not queued.stdout.strip()):
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} still queued or running after {timeout_s:g} s")


def test_run_sbatch_writes_a_complete_result_carrying_the_job_id(slurm, tmp_path):
    out = tmp_path / "tiny.h5"
    log = tmp_path / "job.log"
    job_id = sbatch(
        "--ntasks=4",
        "--cpus-per-task=1",
        f"--output={log}",
        "slurm/run.sbatch",
        env={"CONFIG": "tests/configs/tiny.toml", "OUT": str(out), "SET": "train.rounds=2"},
    )
    text = log.read_text()
    assert "snake-mpi launch:" in text, text
    res = read_result(out)
    assert res.attrs["status"] == "complete" and res.world_size == 4
    assert res.provenance["slurm_job_id"] == job_id
    assert res.provenance["launcher"] == "slurm"
    assert int(res.provenance["torch_num_threads"]) == 1  # --cpus-per-task


def test_suite_sbatch_runs_one_cell_per_array_task_and_resumes(slurm, tmp_path):
    suite = tmp_path / "two.toml"
    suite.write_text(
        'configs = ["tests/configs/tiny.toml"]\nranks = [2]\nseeds = [0, 1]\n'
        'set = ["train.rounds=1"]\ntime_limit_s = 300\n'
    )
    out = tmp_path / "suite"
    env = {"SUITE": str(suite), "OUT": str(out)}
    args = ["--array=0-1", "--ntasks=2", f"--output={tmp_path}/task-%a.log", "slurm/suite.sbatch"]
    job_id = sbatch(*args, env=env)
    manifest = json.loads((out / "manifest.json").read_text())
    assert sorted(manifest["cells"]) == ["tiny-n2-s0", "tiny-n2-s1"]
    assert all(c["status"] == "complete" for c in manifest["cells"].values()), manifest
    tasks = set()
    for name in manifest["cells"]:
        prov = read_result(out / f"{name}.h5").provenance
        assert prov["slurm_array_job_id"] == job_id
        tasks.add(prov["slurm_array_task_id"])
    assert tasks == {"0", "1"}
    first = manifest["cells"]
    sbatch(*args, env=env)  # again: both cells are complete, so both are skipped
    manifest = json.loads((out / "manifest.json").read_text())
    for name, cell in manifest["cells"].items():  # each keeps the record of its run
        assert len(cell.pop("skipped_at")) == 1, cell
        assert cell == first[name], (cell, first[name])


def job_fields(job_id: str) -> dict[str, str]:
    """``scontrol show job``'s ``Key=Value`` fields (JobState, Restarts, Reason, ExitCode, ...)."""
    shown = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=60
    )
    return dict(f.split("=", 1) for f in shown.stdout.split() if "=" in f)


PREEMPTED_ROUNDS = 12
PREEMPTED_SETS = [
    f"train.rounds={PREEMPTED_ROUNDS}",
    "checkpoint.every=100",  # no periodic checkpoint: the resume point is the USR1 one
    "emulate.latency_s=0.2",  # rounds long enough to signal one mid-run
    "probes.enabled=false",
]
UNINTERRUPTED = mpi_run(2, REPO / "tests" / "configs" / "tiny.toml", *PREEMPTED_SETS)
"""The preempted run never stopped, without Slurm (a run of the session's shared MPI job)."""


def submit(*args: str, env: dict[str, str]) -> str:
    """Submit without waiting; returns the job id."""
    sub = subprocess.run(
        ["sbatch", "--parsable", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=dict(os.environ, **env),
    )
    assert sub.returncode == 0, sub.stderr
    return sub.stdout.strip().split(";")[0]


def preempt_once(job_id: str, *, watch: Path, marker: str, log: Path) -> dict[str, str]:
    """Once ``marker`` shows in ``watch`` (the run is mid-way), send USR1 to the job's batch
    shell only (``scancel --batch``: what ``--signal=B:USR1@T`` sends at T); then wait until
    the job has been requeued once and has completed. Returns its ``scontrol`` fields; fails
    at once if it ends otherwise or is held. Nothing of the job is left on failure."""
    fields: dict[str, str] = {}
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and marker not in (
            watch.read_text() if watch.exists() else ""
        ):
            assert job_fields(job_id).get("JobState") in ("PENDING", "RUNNING"), log.read_text()
            time.sleep(0.5)
        assert marker in watch.read_text(), watch.read_text()
        sig = subprocess.run(
            ["scancel", "--batch", "--signal=USR1", job_id],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert sig.returncode == 0, sig.stderr
        deadline, done_unrequeued = time.monotonic() + 300, None
        while time.monotonic() < deadline:
            fields = job_fields(job_id)
            state, restarts = fields.get("JobState", ""), int(fields.get("Restarts", "0"))
            assert "Held" not in fields.get("Reason", ""), fields  # requeued, not held
            if state == "COMPLETED" and restarts >= 1:
                break
            if state == "COMPLETED":  # not requeued (yet?): give the requeue a few seconds
                done_unrequeued = done_unrequeued or time.monotonic()
                if time.monotonic() - done_unrequeued > 20:
                    break
            assert state not in ("FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"), (
                fields,
                log.read_text(),
            )
            time.sleep(1)
        assert fields.get("JobState") == "COMPLETED", (fields, log.read_text())
        assert fields.get("Restarts") == "1", (fields, log.read_text())  # requeued once
        assert fields.get("ExitCode") == "0:0", fields
    finally:
        if fields.get("JobState") != "COMPLETED":
            subprocess.run(["scancel", job_id], capture_output=True, timeout=60)
    return fields


def test_usr1_checkpoints_requeues_and_the_requeued_job_resumes_to_the_same_result(
    slurm, tmp_path, mpi_runs
):
    """Preemption as run.sbatch submits itself (--requeue --signal=B:USR1@T): USR1 to the batch
    shell only (``scancel --batch``, what Slurm sends at T) is passed on to the ranks, which
    checkpoint at the end of their round and exit 75; the script requeues the job (not held),
    the requeued job (restart 1, same job id) resumes from that checkpoint and completes. The
    result equals a run never interrupted (model hashes, per-round bytes and messages, losses,
    evaluations) and records both attempts with their restart counts and rounds."""
    rounds, sets = PREEMPTED_ROUNDS, PREEMPTED_SETS
    config = "tests/configs/tiny.toml"
    want = mpi_runs(UNINTERRUPTED).result

    out = tmp_path / "pre.h5"
    log = tmp_path / "job.log"
    env = {"CONFIG": config, "OUT": str(out), "SET": ";".join(sets)}
    job_id = submit("--ntasks=2", f"--output={log}", "slurm/run.sbatch", env=env)
    t0 = time.monotonic()
    fields = preempt_once(job_id, watch=log, marker=f"round 3 of {rounds}", log=log)
    elapsed = time.monotonic() - t0
    text = log.read_text()
    assert fields["JobId"] == job_id
    assert "got SIGUSR1" in text, text
    stop = re.search(rf"stopped on request after round (\d+) of {rounds}", text)
    assert stop, text
    k = int(stop.group(1))
    assert 3 <= k < rounds, text
    assert "the run stopped after a checkpoint: requeueing the job" in text, text
    assert "(restart 1)" in text and "resuming from" in text, text
    assert text.count("snake-mpi: wrote") == 1, text

    got = read_result(out)
    assert got.attrs["status"] == "complete" and got.n_rounds == rounds
    assert got.provenance["slurm_job_id"] == job_id
    assert got.provenance["slurm_restart_count"] == "1"
    a = got.tables["attempts"]
    assert list(a["slurm_job_id"]) == [job_id, job_id], a
    assert a["slurm_restart_count"].tolist() == [0, 1], a
    assert a["start_round"].tolist() == [0, k] and a["end_round"].tolist() == [k, rounds], a
    assert a["resumed_from_round"].tolist() == [0, k], a
    # the same run as the one never interrupted
    assert list(got.tables["ranks"]["model_sha256"]) == list(want.tables["ranks"]["model_sha256"])
    for name in ("bytes_sent", "bytes_received", "messages_sent", "messages_received", "loss"):
        np.testing.assert_array_equal(got.rounds[name], want.rounds[name], err_msg=name)
    for name in ("round", "accuracy", "loss", "cum_bytes_sent"):
        np.testing.assert_array_equal(got.evaluation[name], want.evaluation[name], err_msg=name)
    # nothing left behind: no partial result, checkpoint, lock or process
    assert sorted(p.name for p in tmp_path.iterdir()) == ["job.log", "pre.h5"]
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])
    ]
    print(f"USR1 -> checkpoint after round {k} -> requeue -> resume -> complete: {elapsed:.0f} s")


def test_usr1_to_a_suite_task_requeues_it_and_the_requeued_task_resumes_its_cell(slurm, tmp_path):
    """suite.sbatch: USR1 to an array task's batch shell reaches the running cell's ranks
    through ``snake-mpi suite``; the cell checkpoints (exit 75), the suite exits 75, the task
    requeues itself and the requeued task resumes the cell from its checkpoint."""
    rounds = 12
    sets = [f"train.rounds={rounds}", "checkpoint.every=100", "emulate.latency_s=0.2"]
    suite = tmp_path / "one.toml"
    suite.write_text(
        'configs = ["tests/configs/tiny.toml"]\nranks = [2]\nseeds = [0]\n'
        f"set = {json.dumps(sets)}\ntime_limit_s = 300\n"
    )
    out = tmp_path / "suite"
    log = tmp_path / "task-0.log"
    env = {"SUITE": str(suite), "OUT": str(out)}
    array = submit(
        "--array=0", "--ntasks=2", f"--output={tmp_path}/task-%a.log", "slurm/suite.sbatch", env=env
    )
    cell_log = out / "tiny-n2-s0.log"
    fields = preempt_once(f"{array}_0", watch=cell_log, marker=f"round 3 of {rounds}", log=log)
    text, cell_text = log.read_text(), cell_log.read_text()
    assert "got SIGUSR1" in text, text
    assert "the cell stopped after a checkpoint: requeueing the task," in text, text
    assert f"(job {fields['JobId']}, restart 1)" in text, text
    assert "runs again with --resume" in cell_text and "resuming from" in cell_text, cell_text
    cell = json.loads((out / "manifest.json").read_text())["cells"]["tiny-n2-s0"]
    assert cell["status"] == "complete" and "--resume" in cell["command"], cell
    res = read_result(out / "tiny-n2-s0.h5")
    assert res.n_rounds == rounds
    a = res.tables["attempts"]
    assert list(a["slurm_job_id"]) == [fields["JobId"]] * 2, a
    assert a["slurm_restart_count"].tolist() == [0, 1], a
    k = int(a["end_round"][0])
    assert 3 <= k < rounds and a["start_round"].tolist() == [0, k], a
    assert not (out / "tiny-n2-s0.h5.ckpt").exists()
    assert not [
        p for p in psutil.process_iter(["cmdline"]) if str(out) in " ".join(p.info["cmdline"] or [])
    ]


@pytest.mark.parametrize("action", ["up", "down"])
def test_the_local_cluster_never_touches_a_slurm_it_did_not_set_up(tmp_path, action):
    """A machine with its own slurm.conf (a real cluster's node): the script refuses before it
    installs, stops or writes anything, and the tests that need it are skipped with that reason."""
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=production\nSlurmctldHost=head01\n")
    env = dict(os.environ, SNAKE_SLURM_CONF=str(conf))
    done = subprocess.run(
        [str(CLUSTER), action], capture_output=True, text=True, timeout=60, env=env
    )
    assert done.returncode == 1
    assert "was not written by this script: this machine has a Slurm of its own" in done.stderr
    assert conf.read_text() == "ClusterName=production\nSlurmctldHost=head01\n"
