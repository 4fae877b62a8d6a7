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


def test_token_mode_passes_one_message_round_the_ring(ring_bw):
    """--mode token: hop after hop (Snake's pattern); best of --trials; a bad mode is exit 2."""
    argv = [str(ring_bw), "--mode", "token", "--min-bytes", "4096", "--max-bytes", "16384"]
    job = run_mpi(3, [*argv, "--max-total-mib", "4", "--trials", "3"], timeout_s=60)
    assert job.returncode == 0, job.output
    lines = job.stdout.strip().splitlines()
    assert lines[0].startswith("# ring_bw: 3 ranks, mode token")
    rows = [line.split(",") for line in lines[2:]]
    assert [int(r[0]) for r in rows] == [4096, 8192, 16384]
    for nbytes, _iters, latency_us, mbps in rows:  # bandwidth = bytes per hop time
        assert float(mbps) == pytest.approx(int(nbytes) / float(latency_us), rel=0.01)
    bad = run_mpi(2, [str(ring_bw), "--mode", "bogus"], timeout_s=60)
    assert bad.returncode != 0 and "--mode sendrecv or token" in bad.stderr


def test_ctest_knows_every_test_and_runs_the_ring(ring_bw):
    """The CMake build registers the CTest tests the README names; CTest runs the ring one
    here (the pytest ones would run this suite again inside itself)."""
    build = ring_bw.parent
    listed = subprocess.run(
        ["ctest", "--test-dir", str(build), "-N"], capture_output=True, text=True, timeout=60
    )
    assert listed.returncode == 0, listed.stdout + listed.stderr
    for name in ("ring_bw_short", "pytest_unit", "pytest_mpi"):
        assert name in listed.stdout, listed.stdout
    run = subprocess.run(
        ["ctest", "--test-dir", str(build), "-R", "ring_bw_short", "--output-on-failure"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "100% tests passed, 0 tests failed out of 1" in run.stdout, run.stdout
