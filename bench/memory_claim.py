"""The paper's memory claim (OPT-1.3B: 19.37 GB full fine-tuning -> 3.13 GB per Snake node),
checked both ways in one job:

1. accounting: ``snake-mpi memory`` for opt-1.3b and llama-3-8b (meta device, no memory):
   parameters per block, paper accounting (16 bytes per trainable parameter) and what a process
   holds, per scheme and node count, beside the paper's figures;
2. measurement: real fine-tuning runs, one after another, each rank's RSS before the model is
   built (baseline) and its peak, and the ratio of the largest per-node increase; on a GPU
   (``--device cuda``) each rank's peak GPU memory too, from torch's allocator and from NVML.

    python -m bench.memory_claim --out results/memory         # OPT-1.3B, CPU: ~22 GiB, ~15 min
    python -m bench.memory_claim --out results/memory --tiny  # the tiny model, a minute
    python -m bench.memory_claim --out results/mem-gpu --device cuda --steps 2 --table mem-gpu.md
    python -m bench.memory_claim --out results/lone --lone-node all --nodes 2,6 --ring \
        bench/configs/llm/opt-125m-snake-bf16.toml        # lone nodes against the full rings

``--device cuda`` runs OPT-1.3B full fine-tuning with fp32 and with bf16 weights (fp32 master
copies and AdamW state) against a Snake node at the paper's share (6 nodes of 4 decoder layers,
bf16 weights); with one GPU the six Snake ranks share it (recorded in ``/ranks/gpu_shared``).
``--steps N`` makes every run one round of N optimiser steps per turn (a quick check).
Multi-rank runs need an MPI launcher (mpirun, or srun inside Slurm); without one they are
skipped with a message. Runs whose complete result file exists in ``--out`` are not repeated
(resumable); a result's name carries its device and ``--steps``.

``--lone-node K[,K...]|all --nodes N[,N...] CONFIG`` measures node K of an N-node ring of
CONFIG alone, one process per node (``bench.lone_node``: its segment, its shard, its turn and
hops, without the other N - 1 ranks' memory), and with ``--ring`` also the whole ring under
mpirun, side by side (peak RSS increase over the baseline of the lone node and of the ring's
rank K, and their ratio).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from snake_mpi.analysis import memory_accounting
from snake_mpi.config import load_config
from snake_mpi.launch import launcher
from snake_mpi.store import is_complete, read_result

REPO = Path(__file__).resolve().parents[1]
LLM = REPO / "bench" / "configs" / "llm"
BIN = Path(sys.executable).parent


@dataclass(frozen=True, slots=True)
class Run:
    name: str
    config: Path
    ranks: int


OPT = [
    Run("opt-full", LLM / "opt-1.3b-full.toml", 1),
    Run("opt-snake-fp32-n2", LLM / "opt-1.3b-snake.toml", 2),
    Run("opt-snake-bf16-n6", LLM / "opt-1.3b-snake-bf16.toml", 6),
]
OPT_GPU = [
    Run("opt-full", LLM / "opt-1.3b-full.toml", 1),
    Run("opt-full-bf16", LLM / "opt-1.3b-full-bf16.toml", 1),
    Run("opt-snake-bf16-n6", LLM / "opt-1.3b-snake-bf16.toml", 6),
]
TINY = [
    Run("tiny-full", LLM / "tiny-centralised.toml", 1),
    Run("tiny-snake-n4", LLM / "tiny-snake.toml", 4),
    Run("tiny-fedavg-n5", LLM / "tiny-fedavg.toml", 5),
]


@dataclass(frozen=True, slots=True)
class Outcome:
    run: Run
    path: Path
    status: str
    """"done", "failed (exit N)" or "skipped (...)"."""


def snake_mpi() -> str:
    exe = BIN / "snake-mpi"
    return str(exe) if exe.exists() else "snake-mpi"


def launch(n: int, argv: list[str]) -> list[str] | None:
    """The command itself on one rank, else srun or mpirun (``snake_mpi.launch``); None when
    that launcher is not installed."""
    if n == 1:
        return argv
    cmd = launcher(n, argv)
    return cmd if Path(cmd[0]).is_file() or shutil.which(cmd[0]) else None


def run_sets(device: str, steps: int) -> list[str]:
    """``--set`` overrides of every measured run."""
    sets = [f'device="{device}"']
    if steps > 0:
        sets += [f"train.local_steps={steps}", "train.rounds=1"]
    return sets


def result_name(run: Run, device: str, steps: int) -> str:
    return run.name + ("-cuda" if device == "cuda" else "") + (f"-s{steps}" if steps else "")


def echo_progress(job: subprocess.Popen, log_path: Path, poll_s: float = 5.0) -> None:
    """Wait for ``job``, echoing the progress lines it writes to its log (rounds done, and
    steps within a long turn) as they come, so that a run of many minutes shows it is alive.
    The job is ended with its launcher if this process is interrupted."""
    seen = 0
    try:
        while True:
            try:
                job.wait(timeout=poll_s)
                done = True
            except subprocess.TimeoutExpired:
                done = False
            lines = log_path.read_text(errors="replace").splitlines()
            for line in lines[seen:]:
                if line.startswith("snake-mpi: ") and ("round" in line or "step" in line):
                    print(f"   {line}", flush=True)
            seen = len(lines)
            if done:
                return
    except BaseException:
        from snake_mpi.proctree import end_job

        end_job(job, grace_s=2.0)  # the launcher and every rank it started
        raise


def measure(run: Run, sets: list[str], path: Path, env: dict[str, str]) -> Outcome:
    """One run under its launcher, its output beside the result (``<name>.log``)."""
    if is_complete(path):
        print(f"== {run.name}: complete result exists, not repeated ({path}) ==")
        return Outcome(run, path, "done")
    argv = [snake_mpi(), "run", str(run.config), "--out", str(path), "--overwrite"]
    for s in sets:
        argv += ["--set", s]
    cmd = launch(run.ranks, argv)
    if cmd is None:
        print(f"== {run.name}: skipped: no MPI launcher (mpirun) for its {run.ranks} ranks ==")
        return Outcome(run, path, "skipped (no mpirun)")
    print(f"== {run.name}: {' '.join(cmd)} ==", flush=True)
    log_path = path.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        echo_progress(job, log_path)
    elapsed = time.perf_counter() - t0
    if job.returncode != 0:
        tail = log_path.read_text().splitlines()[-8:]
        print(f"   FAILED (exit {job.returncode}, {elapsed:.0f} s):\n   " + "\n   ".join(tail))
        return Outcome(run, path, f"failed (exit {job.returncode})")
    print(f"   done in {elapsed:.0f} s")
    return Outcome(run, path, "done")


COLUMNS = [
    "run",
    "ranks",
    "device",
    "trainable per node",
    "paper GB",
    "paper accounting",
    "held",
    "peak RSS",
    "train state",
    "torch alloc",
    "torch reserved",
    "NVML used",
    "NVML process",
    "status",
]
"""Columns of the summary table; byte figures are the largest rank's, in the table's unit."""
BYTE_COLUMNS = COLUMNS[5:13]


def summary_rows(outcomes: list[Outcome], sets: list[str]) -> list[dict[str, float | str]]:
    """Per run: the accounting of its config (``snake-mpi memory``), the paper's figure for
    it, and what its result file measured (largest rank; GPU fields NaN on a CPU run)."""
    rows = []
    for o in outcomes:
        cfg = load_config(o.run.config, sets)
        acc = memory_accounting.run_accounting(cfg, o.run.ranks)
        paper: float | str = "-"
        if cfg.model.preset == "opt-1.3b":
            if cfg.scheme != "snake":
                paper = memory_accounting.PAPER["full_gb"]
            elif o.run.ranks == 6:
                paper = memory_accounting.PAPER["snake_node_gb"]
        row: dict[str, float | str] = {
            "run": o.run.name,
            "ranks": o.run.ranks,
            "device": cfg.device,
            "trainable per node": acc.trainable,
            "paper GB": paper,
            "paper accounting": float(acc.paper_bytes),
            "held": float(acc.held_bytes),
            "status": o.status,
        }
        measured = dict.fromkeys(BYTE_COLUMNS[2:], float("nan"))
        if o.status == "done":
            res = read_result(o.path)
            row["device"] = str(res.attrs.get("device", "cpu"))
            ranks = res.tables["ranks"]
            peak = np.maximum(ranks["peak_rss_bytes"], ranks["ru_maxrss_bytes"])
            measured["peak RSS"] = float(peak.max())
            measured["train state"] = float(res.rounds["train_state_bytes"].max())
            gpu = memory_accounting.gpu_peaks(res)
            if gpu is not None:
                for key, label in memory_accounting.GPU_FIELDS.items():
                    measured[label] = memory_accounting.largest(gpu[key])
        rows.append(row | measured)
    return rows


def format_summary(rows: list[dict[str, float | str]], fmt: str = "markdown") -> str:
    """The summary as a markdown table (byte columns in one unit, named in the header) or CSV
    (bytes as integers; NaN empty)."""
    if fmt == "csv":
        import io

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow([c + (" bytes" if c in BYTE_COLUMNS else "") for c in COLUMNS])
        for r in rows:
            w.writerow(
                [
                    ""
                    if isinstance(r[c], float) and not np.isfinite(r[c])
                    else (int(r[c]) if c in BYTE_COLUMNS else r[c])
                    for c in COLUMNS
                ]
            )
        return buf.getvalue()
    figures = [v for r in rows for c in BYTE_COLUMNS if np.isfinite(v := float(r[c]))]
    unit, scale = ("GiB", 2**30) if max(figures, default=0) >= 2**30 else ("MiB", 2**20)
    head = [c + (f" {unit}" if c in BYTE_COLUMNS else "") for c in COLUMNS]

    def cell(c: str, v: float | str) -> str:
        if c in BYTE_COLUMNS:
            return f"{float(v) / scale:.2f}" if np.isfinite(float(v)) else "-"
        if c == "trainable per node":
            return f"{int(v):,}"
        return str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


PAPER = memory_accounting.PAPER
NOTES = f"""Paper ({PAPER["model"]}): {PAPER["full_gb"]} GB full fine-tuning, \
{PAPER["snake_node_gb"]} GB per Snake node (6 nodes of 4 decoder layers). Paper \
accounting: 16 bytes per trainable parameter; held: every weight at its dtype + gradients and \
AdamW state (+ fp32 master copies with bf16 weights) of the trainable part (docs/memory.md). \
Measured figures are the largest rank's: peak RSS, the training state counted from the tensors, \
torch's max allocated / reserved, NVML's used (the whole device: every rank sharing the GPU and \
their CUDA contexts) and the rank's own NVML process figure."""


def write_table(path: Path, rows: list[dict[str, float | str]]) -> None:
    """The summary as CSV (``.csv``) or markdown (any other suffix), with the notes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        path.write_text(format_summary(rows, "csv"))
    else:
        path.write_text(format_summary(rows) + "\n\n" + NOTES + "\n")


