"""The paper's memory claim (OPT-1.3B: 19.37 GB full fine-tuning -> 3.13 GB per Snake node),
checked both ways in one job:

1. accounting: ``snake-mpi memory`` for opt-1.3b and llama-3-8b (meta device, no memory):
   parameters per block, paper accounting (16 bytes per trainable parameter) and what a process
   holds, per scheme and node count, beside the paper's figures;
2. measurement: real fine-tuning runs, one after another, each rank's RSS before the model is
   built (baseline) and its peak, and the ratio of the largest per-node increase.

    python bench/memory.py --out results/memory          # OPT-1.3B: needs ~22 GiB, ~15 min
    python bench/memory.py --out results/memory --tiny   # the tiny model, a minute

Runs whose complete result file exists in ``--out`` are not repeated (resumable).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from snake_mpi.launch import launcher
from snake_mpi.store import is_complete

REPO = Path(__file__).resolve().parents[1]
LLM = REPO / "bench" / "configs" / "llm"
BIN = Path(sys.executable).parent

OPT = [  # (name, config, ranks)
    ("opt-full", LLM / "opt-1.3b-full.toml", 1),
    ("opt-snake-fp32-n2", LLM / "opt-1.3b-snake.toml", 2),
    ("opt-snake-bf16-n6", LLM / "opt-1.3b-snake-bf16.toml", 6),
]
TINY = [
    ("tiny-full", LLM / "tiny-centralised.toml", 1),
    ("tiny-snake-n4", LLM / "tiny-snake.toml", 4),
    ("tiny-fedavg-n5", LLM / "tiny-fedavg.toml", 5),
]


def snake_mpi() -> str:
    exe = BIN / "snake-mpi"
    return str(exe) if exe.exists() else "snake-mpi"


def launch(n: int, argv: list[str]) -> list[str]:
    """The command itself on one rank, else srun or mpirun (``snake_mpi.launch``)."""
    return argv if n == 1 else launcher(n, argv)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for result files and logs")
    ap.add_argument("--tiny", action="store_true", help="the tiny model instead of OPT-1.3B")
    ap.add_argument("--accounting-only", action="store_true", help="no measured runs")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["OMP_NUM_THREADS"] = "1"

    print("== accounting (meta device; paper: 19.37 GB full, 3.13 GB per Snake node) ==")
    for preset in ("opt-1.3b", "llama-3-8b"):
        for ends in ("frozen", "owner"):
            cmd = [snake_mpi(), "memory", str(LLM / "opt-1.3b-snake.toml")]
            cmd += ["--set", f'model.preset="{preset}"', "--set", f'snake.ends="{ends}"']
            subprocess.run(cmd, check=True, env=env)
            print()
    if args.accounting_only:
        return 0

    runs = TINY if args.tiny else OPT
    done = []
    for name, config, n in runs:
        path = out / f"{name}.h5"
        if is_complete(path):
            print(f"== {name}: complete result exists, not repeated ({path}) ==")
            done.append(path)
            continue
        cmd = launch(n, [snake_mpi(), "run", str(config), "--out", str(path), "--overwrite"])
        print(f"== {name}: {' '.join(cmd)} ==", flush=True)
        t0 = time.perf_counter()
        with open(out / f"{name}.log", "w") as log:
            job = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        elapsed = time.perf_counter() - t0
        if job.returncode != 0:
            tail = (out / f"{name}.log").read_text().splitlines()[-8:]
            print(f"   FAILED (exit {job.returncode}, {elapsed:.0f} s):\n   " + "\n   ".join(tail))
            continue
        print(f"   done in {elapsed:.0f} s")
        done.append(path)
    if done:
        print("\n== measured (RSS: baseline before the model is built, peak over the run) ==")
        cmd = [snake_mpi(), "memory", str(runs[1][1]), "--nodes", str(runs[1][2])]
        subprocess.run(cmd + ["--measured", *map(str, done)], check=True, env=env)
    return 0 if len(done) == len(runs) else 1


if __name__ == "__main__":
    sys.exit(main())
