"""A real job across two hosts on this machine (``bench/two_hosts.sh``): what only several hosts
show, checked against the same run on one host (the session's shared MPI job).

``mpirun`` reaches the hosts nodeA and nodeB through a stand-in remote shell that starts each
host's daemon in a UTS namespace of its own (its own host name); the names resolve to loopback
addresses inside the launcher's mount namespace, and the ranks of the two hosts talk over TCP.
Root only (namespaces), Open MPI only (its ``plm_ssh_agent``); skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest

from conftest import REPO, Job, mpi_run, run_job, snake_mpi
from snake_mpi.analysis.expected import expected_bytes
from snake_mpi.provenance import parse_cpu_ranges
from snake_mpi.store import read_result

TINY = REPO / "tests" / "configs" / "tiny.toml"
LAUNCH = REPO / "bench" / "two_hosts.sh"
SETS = ("checkpoint.every=1", "torch_threads=0")  # threads: the launcher's rule, per host
ONE_HOST = mpi_run(4, TINY, *SETS)
"""The reference: the same config and seed on four ranks of one host."""
LAYOUT = {"nodeA": 1, "nodeB": 3}
"""Uneven on purpose: a host's torch threads are its CPUs shared among *its* ranks."""


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root: the hosts are UTS and mount namespaces"
    if shutil.which("unshare") is None:
        return "needs util-linux's unshare"
    probe = subprocess.run(["unshare", "-u", "-m", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"this kernel refuses new namespaces: {probe.stderr.decode().strip()}"
    return None


pytestmark = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))


def two_hosts(n: int, argv: list[str], *, timeout_s: float = 240) -> Job:
    """``argv`` on ``n`` ranks laid out as ``LAYOUT``, through ``bench/two_hosts.sh``."""
    slots = f"{LAYOUT['nodeA']},{LAYOUT['nodeB']}"
    cmd = [str(LAUNCH), "--slots", slots, "--", "-n", str(n), "--bind-to", "none", *argv]
    job = run_job(cmd, timeout_s=timeout_s)
    if job.returncode == 77:
        pytest.skip(job.stderr.strip())
    return job


def test_a_run_across_two_hosts_matches_the_one_host_run(tmp_path, mpi_runs):
    out = tmp_path / "two.h5"
    stale = {  # a lock left by a dead rank 0 of nodeA: nodeA's rank 0 may check its pid
        "host": "nodeA",
        "pid": 2**22 + 7,  # above any pid this machine hands out
        "started": 1.0,
        "slurm_job_id": "",
        "slurm_restart_count": 0,
        "created": 1.0,
        "token": "0" * 32,
    }
    (tmp_path / "two.h5.lock").write_text(json.dumps(stale))
    argv = ["run", str(TINY), "--out", str(out)]
    for s in SETS:
        argv += ["--set", s]
    job = two_hosts(4, snake_mpi(*argv))
    assert job.returncode == 0, job.output
    assert "took over the stale lock" in job.output and "host nodeA, pid 4194311" in job.output
    assert not (tmp_path / "two.h5.lock").exists()

    res, ref = read_result(out), mpi_runs(ONE_HOST).result
    ranks = res.tables["ranks"]
    hosts = list(ranks["host"])
    assert hosts == ["nodeA", "nodeB", "nodeB", "nodeB"]
    assert res.provenance["n_hosts"] == 2 and set(ref.tables["ranks"]["host"]) != set(hosts)
    for host in LAYOUT:  # local ranks count within each host, from the launcher's variable
        mine = [int(r) for h, r in zip(hosts, ranks["local_rank"], strict=True) if h == host]
        assert sorted(mine) == list(range(LAYOUT[host])), (host, mine)
    assert set(ranks["local_rank_source"]) == {"OMPI_COMM_WORLD_LOCAL_RANK"}
    for r, host in enumerate(hosts):  # the host's usable CPUs shared among its own ranks
        cpus = len(parse_cpu_ranges(str(ranks["cpu_affinity"][r])))
        assert ranks["torch_threads"][r] == max(1, cpus // LAYOUT[host]), (r, host, cpus)

    sent, received = expected_bytes(res)  # the same analytic counts as on one host
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
    np.testing.assert_array_equal(res.rounds["bytes_received"], received)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], ref.rounds["bytes_sent"])

    # checkpoints after rounds 1 and 2: every rank wrote its own file into the one folder,
    # whichever host it ran on (the round after records the bytes), and rank 0 committed both
    assert (res.rounds["checkpoint_bytes"][1:] > 0).all(), res.rounds["checkpoint_bytes"]
    for k in (1, 2):
        assert f"checkpoint after round {k} of 3: {out}.ckpt/round-{k:06d} (" in job.output
        assert " in 4 files, " in job.output

    # the same data on every rank and host, and the same model bits as the one-host run:
    # tiny's tensors are below torch's parallel grain, so unequal thread counts cannot split
    # its sums (docs/reproducibility.md)
    assert len(set(ranks["data_sha256"])) == 1
    assert ranks["data_sha256"][0] == ref.tables["ranks"]["data_sha256"][0]
    assert list(ranks["model_sha256"]) == list(ref.tables["ranks"]["model_sha256"])
    np.testing.assert_array_equal(res.evaluation["accuracy"], ref.evaluation["accuracy"])
    np.testing.assert_array_equal(res.rounds["loss"], ref.rounds["loss"])
