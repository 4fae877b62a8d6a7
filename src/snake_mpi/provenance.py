"""Run provenance: versions, MPI library, hosts, launcher and Slurm ids, git commit, seeds.

Called on rank 0 only; returns a flat dict of str/int that ``store.ResultWriter`` writes as
attributes of ``/provenance``. mpi4py's version is read from package metadata, never by
importing it (only ``comm.py`` imports mpi4py).
"""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
from collections.abc import Mapping
from importlib import metadata
from pathlib import Path

GIT_TIMEOUT_S = 5.0

_DISTRIBUTIONS = {
    "torch_version": "torch",
    "mpi4py_version": "mpi4py",
    "numpy_version": "numpy",
    "h5py_version": "h5py",
    "psutil_version": "psutil",
    "snake_mpi_version": "snake-mpi",
}

SLURM_VARS = (
    "SLURM_JOB_ID",
    "SLURM_ARRAY_JOB_ID",
    "SLURM_ARRAY_TASK_ID",
    "SLURM_JOB_NODELIST",
    "SLURM_NTASKS",
    "SLURM_CPUS_PER_TASK",
    "SLURM_CLUSTER_NAME",
    "SLURM_RESTART_COUNT",
)
"""Recorded as ``slurm_job_id`` etc. ("" when absent)."""


def collect(
    *, mpi_library_version: str, hosts: list[str], world_size: int, seeds: dict[str, int]
) -> dict[str, str | int]:
    """Everything needed to say what ran where: a flat dict of str/int (see results-schema.md).

    ``hosts`` has one entry per rank in rank order; ``seeds`` become ``seed_<name>`` keys.
    """
    import torch

    from snake_mpi.store import hdf5_version

    prov: dict[str, str | int] = {
        "python_version": platform.python_version(),
        **{key: dist_version(dist) for key, dist in _DISTRIBUTIONS.items()},
        "hdf5_version": hdf5_version(),
        "platform": platform.platform(),
        "python_executable": sys.executable,
        "mpi_library_version": mpi_library_version.replace("\x00", "").strip(),
        "world_size": int(world_size),
        "hosts": ",".join(hosts),
        "n_hosts": len(set(hosts)),
        "launcher": detect_launcher(),
        **slurm_metadata(),
        **git_state(Path(__file__).resolve().parent),
        **{f"seed_{name}": int(value) for name, value in seeds.items()},
        "created_utc": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "torch_num_threads": int(torch.get_num_threads()),
    }
    return prov


def cpu_affinity() -> list[int]:
    """The CPUs this process may run on (its affinity mask: what the launcher or Slurm bound
    it to), else every CPU of the host."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return list(range(os.cpu_count() or 1))


def cpu_ranges(cpus: list[int]) -> str:
    """CPU ids as compact ranges, e.g. ``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    for c in sorted(set(cpus)):
        if out and "-" in out[-1] and int(out[-1].split("-")[1]) == c - 1:
            out[-1] = f"{out[-1].split('-')[0]}-{c}"
        elif out and "-" not in out[-1] and int(out[-1]) == c - 1:
            out[-1] = f"{out[-1]}-{c}"
        else:
            out.append(str(c))
    return ",".join(out)


def parse_cpu_ranges(text: str) -> set[int]:
    """The inverse of ``cpu_ranges``: ``"0-2,5"`` -> ``{0, 1, 2, 5}``."""
    cpus: set[int] = set()
    for part in filter(None, text.split(",")):
        lo, _, hi = part.partition("-")
        cpus.update(range(int(lo), int(hi or lo) + 1))
    return cpus


def dist_version(dist: str) -> str:
    """Installed version of a distribution from its metadata (no import), or "unknown"."""
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return "unknown"


def detect_launcher(environ: Mapping[str, str] | None = None) -> str:
    """ "slurm" (srun), "mpirun" (Open MPI / Hydra / PMIx launchers) or "unknown"."""
    env = os.environ if environ is None else environ
    if "SLURM_JOB_ID" in env and ("SLURM_STEP_ID" in env or "SLURM_PROCID" in env):
        return "slurm"
    if any(v in env for v in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")):
        return "mpirun"
    return "unknown"


def slurm_metadata(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The Slurm variables of ``SLURM_VARS`` as ``slurm_job_id`` etc.; "" when absent."""
    env = os.environ if environ is None else environ
    return {var.lower(): env.get(var, "") for var in SLURM_VARS}


def git_state(directory: Path) -> dict[str, str]:
    """``git_commit`` (40 hex) and ``git_dirty`` ("true"/"false") of the tree ``directory`` was
    loaded from; "unknown" when it is not a tracked part of a git checkout or git fails.

    The tracked-file check stops an installed copy inside some other repository (say a
    ``.venv`` in a checkout) from reporting that repository's commit.
    """
    unknown = {"git_commit": "unknown", "git_dirty": "unknown"}
    tracked = _git(directory, "ls-files", "--error-unmatch", "__init__.py")
    commit = _git(directory, "rev-parse", "HEAD")
    if tracked is None or commit is None or len(commit) != 40:
        return unknown
    status = _git(directory, "status", "--porcelain", "--untracked-files=no")
    dirty = "unknown" if status is None else ("true" if status else "false")
    return {"git_commit": commit, "git_dirty": dirty}


def _git(directory: Path, *args: str) -> str | None:
    """Stripped stdout of ``git -C directory args``, or None on any failure."""
    try:
        done = subprocess.run(
            ["git", "-C", str(directory), *args],
            capture_output=True,
            text=True,
            timeout=GIT_TIMEOUT_S,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None
