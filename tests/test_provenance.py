"""Provenance: every key present, Slurm/launcher metadata from the environment."""

from __future__ import annotations

import os
import re

from snake_mpi import provenance

KEYS = {
    "python_version",
    "torch_version",
    "mpi4py_version",
    "numpy_version",
    "h5py_version",
    "hdf5_version",
    "psutil_version",
    "snake_mpi_version",
    "platform",
    "mpi_library_version",
    "world_size",
    "hosts",
    "n_hosts",
    "launcher",
    "git_commit",
    "git_dirty",
    "created_utc",
    "torch_num_threads",
    *(v.lower() for v in provenance.SLURM_VARS),
}


def _collect():
    return provenance.collect(
        mpi_library_version="Open MPI v5.0.0\nmore\x00",
        hosts=["a", "a", "b"],
        world_size=3,
        seeds={"root": 7, "data": 123},
    )


def test_collect_has_every_key_and_flat_values():
    prov = _collect()
    missing = KEYS - set(prov)
    assert not missing
    assert all(isinstance(v, str | int) for v in prov.values())
    assert prov["hosts"] == "a,a,b" and prov["n_hosts"] == 2 and prov["world_size"] == 3
    assert prov["seed_root"] == 7 and prov["seed_data"] == 123
    assert prov["mpi_library_version"] == "Open MPI v5.0.0\nmore"  # Open MPI's NUL removed
    assert prov["snake_mpi_version"] != ""
    assert prov["created_utc"].endswith("+00:00")


def test_git_commit_is_hex_or_unknown():
    prov = _collect()
    assert prov["git_commit"] == "unknown" or re.fullmatch(r"[0-9a-f]{40}", prov["git_commit"])
    assert prov["git_dirty"] in ("true", "false", "unknown")


def test_git_state_outside_a_checkout_is_unknown(tmp_path):
    assert provenance.git_state(tmp_path) == {"git_commit": "unknown", "git_dirty": "unknown"}


def test_slurm_metadata_from_environment(monkeypatch):
    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "node[01-02]")
    monkeypatch.delenv("SLURM_CLUSTER_NAME", raising=False)
    prov = _collect()
    assert prov["launcher"] == "slurm"
    assert prov["slurm_job_id"] == "4242"
    assert prov["slurm_array_task_id"] == "3"
    assert prov["slurm_job_nodelist"] == "node[01-02]"
    assert prov["slurm_cluster_name"] == ""


def test_detect_launcher():
    assert provenance.detect_launcher({}) == "unknown"
    assert provenance.detect_launcher({"OMPI_COMM_WORLD_SIZE": "2"}) == "mpirun"
    assert provenance.detect_launcher({"PMIX_RANK": "0"}) == "mpirun"
    assert provenance.detect_launcher({"SLURM_JOB_ID": "1"}) == "unknown"
    assert provenance.detect_launcher({"SLURM_JOB_ID": "1", "SLURM_STEP_ID": "0"}) == "slurm"


def test_cpu_ranges_are_compact_and_read_back():
    for cpus, text in (([0, 1, 2, 5], "0-2,5"), ([3], "3"), ([0, 2, 4], "0,2,4"), ([], "")):
        assert provenance.cpu_ranges(cpus) == text
        assert provenance.parse_cpu_ranges(text) == set(cpus)
    assert set(provenance.cpu_affinity()) <= set(range(os.cpu_count() or 1))
