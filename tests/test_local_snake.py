"""Snake P2P without mpirun: ranks as threads of one process (``localcomm``), and the same run
as a real MPI job compared with it bit for bit."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO, mpi_run
from snake_mpi.analysis import analytic
from snake_mpi.blocks import block_nbytes, model_hash
from snake_mpi.config import load_config
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"


def run_threads(n, tmp_path, *sets):
    cfg = load_config(TINY, ["probes.enabled=false", *sets])
    out = tmp_path / "threads.h5"
    ctxs = ThreadWorld(n).run(lambda comm: execute(cfg, comm, out), deadline_s=60)
    return cfg, ctxs, out


@pytest.mark.parametrize("transfer", ["delta", "full"])
def test_threaded_run_counts_analytic_bytes_and_syncs_models(tmp_path, transfer):
    cfg, ctxs, out = run_threads(3, tmp_path, f"snake.transfer={transfer}")
    model = ctxs[0].model
    plan = ctxs[0].report.plan
    sizes = [block_nbytes(model, b) for b in range(model.n_blocks)]
    res = read_result(out)
    np.testing.assert_array_equal(
        res.rounds["bytes_sent"],
        analytic.snake_p2p_bytes_sent(plan, sizes, cfg.train.rounds, transfer),
    )
    assert len({model_hash(c.model) for c in ctxs}) == 1
    assert res.evaluation["accuracy"].shape == (cfg.train.rounds,)


def test_exception_in_a_thread_rank_is_raised_not_hung(tmp_path):
    with pytest.raises(RuntimeError, match="injected fault"):
        run_threads(3, tmp_path, "debug.fail_rank=1", "debug.fail_round=1", "comm.deadline_s=5")


MPI_RUN = mpi_run(4, TINY, "probes.enabled=false")


@pytest.mark.mpi
def test_threads_and_mpi_give_bit_identical_models_and_counts(tmp_path, mpi_runs):
    _cfg, ctxs, out_threads = run_threads(4, tmp_path)
    a, b = read_result(out_threads), mpi_runs(MPI_RUN).result
    assert list(b.tables["ranks"]["model_sha256"]) == [model_hash(c.model) for c in ctxs]
    for field in ("bytes_sent", "bytes_received", "messages_sent", "loss", "samples", "steps"):
        np.testing.assert_array_equal(a.rounds[field], b.rounds[field], err_msg=field)
    np.testing.assert_array_equal(a.evaluation["accuracy"], b.evaluation["accuracy"])
