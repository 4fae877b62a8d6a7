"""bench/transfer.py under MPI, small: its check round trips pass in every end-to-end mode
(hop plans, the general path, packed copies, hop plans with messages from 128 KiB as swapped
halves: the bytes arrive and are counted exactly, else it exits non-zero), and the end-to-end
CSV has a row per size with every mode's figure."""

from __future__ import annotations

import csv
import sys

import pytest

from conftest import assert_written_ratio, run_mpi

pytestmark = pytest.mark.mpi


def test_end_to_end_hops_check_their_bytes_and_write_every_mode(tmp_path):
    out = tmp_path / "e2e.csv"
    args = ["-m", "bench.transfer", "--max-mib", "1", "--trials", "1"]
    args += ["--skip-probes", "--e2e-blocks", "1", "--e2e-csv", str(out)]
    args += ["--pipelined-min-bytes", str(128 << 10)]
    job = run_mpi(2, [sys.executable, *args], timeout_s=120)
    assert job.returncode == 0, job.output
    rows = list(csv.DictReader(out.open()))
    assert [int(r["bytes"]) for r in rows] == [64 << 10, 256 << 10, 1 << 20]
    for r in rows:
        for mode in ("bare_token", "views", "general", "copy", "pipelined"):
            assert float(r[f"{mode}_GBps"]) > 0, (mode, r)
        assert_written_ratio(r["pipelined_vs_views"], r["pipelined_GBps"], r["views_GBps"])
        assert int(r["pipelined_min_bytes"]) == 128 << 10
        assert_written_ratio(r["general_vs_bare"], r["general_GBps"], r["bare_token_GBps"])
        assert float(r["views_pack_us_per_hop"]) == 0  # in place: nothing packed
        assert float(r["copy_pack_us_per_hop"]) > 0
        assert float(r["rss_growth_views_MiB"]) < 1  # no per-hop allocation
