"""Every scheme under MPI on 3 and 4 ranks (centralised on 1), runs of the session's shared MPI
job (``conftest.mpi_run``): measured bytes equal the analytic count exactly, accuracy clears a
bound, and the result file is complete. A second rank count for centralised is refused by a
real ``snake-mpi run`` launch."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, mpi_run, run_mpi, snake_mpi
from snake_mpi.analysis.expected import expected_bytes

pytestmark = pytest.mark.mpi
SMALL = REPO / "tests" / "configs" / "small.toml"
ROUNDS = 4  # small.toml's rounds
BOUND = 0.6  # 4 classes: chance is 0.25; every scheme reaches about 0.8 in 4 rounds

SCHEMES = {
    "snake-p2p": ['scheme="snake"', 'snake.mode="p2p"'],
    "snake-cs": ['scheme="snake"', 'snake.mode="cs"'],
    "fedavg": ['scheme="fedavg"'],
    "split": ['scheme="split"'],
    "splitfed": ['scheme="splitfed"'],
}


RUNS = {(scheme, n): mpi_run(n, SMALL, *sets) for scheme, sets in SCHEMES.items() for n in (3, 4)}
CENTRALISED = mpi_run(1, SMALL, 'scheme="centralised"')


def check(res, n):
    assert res.attrs["status"] == "complete" and res.world_size == n
    assert res.n_rounds == ROUNDS
    sent, received = expected_bytes(res)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
    np.testing.assert_array_equal(res.rounds["bytes_received"], received)
    acc = res.evaluation["accuracy"]
    assert len(acc) == ROUNDS and acc[-1] >= BOUND, acc


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_scheme_counts_exact_bytes_learns_and_completes(mpi_runs, scheme, n):
    res = mpi_runs(RUNS[scheme, n]).result
    check(res, n)
    if scheme != "snake-p2p":  # client-server: rank 0 holds no data
        assert res.tables["ranks"]["data_samples"][0] == 0


def test_centralised_runs_on_one_rank(mpi_runs):
    check(mpi_runs(CENTRALISED).result, 1)


def test_centralised_refuses_several_ranks(tmp_path):
    out = tmp_path / "r.h5"
    job = run_mpi(
        2,
        snake_mpi("run", str(SMALL), "--out", str(out), "--set", 'scheme="centralised"'),
        timeout_s=60,
    )
    assert job.returncode == 2 and "trains on one rank" in job.stderr, job.output
    assert not out.exists()
