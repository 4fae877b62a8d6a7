"""The example analysis scripts of analysis/ on real results (the shared MPI job's runs of the
tiny config, on 2 and 4 ranks): each runs as a user would run it, on a folder that also holds a
file that is not a finished result, and its figures are those of the files."""

from __future__ import annotations

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, mpi_run
from snake_mpi.store import read_result

pytestmark = pytest.mark.mpi
TINY = REPO / "tests" / "configs" / "tiny.toml"
RUNS = {
    "two.h5": mpi_run(2, TINY, "train.rounds=2"),
    "four.h5": mpi_run(4, TINY, "probes.enabled=false"),
}


@pytest.fixture(scope="module")
def results(mpi_runs, tmp_path_factory) -> Path:
    """A folder with the two runs and a file that is no result (a run cut short)."""
    folder = tmp_path_factory.mktemp("results")
    for name, run in RUNS.items():
        shutil.copyfile(mpi_runs(run).path, folder / name)
    (folder / "cut.h5").write_bytes(b"not an HDF5 file")
    return folder


def script(name: str, *args: str | Path) -> subprocess.CompletedProcess[str]:
    job = subprocess.run(
        [sys.executable, str(REPO / "analysis" / name), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    return job


def test_bytes_and_accuracy_has_a_row_per_run_with_its_figures(results, tmp_path):
    out = tmp_path / "runs.csv"
    job = script("bytes_and_accuracy.py", results, "--out", out)
    assert f"skipped {results / 'cut.h5'}" in job.stderr
    rows = {Path(r["file"]).name: r for r in csv.DictReader(out.open())}
    assert sorted(rows) == ["four.h5", "two.h5"]
    for name, row in rows.items():
        res = read_result(results / name)
        per_round = res.rounds["bytes_sent"].sum(axis=1)
        sync = int(res.arrays["final_sync/bytes_sent"].sum())
        assert (row["scheme"], row["mode"]) == ("snake", "p2p")
        assert int(row["ranks"]) == res.world_size and int(row["rounds"]) == res.n_rounds
        assert float(row["bytes_per_round"]) == pytest.approx(per_round.mean(), abs=0.05)
        assert int(row["total_bytes"]) == int(per_round.sum()) + sync > 0
        assert int(row["final_sync_bytes"]) == sync
        assert float(row["final_accuracy"]) == round(float(res.evaluation["accuracy"][-1]), 4)
    assert (int(rows["two.h5"]["ranks"]), int(rows["two.h5"]["rounds"])) == (2, 2)
    printed = script("bytes_and_accuracy.py", results / "two.h5").stdout.splitlines()
    assert printed[0].startswith("file,scheme,mode,ranks") and len(printed) == 2


def test_metric_by_round_reduces_a_round_figure_over_ranks(results, tmp_path):
    out = tmp_path / "bytes.csv"
    job = script("metric_by_round.py", results, "--metric", "bytes_sent", "--reduce", "sum")
    assert f"skipped {results / 'cut.h5'}" in job.stderr
    script("metric_by_round.py", results, "--metric", "bytes_sent", "--reduce", "sum", "--out", out)
    assert out.read_text() == job.stdout
    table = list(csv.reader(out.open()))
    runs = table[0][1:]
    assert table[0][0] == "round" and sorted(Path(r).name for r in runs) == ["four.h5", "two.h5"]
    for j, run in enumerate(runs, start=1):
        want = read_result(run).rounds["bytes_sent"].sum(axis=1)
        got = [float(row[j]) for row in table[1:] if row[j]]
        assert got == want.tolist()
    # the two-round run has no third round: its cell is empty
    assert len(table) == 1 + max(read_result(r).n_rounds for r in runs)


def test_metric_by_round_means_over_ranks_by_default(results):
    job = script("metric_by_round.py", results / "four.h5", "--metric", "round_s")
    lines = job.stdout.splitlines()
    got = [float(line.split(",")[1]) for line in lines[1:]]
    assert got == pytest.approx(np.mean(read_result(results / "four.h5").rounds["round_s"], 1))
