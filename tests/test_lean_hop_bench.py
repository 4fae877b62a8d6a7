"""bench/lean_hop.py under MPI: the least-Python checked hop runs, proves its bytes, writes a
row per size, and refuses a header that names the wrong round (exit 1 naming the rank)."""

from __future__ import annotations

import sys

import pytest

from conftest import assert_written_ratio, run_mpi

pytestmark = pytest.mark.mpi
SCRIPT = ["-m", "bench.lean_hop"]


def test_the_lean_hop_moves_the_bytes_and_writes_a_row_per_size(tmp_path):
    csv = tmp_path / "lean.csv"
    job = run_mpi(
        2, [sys.executable, *SCRIPT, "--max-mib", "0.25", "--trials", "1", "--csv", str(csv)]
    )
    assert job.returncode == 0, job.stderr
    lines = csv.read_text().splitlines()
    assert lines[0] == "bytes,bare_GBps,lean_GBps,lean_vs_bare"
    rows = [line.split(",") for line in lines[1:]]
    assert [int(r[0]) for r in rows] == [64 << 10, 256 << 10]
    for _, bare, lean, ratio in rows:
        assert float(bare) > 0 and float(lean) > 0
        assert_written_ratio(ratio, lean, bare)


def test_a_header_of_the_wrong_round_ends_the_job_naming_the_rank():
    args = [sys.executable, *SCRIPT, "--max-mib", "0.0625", "--trials", "1", "--wrong-round"]
    job = run_mpi(2, args)
    assert job.returncode != 0
    assert "lean_hop: rank 1: expected round 0 hop 0" in job.stderr
