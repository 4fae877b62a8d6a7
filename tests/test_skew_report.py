"""The label-skew report (snake_mpi.analysis.skew): accuracy per variant against alpha, next to
plain FedAvg's, with issue 14's goal judged from the numbers in the files."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import REPO
from snake_mpi.analysis import skew
from snake_mpi.analysis.runs import label
from snake_mpi.config import load_config
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"
SKEW = ['data.partition="dirichlet"', "data.alpha=0.5"]
OLD = ["snake.logit_adjust=0", "snake.kd.weight=0", "snake.prox_mu=0"]  # tiny.toml: ends = owner


def _run(out, n, *sets):
    cfg = load_config(TINY, ["probes.enabled=false", "checkpoint.every=0", *sets])
    ThreadWorld(n).run(lambda comm: execute(cfg, comm, out), deadline_s=120)
    return read_result(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("skew")
    made = {}
    for name, n, sets in [
        ("p2p-s0", 3, [*SKEW, 'snake.ends="all"', "snake.logit_adjust=1", "seed=0"]),
        ("p2p-s1", 3, [*SKEW, 'snake.ends="all"', "snake.logit_adjust=1", "seed=1"]),
        ("old-s0", 3, [*SKEW, *OLD, "seed=0"]),
        ("fedavg-s0", 4, [*SKEW, 'scheme="fedavg"', "seed=0"]),
        ("fedavg-s1", 4, [*SKEW, 'scheme="fedavg"', "seed=1"]),
        ("fedavg-la-s0", 4, [*SKEW, 'scheme="fedavg"', "fedavg.logit_adjust=1", "seed=0"]),
        ("p2p-iid", 3, ['data.partition="iid"', 'snake.ends="all"', "seed=0"]),
    ]:
        made[name] = _run(d / f"{name}.h5", n, *sets)
    return d, made


def test_runs_are_named_by_their_label_skew_options(runs):
    _, made = runs
    assert label(made["p2p-s0"]) == "snake-p2p"
    assert label(made["old-s0"]) == skew.OLD_DEFAULT  # tiny.toml: ends = "owner"
    assert skew.OLD_DEFAULT == "snake-p2p+la0+prox0+ends-owner+kd0"
    assert label(made["fedavg-s0"]) == "fedavg"
    assert label(made["fedavg-la-s0"]) == "fedavg+la1"


def test_table_and_goal_follow_the_files(runs, tmp_path):
    d, made = runs
    (w,) = skew.collect(list(made.values()))
    assert w.columns() == ["0.5", "IID"]
    p2p, fed = w.cell("snake-p2p", "0.5"), w.cell("fedavg", "0.5")
    assert p2p is not None and fed is not None
    want = [float(made[k].evaluation["accuracy"][-1]) for k in ("p2p-s0", "p2p-s1")]
    assert sorted(p2p.final) == sorted(want) and sorted(p2p.seeds) == [0, 1]
    head, rows = skew.accuracy_table(w)
    by = {r[0]: r for r in rows}
    assert [r[0] for r in rows][:3] == ["fedavg", "snake-p2p", skew.OLD_DEFAULT]
    ratio = np.mean(want) / fed.mean()
    assert f"({ratio:.2f}×)" in by["snake-p2p"][head.index("alpha 0.5")]
    assert by["fedavg+la1"][head.index("IID")] == "—"
    goal = skew.goal_lines(w)[0]
    assert f"= {ratio:.3f}" in goal
    assert ("holds" if ratio >= 0.95 else "does not hold") in goal
    md = skew.build([str(d)], tmp_path / "report")
    text = md.read_text()
    assert "| snake-p2p |" in text and "Goal (issue 14)" in text
    assert (tmp_path / "report" / "figures" / "label_skew.png").stat().st_size > 10_000
    assert (tmp_path / "report" / "label-skew.html").exists()


def test_skew_columns_order_most_skewed_first():
    keys = ["IID", "1", "0.1", "shards-2", "0.5"]
    assert sorted(keys, key=skew._key_order) == ["0.1", "0.5", "1", "shards-2", "IID"]
