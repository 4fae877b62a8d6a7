"""bench/c/ring_bw.c builds with CMake against the venv's MPI and measures a ring."""

from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO, run_mpi

pytestmark = pytest.mark.mpi


@pytest.fixture(scope="module")
def ring_bw(tmp_path_factory):
    if shutil.which("cmake") is None:
        pytest.skip("cmake is not installed")
    build = tmp_path_factory.mktemp("build")
    for cmd in (
        ["cmake", "-S", str(REPO), "-B", str(build)],
        ["cmake", "--build", str(build)],
    ):
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
    return build / "ring_bw"


def test_ring_bw_prints_one_csv_row_per_size(ring_bw):
    job = run_mpi(
        3,
        [str(ring_bw), "--min-bytes", "1024", "--max-bytes", "65536", "--max-total-mib", "8"],
        timeout_s=60,
    )
    assert job.returncode == 0, job.output
    lines = job.stdout.strip().splitlines()
    assert lines[0].startswith("# ring_bw: 3 ranks") and lines[1] == (
        "bytes,iterations,latency_us,bandwidth_MBps"
    )
    rows = [line.split(",") for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [1024 << k for k in range(7)]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_ring_bw_rejects_a_single_rank(ring_bw):
    job = run_mpi(1, [str(ring_bw)], timeout_s=60)
    assert job.returncode != 0 and "needs >= 2 ranks" in job.stderr
