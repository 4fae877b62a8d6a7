"""The memory and GPU benchmarks' tooling, on the CPU: ``snake-mpi memory --measured`` with and
without GPU fields, bench/memory_claim.py's summary table, bench/gpu_demo_check.py's checks,
bench/train_step.py, and bench/gpu_check.sh on a machine without a GPU."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest

from bench import gpu_demo_check as check
from bench import memory_claim as mem
from conftest import REPO, mpi_run
from snake_mpi.analysis.memory_accounting import GIB, measured_table

TINY = REPO / "tests" / "configs" / "tiny.toml"
CPU_HEADER = (
    "run                          scheme       rank baseline MiB  peak MiB increase MiB "
    "train state MiB"
)
"""The measured table's header for CPU runs, as it was before the GPU columns."""


CPU_RUN = mpi_run(2, TINY, "train.rounds=2")


@pytest.fixture(scope="module")
def cpu_result(mpi_runs, tmp_path_factory) -> Path:
    """A 2-rank Snake run of the tiny config (two rounds; the shared MPI job's), as
    ``cpu.h5`` in a folder of its own."""
    out = tmp_path_factory.mktemp("cpu") / "cpu.h5"
    shutil.copyfile(mpi_runs(CPU_RUN).path, out)
    return out


ALLOC = np.array([[5.0, 1.0], [2.0, 3.0]]) * GIB
RESERVED = np.array([[6.0, 4.0], [5.5, 3.5]]) * GIB
USED = np.full((2, 2), 8.0 * GIB)
PROCESS = np.array([[2.5, np.nan], [1.0, np.nan]]) * GIB
ENERGY = np.array([[10.0, 11.0], [12.0, np.nan]])
POWER = np.array([[100.0, 110.0], [120.0, 130.0]])


def _set(group: h5py.Group, name: str, data: np.ndarray) -> None:
    if name in group:
        del group[name]
    group.create_dataset(name, data=data)


