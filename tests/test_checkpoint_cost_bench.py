"""bench/checkpoint_cost.py's figures on synthetic results: the analytic bytes a Snake P2P
checkpoint file must hold, and the tables (no MPI)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from bench import checkpoint_cost as ck
from snake_mpi.config import RunConfig, to_toml
from snake_mpi.store import ResultWriter, read_result


def test_analytic_bytes_follows_the_snake_p2p_rule():
    # the demo: ends = "owner" (stem with node 0, head with node 3), 4 nodes
    nbytes = np.array([1, 10, 100, 1000, 10000, 100000])
    owners = np.array([0, 0, 1, 2, 3, 3])
    after_1 = [ck.analytic_bytes(nbytes, owners, rank, 1) for rank in range(4)]
    assert after_1 == [111111, 111, 1111, 111111]  # node 0 has received the last hop
    assert {ck.analytic_bytes(nbytes, owners, rank, 2) for rank in range(4)} == {111111}
    # ends = "frozen": stem and head never trained, never written
    frozen = np.array([-2, 0, 1, 2, 3, -2])
    assert ck.analytic_bytes(nbytes, frozen, 1, 1) == 110
    assert ck.analytic_bytes(nbytes, frozen, 0, 1) == ck.analytic_bytes(nbytes, frozen, 2, 5)
    assert ck.analytic_bytes(nbytes, frozen, 0, 3) == 11110
    # ends = "all": every node trains stem and head (owner -1)
    shared = np.array([-1, 0, 1, 2, 3, -1])
    assert ck.analytic_bytes(nbytes, shared, 1, 1) == 100111


def _result(path: Path, on: bool):
    cfg = RunConfig()
    fields = {"round_s": "float64", "checkpoint_s": "float64", "checkpoint_bytes": "int64"}
    w = ResultWriter(
        path,
        world_size=2,
        round_fields=fields,
        eval_fields={},
        attrs={"scheme": "snake"},
        config_toml=to_toml(cfg),
    )
    files = {1: [5100, 5010], 2: [5110, 5110]} if on else {}
    for k in range(3):
        row = {"round_s": np.array([2.0, 1.0 + on]), "checkpoint_s": np.array([0.5, 0.25]) * on}
        w.append_round(row | {"checkpoint_bytes": np.array(files.get(k, [0, 0]))})
    w.write_table("blocks", {"bytes": np.array([100, 10, 1000]), "owner": np.array([0, 1, 1])})
    w.complete()
    return read_result(path)


def test_tables_of_synthetic_runs(tmp_path):
    load = ck.Workload("demo", Path("demo.toml"), 2, (), 1, 1)
    runs = [ck.Run(load, on, 0, tmp_path / f"{on}.h5") for on in (True, False)]
    for run in runs:
        run.result, run.status = _result(run.path, run.on), "done"
    rows = ck.file_rows(runs[0])
    assert [(f.after_round, f.rank, f.measured, f.analytic) for f in rows] == [
        (1, 0, 5100, 1110),
        (1, 1, 5010, 1110),
        (2, 0, 5110, 1110),
        (2, 1, 5110, 1110),
    ]
    text = ck.bytes_table(runs)
    assert "| demo | 1 | 0 | 5,100 | 1,110 | 3,990 | 78.235 % | 0.500 |" in text
    cost = ck.cost_table(runs)
    assert "| demo | every 1: 2 | 1 | 6.00 | 6.00 | 1.500 | 25.00 % | - |" in cost
    assert "| demo | off | 1 | 6.00 | 6.00 | 0.000 | 0.00 % | +0.00 s (+0.0 %) |" in cost
    assert "| demo on #0 | 1 |" in ck.runs_table(runs)
