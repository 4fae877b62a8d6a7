"""The slurm/ scripts on a real one-node Slurm (slurm/local-cluster.sh: Debian's slurmctld,
slurmd and munge). Skipped, with the reason, where Slurm cannot be installed or started."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from conftest import REPO
from snake_mpi.store import read_result

CLUSTER = REPO / "slurm" / "local-cluster.sh"
pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def slurm():
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
    return job.stdout.strip().split(";")[0]


def test_run_sbatch_writes_a_complete_result_carrying_the_job_id(slurm, tmp_path):
    out = tmp_path / "demo.h5"
    log = tmp_path / "job.log"
    job_id = sbatch(
        "--ntasks=4",
        "--cpus-per-task=1",
        f"--output={log}",
        "slurm/run.sbatch",
        env={"CONFIG": "bench/configs/demo.toml", "OUT": str(out), "SET": "train.rounds=2"},
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


def test_a_preempted_run_requeues_itself_and_starts_again_cleanly(slurm, tmp_path):
    """The preemption convention: USR1 to the batch shell (what --signal=B:USR1@T sends)
    requeues the job; the requeued job runs again from the start and completes, and the
    result records the restart."""
    import time

    out = tmp_path / "pre.h5"
    log = tmp_path / "job.log"
    env = dict(os.environ, CONFIG="bench/configs/demo.toml", OUT=str(out), SET="train.rounds=3")
    sub = subprocess.run(
        [
            "sbatch",
            "--parsable",
            "--requeue",
            "--ntasks=2",
            f"--output={log}",
            "--open-mode=append",
            "slurm/run.sbatch",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
        env=env,
    )
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip()
    deadline = time.time() + 240
    while time.time() < deadline and "round 1 of 3" not in (
        log.read_text() if log.exists() else ""
    ):
        time.sleep(0.5)
    assert "round 1 of 3" in log.read_text(), log.read_text()
    sig = subprocess.run(
        ["scancel", "--batch", "--signal=USR1", job_id], capture_output=True, text=True, timeout=60
    )
    assert sig.returncode == 0, sig.stderr
    while time.time() < deadline:
        state = subprocess.run(
            ["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=60
        ).stdout.strip()
        if state in ("", "COMPLETED") and "snake-mpi: wrote" in log.read_text():
            break
        time.sleep(1)
    text = log.read_text()
    assert "got the preemption signal: requeueing" in text, text
    assert "(restart 1)" in text, text
    res = read_result(out)
    assert res.attrs["status"] == "complete" and res.n_rounds == 3
    assert res.provenance["slurm_job_id"] == job_id
    assert res.provenance["slurm_restart_count"] == "1"
    assert not out.with_name(out.name + ".partial").exists()


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
