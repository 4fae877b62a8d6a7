"""Many runs in one MPI job (``mpirun -n N python runs.py RUNS.json``), as mpi4py runs its own
test suite: MPI's start-up and every rank's torch import are paid once, not once per run.

``RUNS.json`` lists runs, each ``{"name", "ranks", "config", "sets", "out"}``. They run one
after another, each on a communicator of the first ``ranks`` ranks (split off the world; the
others wait at a barrier), as ``snake-mpi run`` runs after its start-up checks: its
device placed and checkpoints prepared (``run.place_before_mpi``, ``run.transfer_route``,
``run.prepare_checkpoints``), then ``run.execute`` over the MPI communicator. Rank 0 writes
``out``, its printed lines to ``out.stdout``, and ``out.done`` once the run returned. An
exception on any rank ends the whole job naming the rank (``comm.install_abort_on_error``).
"""

import contextlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from snake_mpi.config import load_config
from snake_mpi.run import execute, place_before_mpi, prepare_checkpoints, transfer_route
from snake_mpi.schemes.rules import validate_for_world
from snake_mpi.transport.mpi import world as mpi
from snake_mpi.transport.mpi.comm import Comm


def idle(world: MPI.Comm) -> None:
    """Wait for every rank without spinning (a blocking barrier busy-polls a core away from
    the ranks still running)."""
    req = world.Ibarrier()
    while not req.Test():
        time.sleep(0.002)


def main(spec: Path) -> None:
    runs = json.loads(spec.read_text())
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    mpi.install_abort_on_error()
    for run in runs:
        n = int(run["ranks"])
        sub = world.Split(0 if rank < n else MPI.UNDEFINED, rank)
        if sub != MPI.COMM_NULL:
            if rank == 0:
                print(f"runs.py: {run['name']} on {n} rank(s)", file=sys.stderr, flush=True)
            cfg = load_config(run["config"], run["sets"])
            validate_for_world(cfg, n)
            out = Path(run["out"])
            comm = Comm(sub.Dup(), deadline_s=cfg.comm.deadline_s)
            beside = Comm(sub.Dup(), deadline_s=60)  # run.main agrees outside the run's

            def agree(code: int, beside: Comm = beside) -> list[int]:
                return [int(c) for c in beside.allgather_row(np.array([float(code)]))[:, 0]]

            placement = place_before_mpi(cfg)  # the launcher's local rank, as run.main
            route = transfer_route(cfg, placement, mpi.cuda_support)
            printed = Path(f"{out}.stdout") if rank == 0 else Path(os.devnull)
            with printed.open("w") as f, contextlib.redirect_stdout(f):
                checkpoints = prepare_checkpoints(cfg, out, n, comm.rank, agree, resume=False)
                execute(cfg, comm, out, placement=placement, route=route, checkpoints=checkpoints)
            if rank == 0:
                Path(f"{out}.done").write_text("")
            sub.Free()
        idle(world)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
