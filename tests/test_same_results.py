"""bench/same_results.py: two runs of one config are the same run; a changed value, a changed
setting or a missing column is named; a new column or setting passes only with --allow-new."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import pytest

from conftest import REPO
from snake_mpi.config import load_config, to_toml
from snake_mpi.run import execute
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"


def same(a, b, *extra):
    job = subprocess.run(
        [sys.executable, "-m", "bench.same_results", str(a), str(b), *extra],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    return job.returncode, job.stdout


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("same")
    cfg = load_config(TINY, ["train.rounds=2"])
    for name in ("a", "b"):
        ThreadWorld(3).run(lambda c, name=name: execute(cfg, c, d / f"{name}.h5"))
    return d / "a.h5", d / "b.h5"


def test_two_runs_of_one_config_are_the_same_run_timing_aside(two_runs):
    a, b = two_runs
    code, out = same(a, b)
    assert code == 0, out
    assert "the same run" in out


def test_a_changed_value_or_setting_is_named_and_fails(two_runs, tmp_path):
    a, b = two_runs
    c = shutil.copy(b, tmp_path / "c.h5")
    with h5py.File(c, "r+") as f:
        f["rounds/bytes_sent"][1, 2] += 1
        cfg = load_config(TINY, ["train.rounds=2", "train.lr=0.5"])
        f.attrs["config_toml"] = to_toml(cfg)
    code, out = same(a, c)
    assert code == 1
    assert "differs: rounds/bytes_sent" in out
    assert "differs: config train.lr: 0.05 != 0.5" in out


def test_a_new_column_passes_only_with_allow_new_and_a_missing_one_never(two_runs, tmp_path):
    a, b = two_runs
    c = shutil.copy(b, tmp_path / "c.h5")
    with h5py.File(c, "r+") as f:
        f["ranks/new_figure_bytes"] = [1, 2, 3]
    code, out = same(a, c)
    assert code == 1 and f"only in {c}: ranks/new_figure_bytes" in out
    assert same(a, c, "--allow-new")[0] == 0
    code, out = same(c, a, "--allow-new")  # the column went missing
    assert code == 1 and f"only in {c}: ranks/new_figure_bytes" in out
