"""bench/one_message.py under MPI: every way of handing a hop's blocks to MPI (one message per
block, one derived datatype, swapped halves) moves each block's bytes into its own buffer, a
row per size is written, and a spoiled byte ends the job naming the rank."""

from __future__ import annotations

import csv
import sys

import pytest

from conftest import assert_written_ratio, run_mpi

pytestmark = pytest.mark.mpi
SCRIPT = ["-m", "bench.one_message"]


def test_every_mode_moves_the_blocks_and_writes_a_row_per_size(tmp_path):
    out = tmp_path / "one.csv"
    args = [*SCRIPT, "--blocks", "3", "--max-mib", "0.25", "--trials", "1", "--csv", str(out)]
    job = run_mpi(2, [sys.executable, *args], timeout_s=90)
    assert job.returncode == 0, job.output
    rows = list(csv.DictReader(out.open()))
    # 64 KiB and 256 KiB split over 3 blocks: the bytes of 3 equal blocks
    assert [int(r["bytes"]) for r in rows] == [3 * (65536 // 3), 3 * (262144 // 3)]
    for r in rows:
        assert int(r["blocks"]) == 3
        for mode in ("messages", "datatype", "swapped"):
            assert float(r[f"{mode}_GBps"]) > 0, (mode, r)
        assert_written_ratio(r["swapped_vs_messages"], r["swapped_GBps"], r["messages_GBps"])


def test_a_spoiled_byte_ends_the_job_naming_the_rank():
    args = [*SCRIPT, "--max-mib", "0.0625", "--trials", "1", "--wrong-byte"]
    job = run_mpi(2, [sys.executable, *args], timeout_s=90)
    assert job.returncode != 0
    assert "one_message: rank 1: wrong bytes in the messages hop" in job.stderr