def lone_picks(spec: str, n: int) -> list[int]:
    """The nodes ``--lone-node`` names of an ``n``-node ring (``all``, or ``K[,K...]``)."""
    if spec == "all":
        return list(range(n))
    picks = [int(x) for x in spec.split(",")]
    if any(not 0 <= k < n for k in picks):
        raise ValueError(f"--lone-node {spec}: a ring of {n} nodes has nodes 0..{n - 1}")
    return picks


def measure_lone(
    config: Path, n: int, k: int, sets: list[str], path: Path, env: dict[str, str]
) -> dict[str, Any] | None:
    """Node ``k`` of an ``n``-node ring of ``config`` alone, in a process of its own
    (``bench.lone_node``; its peak is the process's); its figures, or None if it failed. A
    JSON file that exists already is read, not measured again."""
    if path.exists():
        print(f"== lone node {k} of {n}: exists, not repeated ({path}) ==")
        return dict(json.loads(path.read_text()))
    argv = [sys.executable, "-m", "bench.lone_node", str(config), "--nodes", str(n)]
    argv += ["--node", str(k), "--json", str(path)]
    for s in sets:
        argv += ["--set", s]
    print(f"== lone node {k} of {n}: {' '.join(argv)} ==", flush=True)
    log = path.with_suffix(".log")
    with open(log, "w") as f:
        done = subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    text = log.read_text()
    print("   " + "\n   ".join(text.splitlines()[-8:]), flush=True)
    if done.returncode != 0:
        print(f"   FAILED (exit {done.returncode})")
        return None
    return dict(json.loads(path.read_text()))


