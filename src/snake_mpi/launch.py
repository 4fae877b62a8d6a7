"""Starting N ranks of a command: ``srun`` inside a Slurm allocation where srun can start this
MPI (PMIx or PMI-2), else ``mpirun`` (the venv's or the system's; Open MPI's mpirun reads the
Slurm allocation itself).

``SNAKE_MPI_LAUNCHER`` = ``srun``, ``mpirun`` or ``auto`` (default). ``auto`` probes once per
job: a 2-rank ``srun --mpi=$SNAKE_MPI_SRUN_MPI`` (default ``pmix``) of mpi4py must report a
world of 2; a site whose srun cannot load PMIx (or whose MPI was built without it, such as
PyPI's Open MPI against a Slurm without libpmix) falls back to mpirun. The answer is kept in
``$TMPDIR/snake-mpi-launcher-<job id>`` so the cells of a suite probe only once.

``snake-mpi launch -n N -- COMMAND ...`` replaces itself with the chosen launcher.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = "from mpi4py import MPI; print('world', MPI.COMM_WORLD.Get_size())"


def _mpirun(n: int) -> list[str]:
    venv = Path(sys.executable).parent / "mpirun"
    mpirun = str(venv) if venv.exists() else (shutil.which("mpirun") or "mpirun")
    try:
        version = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=60)
        text = version.stdout + version.stderr
    except (OSError, subprocess.TimeoutExpired):
        text = ""
    over = ["--oversubscribe"] if "Open MPI" in text else []
    return [mpirun, "-n", str(n), *over]


def _srun(n: int) -> list[str]:
    return ["srun", f"--mpi={os.environ.get('SNAKE_MPI_SRUN_MPI', 'pmix')}", "-n", str(n)]


def srun_starts_mpi() -> bool:
    """Whether srun starts a 2-rank MPI world of this Python's mpi4py (cached per job)."""
    job = os.environ.get("SLURM_JOB_ID", "")
    cache = Path(tempfile.gettempdir()) / f"snake-mpi-launcher-{job}"
    if job and cache.exists():
        return cache.read_text().strip() == "srun"
    n = 2 if int(os.environ.get("SLURM_NTASKS", "2") or 2) >= 2 else 1
    try:
        probe = subprocess.run(
            [*_srun(n), sys.executable, "-c", PROBE],
            capture_output=True,
            text=True,
            timeout=120,
        )
        ok = probe.returncode == 0 and probe.stdout.split().count(str(n)) == n
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    if job:
        with contextlib.suppress(OSError):
            cache.write_text("srun" if ok else "mpirun")
    return ok


def launcher(n: int, argv: list[str]) -> list[str]:
    """The command line that runs ``argv`` on ``n`` ranks here."""
    choice = os.environ.get("SNAKE_MPI_LAUNCHER", "auto")
    if choice not in ("auto", "srun", "mpirun"):
        raise ValueError(f"SNAKE_MPI_LAUNCHER must be auto, srun or mpirun, got {choice!r}")
    in_slurm = bool(os.environ.get("SLURM_JOB_ID")) and shutil.which("srun") is not None
    if choice == "srun" or (choice == "auto" and in_slurm and srun_starts_mpi()):
        return [*_srun(n), *argv]
    return [*_mpirun(n), *argv]


def main(argv: list[str]) -> int:
    """``snake-mpi launch -n N -- COMMAND ...``: exec the command under the chosen launcher."""
    import argparse

    p = argparse.ArgumentParser(
        prog="snake-mpi launch",
        description="Run COMMAND on N ranks with srun (inside Slurm, where it can start this "
        "MPI) or mpirun; SNAKE_MPI_LAUNCHER=srun|mpirun|auto.",
    )
    p.add_argument("-n", type=int, required=True, help="ranks")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- COMMAND [ARGS ...]")
    args = p.parse_args(argv)
    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd or args.n < 1:
        p.error("give -n N (>= 1) and a command after --")
    try:
        full = launcher(args.n, cmd)
    except ValueError as e:
        print(f"snake-mpi launch: {e}", file=sys.stderr)
        return 2
    print(f"snake-mpi launch: {' '.join(full)}", file=sys.stderr, flush=True)
    os.execvp(full[0], full)
    return 127  # pragma: no cover - execvp does not return
