"""A file system that runs out of room while a run writes its result or a checkpoint: one line
naming the file, the bytes it needed and the bytes free; no temporary left behind; the last
good ``.partial`` and checkpoints kept, so that the run resumes once there is room.

Real small file systems (tmpfs, mounted for the test: root only, skipped with the reason
otherwise), not a mocked ``ENOSPC``."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_mpi, snake_mpi
from snake_mpi.checkpoint import tensorfile
from snake_mpi.durable import StorageFull, free_bytes
from snake_mpi.record import ROUND_FIELDS
from snake_mpi.store import ResultWriter, read_result

TINY = REPO / "tests" / "configs" / "tiny.toml"


@contextlib.contextmanager
def small_filesystem(where: Path, size_bytes: int):
    """A tmpfs of ``size_bytes`` mounted at ``where`` (created), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def remount(where: Path, size_bytes: int) -> None:
    """Give the tmpfs at ``where`` more room (what a user does by freeing space)."""
    subprocess.run(["mount", "-o", f"remount,size={size_bytes}", str(where)], check=True)


def test_a_checkpoint_file_with_no_room_is_refused_before_any_byte(tmp_path):
    with small_filesystem(tmp_path / "fs", 64 * 1024) as fs:
        old = fs / "rank-00000.safetensors"
        tensorfile.write(old, {"x": np.arange(8)})
        before = old.read_bytes()
        big = {"w": np.zeros(100_000, dtype=np.float32)}  # 400 KB, more than the disk
        with pytest.raises(StorageFull) as e:
            tensorfile.write(old, big)
        text = str(e.value)
        assert text.startswith(f"no space left for {old} (a checkpoint file): it needs ")
        assert f"({400_000 + 8 + 64:,} bytes)" in text or "390.7 KiB" in text
        assert f"({free_bytes(fs):,} bytes) is free" in text
        assert sorted(p.name for p in fs.iterdir()) == [old.name]  # no .tmp left
        assert old.read_bytes() == before  # the checkpoint before it is kept


def test_a_result_that_runs_out_of_room_keeps_its_last_complete_round(tmp_path):
    with small_filesystem(tmp_path / "fs", 1024 * 1024) as fs:
        writer = ResultWriter(
            fs / "r.h5",
            world_size=2,
            round_fields=ROUND_FIELDS,
            eval_fields={"round": "int64"},
            attrs={},
            config_toml="",
        )
        row = {name: np.zeros(2) for name in ROUND_FIELDS}
        writer.append_round(row, {"round": 0})
        filler = fs / "filler"
        filler.write_bytes(b"\0" * max(0, free_bytes(fs) - 8192))  # another job fills the disk
        appended = 1
        with pytest.raises(StorageFull, match=r"keeps its \d+ complete round\(s\)") as e:
            for _ in range(2000):  # until a round needs a chunk the disk has no room for
                writer.append_round(row, {"round": appended})
                appended += 1
        assert f"no space left for {fs / 'r.h5.partial'} (round {appended + 1}'s rows)" in str(
            e.value
        )
        writer.close_incomplete()
        res = read_result(fs / "r.h5.partial", allow_incomplete=True)
        assert res.n_rounds == appended and res.status == "running"
        assert not list(fs.glob("*.tmp")) and not (fs / "r.h5").exists()


@pytest.mark.mpi
def test_a_run_whose_disk_fills_says_so_in_one_line_and_resumes_once_there_is_room(tmp_path):
    """Two ranks, a checkpoint after every round, on a disk with room for the result file and
    less than one checkpoint: every rank stops with one line (no traceback), nothing half
    written stays; with room again, ``--resume`` completes the run."""
    probe = tmp_path / "probe.h5"  # how large a result with one round is
    w = ResultWriter(probe, world_size=2, round_fields=ROUND_FIELDS, eval_fields={"round": "int64"},
                     attrs={}, config_toml="")  # fmt: skip
    w.append_round({name: np.zeros(2) for name in ROUND_FIELDS}, {"round": 0})
    w.close_incomplete()
    size = probe.with_name("probe.h5.partial").stat().st_size + 48 * 1024
    with small_filesystem(tmp_path / "fs", size) as fs:
        out = fs / "r.h5"
        argv = snake_mpi("run", str(TINY), "--set", "checkpoint.every=1", "--out", str(out))
        job = run_mpi(2, argv, timeout_s=120)
        assert job.returncode != 0, job.output
        lines = [line for line in job.stderr.splitlines() if "no space left for" in line]
        assert lines, job.output
        assert "is free on its file system" in lines[0] and "it needs " in lines[0]
        assert "Traceback" not in job.output and "unhandled" not in job.output, job.output
        assert not list(fs.rglob("*.tmp")) and not out.exists()
        assert (fs / "r.h5.partial").exists()
        remount(fs, 8 * 2**20)
        again = run_mpi(2, [*argv, "--resume"], timeout_s=120)
        assert again.returncode == 0, again.output
        assert read_result(out).n_rounds == 3