def ring_figures(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Per rank of a ring's result: peak RSS increase over the baseline (the larger of the
    sampled peak and ``ru_maxrss``, less ``rss_before_model_bytes``) and the training state
    (largest over rounds)."""
    res = read_result(path)
    ranks = res.tables["ranks"]
    peak = np.maximum(ranks["peak_rss_bytes"], ranks["ru_maxrss_bytes"])
    increase = peak - ranks["rss_before_model_bytes"]
    return increase.astype(np.float64), res.rounds["train_state_bytes"].max(axis=0)


def lone_rows(
    config: Path,
    picks: dict[int, list[int]],
    device: str,
    steps: int,
    out: Path,
    env: dict[str, str],
    *,
    ring: bool,
) -> list[dict[str, Any]]:
    """One row per (ring size, node): the lone node's figures and, with ``ring``, those of
    the whole ring's rank (one mpirun per ring size)."""
    sets = run_sets(device, steps)
    nan = float("nan")
    rows = []
    for n, nodes in picks.items():
        ring_inc = ring_state = None
        ring_status = "not run"
        if ring:
            run = Run(f"ring-{config.stem}-n{n}", config, n)
            path = out / f"{result_name(run, device, steps)}.h5"
            ring_status = measure(run, sets, path, env).status
            if ring_status == "done":
                ring_inc, ring_state = ring_figures(path)
        for k in nodes:
            name = result_name(Run(f"lone-{config.stem}-n{n}-k{k}", config, 1), device, steps)
            got = measure_lone(config, n, k, sets, out / f"{name}.json", env)
            row: dict[str, Any] = {
                "nodes": n,
                "k": k,
                "ring increase": float(ring_inc[k]) if ring_inc is not None else nan,
                "lone increase": float(got["increase_bytes"]) if got else nan,
                "ring train state": float(ring_state[k]) if ring_state is not None else nan,
                "lone train state": float(got["train_state_bytes"]) if got else nan,
                "status": "done" if got and ring_status in ("done", "not run") else "failed",
            }
            row["ratio"] = row["lone increase"] / row["ring increase"]
            rows.append(row)
    return rows