def as_gpu_run(src: Path, dst: Path, *, uuid: str = "GPU-aaaa") -> Path:
    """A copy of a CPU result whose GPU fields and attributes say it ran on one shared GPU."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        f.attrs["device"] = "cuda"
        for name, data in (
            ("gpu_max_allocated_bytes", ALLOC),
            ("gpu_max_reserved_bytes", RESERVED),
            ("gpu_nvml_used_bytes", USED),
            ("gpu_nvml_process_bytes", PROCESS),
            ("gpu_energy_j", ENERGY),
            ("gpu_power_w", POWER),
        ):
            _set(f["rounds"], name, data)
        ranks = f["ranks"]
        text = h5py.string_dtype("utf-8")
        _set(ranks, "device", np.array(["cuda:0", "cuda:0"], dtype=text))
        _set(ranks, "gpu_name", np.array(["Fake GPU", "Fake GPU"], dtype=text))
        _set(ranks, "gpu_uuid", np.array([uuid, uuid], dtype=text))
        _set(ranks, "gpu_shared", np.array([1, 1], dtype=np.int64))
    return dst


def as_old_file(src: Path, dst: Path) -> Path:
    """A copy without anything the GPU work added (a file from before it)."""
    shutil.copy(src, dst)
    with h5py.File(dst, "r+") as f:
        for key in list(f.attrs):
            if key in ("device", "gpu_transfer"):
                del f.attrs[key]
        for name in list(f["rounds"]):
            if name.startswith(("gpu_", "host_cpu_energy")):
                del f["rounds"][name]
    return dst


def rank_rows(table: str, name: str) -> list[list[str]]:
    return [line.split() for line in table.splitlines() if line.startswith(name)]


@pytest.mark.mpi
def test_measured_table_of_cpu_runs_keeps_its_columns(cpu_result, tmp_path):
    old = as_old_file(cpu_result, tmp_path / "old.h5")
    for path in (cpu_result, old):
        table = measured_table([str(path)])
        lines = table.splitlines()
        assert lines[0] == CPU_HEADER
        assert lines[1] == "-" * len(CPU_HEADER)
        assert "torch" not in table and "NVML" not in table and "GPU" not in table
        rows = rank_rows(table, path.name)
        assert [r[2] for r in rows] == ["0", "1"] and all(len(r) == 7 for r in rows)
    new, before = measured_table([str(cpu_result)]), measured_table([str(old)])
    assert new.replace("cpu.h5", "old.h5") == before


@pytest.mark.mpi
def test_measured_table_shows_gpu_columns_max_over_rounds(cpu_result, tmp_path):
    gpu = as_gpu_run(cpu_result, tmp_path / "gpu.h5")
    table = measured_table([str(gpu)])
    head = table.splitlines()[0]
    for label in ("torch alloc GiB", "torch reserved GiB", "NVML used GiB", "NVML process GiB"):
        assert label in head
    rows = rank_rows(table, "gpu.h5")
    assert rows[0][-4:] == ["5.00", "6.00", "8.00", "2.50"]
    assert rows[1][-4:] == ["3.00", "4.00", "8.00", "n/a"]  # rank 1's process figure: NaN
    assert (
        "torch alloc 5.00, torch reserved 6.00, NVML used 8.00, NVML process 2.50  gpu.h5" in table
    )
    # a CPU file beside it: its GPU cells are dashes; the RSS columns are as before
    mixed = measured_table([str(cpu_result), str(gpu)])
    cpu_rows = rank_rows(mixed, "cpu.h5")
    assert all(r[-4:] == ["-"] * 4 for r in cpu_rows)
    assert [r[:7] for r in cpu_rows] == rank_rows(measured_table([str(cpu_result)]), "cpu.h5")


@pytest.mark.mpi
def test_a_cuda_file_without_gpu_figures_shows_them_unavailable(cpu_result, tmp_path):
    path = as_old_file(cpu_result, tmp_path / "nofields.h5")
    with h5py.File(path, "r+") as f:
        f.attrs["device"] = "cuda"
    rows = rank_rows(measured_table([str(path)]), "nofields.h5")
    assert all(r[-4:] == ["n/a"] * 4 for r in rows)


@pytest.mark.mpi
def test_memory_claim_bench_summary_table_has_gpu_and_accounting_columns(cpu_result, tmp_path):
    gpu = as_gpu_run(cpu_result, tmp_path / "gpu.h5")
    outcomes = [
        mem.Outcome(mem.Run("tiny-gpu", TINY, 2), gpu, "done"),
        mem.Outcome(mem.Run("tiny-cpu", TINY, 2), cpu_result, "done"),
        mem.Outcome(mem.Run("tiny-missing", TINY, 2), tmp_path / "none.h5", "skipped (no mpirun)"),
    ]
    rows = mem.summary_rows(outcomes, mem.run_sets("cuda", 2))
    assert rows[0]["device"] == "cuda" and rows[1]["device"] == "cpu"
    assert rows[0]["torch alloc"] == 5 * GIB and rows[0]["NVML process"] == 2.5 * GIB
    assert math.isnan(rows[1]["torch alloc"]) and math.isnan(rows[2]["peak RSS"])
    assert rows[0]["trainable per node"] == rows[1]["trainable per node"] > 0
    assert rows[0]["paper accounting"] == 16 * rows[0]["trainable per node"]
    md = mem.format_summary(rows)
    assert "| torch alloc GiB | torch reserved GiB | NVML used GiB | NVML process GiB |" in md
    assert "| 5.00 | 6.00 | 8.00 | 2.50 | done |" in md
    assert md.splitlines()[-1].endswith("| - | - | - | - | skipped (no mpirun) |")
    mem.write_table(tmp_path / "t.md", rows)
    assert "19.37 GB full fine-tuning" in (tmp_path / "t.md").read_text()
    mem.write_table(tmp_path / "t.csv", rows)
    lines = (tmp_path / "t.csv").read_text().splitlines()
    assert lines[0].startswith("run,ranks,device,trainable per node,paper GB,")
    assert f",{5 * GIB},{6 * GIB},{8 * GIB},{int(2.5 * GIB)},done" in lines[1]


def test_memory_claim_bench_paper_figures_and_run_lists():
    from snake_mpi.analysis.memory_accounting import run_accounting
    from snake_mpi.config import load_config

    assert [r.name for r in mem.OPT_GPU] == ["opt-full", "opt-full-bf16", "opt-snake-bf16-n6"]
    sets = mem.run_sets("cuda", 2)
    assert sets == ['device="cuda"', "train.local_steps=2", "train.rounds=1"]
    bf16 = load_config(mem.OPT_GPU[1].config, sets)
    assert bf16.model.dtype == "bfloat16" and bf16.scheme == "centralised"
    assert bf16.device == "cuda" and bf16.train.local_steps == 2
    full = run_accounting(bf16, 1)
    assert full.held_bytes == 18 * full.trainable  # bf16 weights + 16 bytes per parameter
    node = run_accounting(load_config(mem.OPT_GPU[2].config, sets), 6)
    assert node.trainable == 4 * 50_358_272  # the paper's share: 4 decoder layers
    assert mem.result_name(mem.OPT_GPU[2], "cuda", 2) == "opt-snake-bf16-n6-cuda-s2"
    assert mem.result_name(mem.OPT[0], "cpu", 0) == "opt-full"


def test_memory_claim_bench_runs_one_tiny_run_and_writes_its_table(tmp_path):
    job = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.memory_claim",
            "--tiny",
            "--steps",
            "1",
            "--only",
            "tiny-full",
        ]
        + ["--out", str(tmp_path), "--table", str(tmp_path / "t.md")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert job.returncode == 0, job.stdout + job.stderr
    assert (tmp_path / "tiny-full-s1.h5").is_file()
    table = (tmp_path / "t.md").read_text()
    assert "| tiny-full | 1 | cpu | 249,344 |" in table and "| done |" in table


def write_log(path: Path, job: dict[str, int | None], devices: dict[str, dict[str, int]]) -> Path:
    path.write_text(
        json.dumps(
            {
                "nvml": True,
                "polls": 10,
                "job": {str(k): v for k, v in job.items()},
                "devices": {u: {"name": "Fake GPU", "pids": p} for u, p in devices.items()},
            }
        )
    )
    return path


@pytest.mark.mpi
def test_gpu_demo_check_reports_each_check(cpu_result, tmp_path, capsys):
    gpu = as_gpu_run(cpu_result, tmp_path / "gpu.h5")
    clean = write_log(
        tmp_path / "clean.json",
        {100: 0, 101: 1, 50: None},
        {"GPU-AAAA": {"100": 1, "101": 2}, "GPU-bbbb": {"777": 3}},
    )
    assert check.check(gpu, clean, 0.0, {"gpu_energy_j", "gpu_nvml_process_bytes"}) == 0
    out = capsys.readouterr().out
    assert "PASS  status complete" in out and "PASS  ran on CUDA" in out
    assert "PASS  bytes_sent per round and rank = analytic count" in out
    assert "PASS  final sync bytes = analytic count" in out
    assert "gpu_energy_j finite on every rank: NaN on ranks [1] (rounds [1]) (allowed)" in out
    assert "PASS  /rounds/gpu_max_allocated_bytes finite on every rank: max 5.00 GiB" in out
    assert "PASS  no stray CUDA contexts" in out and "ranks [0, 1]" in out

    stray = write_log(
        tmp_path / "stray.json",
        {100: 0, 101: 1, 50: None},
        {"GPU-aaaa": {"100": 1, "101": 2, "50": 3}, "GPU-bbbb": {"101": 4}},
    )
    assert check.check(gpu, stray, 0.0, set()) == 1
    out = capsys.readouterr().out
    assert "FAIL  /rounds/gpu_energy_j finite on every rank: NaN on ranks [1]" in out
    assert "FAIL  /rounds/gpu_nvml_process_bytes finite on every rank: NaN on ranks [1]" in out
    assert "pid 50 (not a rank) holds a context" in out
    assert "rank 1 (pid 101) on ['aaaa', 'bbbb'], its GPU aaaa" in out

    # NVML in a container reports host PIDs: counted per GPU against the ranks placed there
    ok = write_log(tmp_path / "ns.json", {100: 0, 101: 1}, {"GPU-aaaa": {"9001": 1, "9002": 1}})
    assert check.check(gpu, ok, 0.0, {"gpu_energy_j", "gpu_nvml_process_bytes"}) == 0
    assert "counted per GPU: aaaa: 2 process(es), 2 rank(s)" in capsys.readouterr().out
    extra = write_log(
        tmp_path / "ns3.json", {100: 0}, {"GPU-aaaa": {"9001": 1, "9002": 1, "9003": 1}}
    )
    assert check.check(gpu, extra, 0.0, {"gpu_energy_j", "gpu_nvml_process_bytes"}) == 1

    # the CPU run itself: not on CUDA, every GPU field NaN
    assert check.check(cpu_result, None, 0.0, set()) == 1
    out = capsys.readouterr().out
    assert "FAIL  ran on CUDA (root attribute device): cpu" in out
    assert "INFO  no stray CUDA contexts" in out


def test_gpu_demo_check_watch_runs_the_command_and_writes_its_log(tmp_path):
    log = tmp_path / "w.json"
    cmd = [sys.executable, "-c", "import time, sys; time.sleep(0.5); sys.exit(3)"]
    assert check.main(["--watch", str(log), "--interval-s", "0.05", "--", *cmd]) == 3
    record = json.loads(log.read_text())
    assert record["returncode"] == 3 and record["polls"] >= 2
    assert record["command"] == cmd and isinstance(record["devices"], dict)


def train_step(*args: str) -> str:
    """``python -m bench.train_step ARGS`` on one thread: its output (exit 0 asserted)."""
    job = subprocess.run(
        [sys.executable, "-m", "bench.train_step", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=400,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert job.returncode == 0, job.stdout + job.stderr
    return job.stdout


def test_train_step_bench_prints_both_throughputs_and_their_ratio(tmp_path):
    table = tmp_path / "ts.md"
    job = train_step("--device", "cpu", "--steps", "10", "--trials", "2", "--out-table", str(table))
    ratios = dict(re.findall(r"^ratio (\S+): ([0-9.]+)", job, flags=re.M))
    assert set(ratios) == {"opt-tiny", "cnn"}
    assert all(float(r) > 0 for r in ratios.values())
    assert job.count("| identical |") == 2  # the two loops did the same work
    assert "bare samples/s | snake_mpi samples/s | ratio" in table.read_text()


def test_gpu_check_script_parses_and_says_when_no_gpu_is_present(tmp_path):
    script = REPO / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], timeout=30).returncode == 0
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the script would run the whole check")
    job = subprocess.run(
        ["bash", str(script), str(tmp_path / "out")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, PYTHON=sys.executable),
    )
    assert job.returncode == 2, job.stdout + job.stderr
    assert "no GPU present" in job.stdout
    for step in ("pytest-gpu", "demo", "demo-check", "transfer", "memory", "train-step"):
        assert re.search(rf"^  {step} +0 s  SKIPPED \(no GPU present\)$", job.stdout, re.M), step
    assert "the check is incomplete" in job.stdout
    usage = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=30)
    assert usage.returncode == 64 and "usage:" in usage.stderr


def test_memory_table_of_a_small_model_uses_a_readable_unit_and_says_which_nodes_it_drops(
    capsys,
):
    from snake_mpi.analysis.memory_accounting import main

    tiny = str(REPO / "tests" / "configs" / "tiny.toml")
    assert main([tiny, "--nodes", "2,4,6,8"]) == 0
    out = capsys.readouterr().out
    assert "paper KiB" in out and "76.56" in out  # 4,900 parameters x 16 bytes, not "0.00 GiB"
    assert "not shown: 6, 8 nodes; the model has 4 middle blocks" in out


def test_train_step_bench_times_the_lean_options_against_the_bare_loop(tmp_path):
    pytest.importorskip("torchao")
    out = train_step("--models", "opt-tiny", "--steps", "4", "--trials", "1", "--lean")
    rows = {
        cells[1]: cells
        for line in out.splitlines()
        if line.startswith("| opt-tiny |") and len(cells := line.split(" | ")) == 6
    }
    assert set(rows) == {"plain", "fused step", "activation checkpointing", "8-bit AdamW"} | {
        "fused kernel",
        "all three",
    }
    for exact in ("plain", "fused step", "activation checkpointing"):
        assert rows[exact][5].startswith("identical"), rows[exact]
    assert rows["8-bit AdamW"][5].startswith("max |diff|")  # other moments, other weights
    assert rows["fused kernel"][5].startswith("max |diff|")  # the same steps, other rounding
    assert all(float(r[3]) > 0 for r in rows.values())


def test_train_step_lean_leaves_out_the_8bit_adamw_where_torchao_is_missing(monkeypatch, capsys):
    from bench import train_step as ts

    def missing():
        raise ImportError("no module named torchao")

    monkeypatch.setattr(ts, "adamw8bit_class", missing)
    assert ts.lean_options() == ["fused step", "activation checkpointing", "fused kernel"]
    assert "without the 8-bit AdamW: no module named torchao" in capsys.readouterr().err
