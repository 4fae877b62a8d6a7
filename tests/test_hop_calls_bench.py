"""bench/hop_calls.py: the per-call cost of a hop's Python (plans, general path, the lean
floor) runs in one process, checks every hop arrived and was counted, and writes its rows."""

from __future__ import annotations

import csv
import subprocess
import sys

from conftest import mpi_env


def test_hop_calls_times_every_mode_and_writes_a_row_each(tmp_path):
    out = tmp_path / "calls.csv"
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.hop_calls",
            "--hops",
            "300",
            "--kib",
            "16",
            "--csv",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=mpi_env(),
        timeout=120,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    rows = list(csv.DictReader(out.open()))
    assert [r["mode"] for r in rows] == ["plans", "general", "lean"]
    for r in rows:
        parts = [float(r[k]) for k in ("post_us", "send_us", "receive_us")]
        assert all(p > 0 for p in parts), r
        assert abs(float(r["total_us"]) - sum(parts)) < 0.01  # rounded to 3 decimals each
    assert "one 16 KiB block, 300 hops" in job.stdout