LONE_COLUMNS = [
    "nodes",
    "k",
    "ring increase",
    "lone increase",
    "ratio",
    "ring train state",
    "lone train state",
]


def format_lone(rows: list[dict[str, Any]]) -> str:
    """The lone-node table (markdown; bytes in GiB from 1 GiB, else MiB)."""
    figures = [float(r[c]) for r in rows for c in LONE_COLUMNS[2:] if c != "ratio"]
    big = max((f for f in figures if np.isfinite(f)), default=0.0) >= 2**30
    unit, scale = ("GiB", 2**30) if big else ("MiB", 2**20)

    def cell(c: str, v: Any) -> str:
        if c in ("nodes", "k"):
            return str(v)
        if not np.isfinite(v):
            return "-"
        return f"{v:.3f}" if c == "ratio" else f"{v / scale:.3f}"

    head = [c if c in ("nodes", "k", "ratio") else f"{c} {unit}" for c in LONE_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(cell(c, r[c]) for c in LONE_COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for result files and logs")
    ap.add_argument("--tiny", action="store_true", help="the tiny model instead of OPT-1.3B")
    ap.add_argument("--accounting-only", action="store_true", help="no measured runs")
    ap.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="where the measured runs train (cuda: OPT-1.3B fp32 and bf16 full fine-tuning "
        "against a 6-node bf16 Snake node)",
    )
    ap.add_argument(
        "--steps",
        type=int,
        default=0,
        help="optimiser steps per turn (train.local_steps) in one round; 0: the configs' own",
    )
    ap.add_argument("--table", type=Path, help="also write the summary table here (.csv or .md)")
    ap.add_argument("--only", default="", help="comma-separated run names: measure only these")
    ap.add_argument("config", nargs="?", type=Path, help="with --lone-node: the Snake config")
    ap.add_argument(
        "--lone-node",
        default="",
        help="K[,K...] or all: measure node K of each --nodes ring of CONFIG alone",
    )
    ap.add_argument("--nodes", default="", help="with --lone-node: ring sizes N[,N...]")
    ap.add_argument(
        "--ring", action="store_true", help="with --lone-node: also run each whole ring (mpirun)"
    )
    args = ap.parse_args(argv)
    if args.steps < 0:
        ap.error("--steps must be >= 0")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["OMP_NUM_THREADS"] = "1"
    if args.lone_node or args.nodes or args.config or args.ring:
        if not (args.lone_node and args.nodes and args.config):
            ap.error("--lone-node, --nodes and CONFIG go together (--ring is optional)")
        try:
            nodes = [int(x) for x in args.nodes.split(",")]
            picks = {n: lone_picks(args.lone_node, n) for n in nodes}
        except ValueError as e:
            ap.error(str(e))
        rows = lone_rows(args.config, picks, args.device, args.steps, out, env, ring=args.ring)
        print("\n== lone nodes (peak RSS increase over the baseline; ring: its rank k) ==")
        print(format_lone(rows))
        if args.table:
            args.table.parent.mkdir(parents=True, exist_ok=True)
            args.table.write_text(format_lone(rows) + "\n")
            print(f"\ntable written to {args.table}")
        return 1 if any(r["status"] != "done" for r in rows) else 0

    print("== accounting (meta device; paper: 19.37 GB full, 3.13 GB per Snake node) ==")
    for preset in ("opt-1.3b", "llama-3-8b"):
        for ends in ("frozen", "owner"):
            memory_accounting.main(
                [
                    str(LLM / "opt-1.3b-snake.toml"),
                    "--set",
                    f'model.preset="{preset}"',
                    "--set",
                    f'snake.ends="{ends}"',
                ]
            )
            print(flush=True)
    if args.accounting_only:
        return 0

    runs = TINY if args.tiny else OPT_GPU if args.device == "cuda" else OPT
    if args.only:
        wanted = {x.strip() for x in args.only.split(",") if x.strip()}
        if not wanted <= {r.name for r in runs}:
            ap.error(f"--only takes run names of {', '.join(r.name for r in runs)}")
        runs = [r for r in runs if r.name in wanted]
    sets = run_sets(args.device, args.steps)
    outcomes = [
        measure(run, sets, out / f"{result_name(run, args.device, args.steps)}.h5", env)
        for run in runs
    ]
    done = [o for o in outcomes if o.status == "done"]
    if done:
        unit = "RSS" + (" and GPU memory" if args.device == "cuda" else "")
        print(f"\n== measured ({unit}: baseline before the model is built, peak over the run) ==")
        snake = next((r for r in runs if "snake" in r.name), runs[0])
        measured = ["--measured", *(str(o.path) for o in done)]
        memory_accounting.main([str(snake.config), "--nodes", str(max(2, snake.ranks)), *measured])
    rows = summary_rows(outcomes, sets)
    print("\n== summary (largest rank of each run) ==")
    print(format_summary(rows))
    print("\n" + NOTES)
    if args.table:
        write_table(args.table, rows)
        print(f"\ntable written to {args.table}")
    return 1 if any(o.status.startswith("failed") for o in outcomes) else 0


if __name__ == "__main__":
    sys.exit(main())
