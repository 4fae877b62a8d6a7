"""What checkpoints cost: the same runs with checkpoints on (``[checkpoint] every``) and off
(``every = 0``), interleaved in one job, and every checkpoint file's size against the analytic
count of the blocks it must hold.

1. the demo's workload (``bench/configs/demo.toml``, 4 ranks) lengthened to ``--rounds``
   rounds (default 20, so the default ``every = 5`` fires after rounds 5, 10 and 15), run
   ``--reps`` times on and off, alternating (on/off, off/on, ...);
2. OPT-1.3B Snake (``bench/configs/llm/opt-1.3b-snake-bf16.toml``, bf16) on ``--llm-ranks``
   ranks (default 4: the machine's 24 GiB), 3 rounds of one optimiser step per turn,
   ``every = 1`` (checkpoints after rounds 1 and 2) against ``every = 0``, ``--llm-reps``
   times each (default once). On a CPU without bfloat16 matrix instructions (no
   ``avx512_bf16``/``amx_bf16``) torch's bf16 matmul is some hundred times slower than fp32
   and a step takes about an hour: the part is skipped with that reason unless ``--force``;
   ``--llm-dtype fp32 --llm-ranks 2`` runs the fp32 config (``opt-1.3b-snake.toml``, 4.9 GiB
   of weights per rank) instead. A run that would not fit in the memory available is skipped
   too.

Wall time is the training wall of the run: the largest per-rank sum of ``/rounds/round_s``
(the rounds tile a rank's time); ``job s`` is the whole launcher command (start-up, model
build, final sync and the deletion of the checkpoints included). ``ckpt s`` is the sum of
``/rounds/checkpoint_s``: the time each rank spent writing its checkpoint files (rank 0 also
waits for every rank's report and commits the manifest), so rank 0's is the checkpoints' cost
on the critical path (in Snake P2P every round starts at node 0). The per-round stop-flag
agreement extends the round-end gather and its wait is in ``gather_s``, not here.
``on - off`` is the difference of the mean wall times: the cost as a whole, in the noise of
the machine.

Bytes: each checkpoint's file size per rank (``/rounds/checkpoint_bytes``; the files are gone
once a run completes) against the bytes of the blocks the rank held with version > 0, from
the result's ``/blocks`` table and the Snake P2P rule (``keep = "all"``): after round 1 node
``i`` holds the blocks trained by nodes ``0..i`` (node 0 all of them: it receives the last
node's hop before it writes), after a later round every node holds every trained block
(``owner != -2``; ``ends = "frozen"`` leaves stem and head untrained, so unwritten). The
overhead is what else a file holds: header, block versions, random states, counters.

    python -m bench.checkpoint_cost --out /tmp/ckpt-bench               # demo ~10 min, then OPT
    python -m bench.checkpoint_cost --out /tmp/ckpt-bench --parts llm --llm-dtype fp32 \
        --llm-ranks 2
    python -m bench.checkpoint_cost --out /tmp/ckpt-bench --parts demo  # the demo part only
    python -m bench.checkpoint_cost --out /tmp/ckpt-quick --quick       # a fast check (~2 min)

``--quick``: the demo on a quarter of its data, one epoch per turn, 6 rounds (one checkpoint,
after round 5), one repetition; the tiny language model (``tiny-snake.toml``) instead of
OPT-1.3B. Runs whose complete result file exists in ``--out`` are not repeated (resumable);
the tables are printed and written to ``OUT/checkpoint.md``. Multi-rank runs need an MPI
launcher (``snake_mpi.launch``: mpirun, or srun inside Slurm).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snake_mpi.config import CheckpointConfig, ConfigError, RunConfig, from_dict
from snake_mpi.launch import launcher
from snake_mpi.store import Result, is_complete, read_result

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "bench" / "configs"
BIN = Path(sys.executable).parent
DEFAULT_EVERY = CheckpointConfig().every
OWNER_NONE = -2
"""``/blocks/owner`` of a block no node trains (``schemes.snake.OWNER_NONE``)."""
OPT_WEIGHTS_GIB = {"bf16": 2.45, "fp32": 4.9}
"""OPT-1.3B's weights as every rank holds them (docs/memory.md)."""
OPT_DECODER_PARAMS = 1.21e9
"""Parameters of OPT-1.3B's 24 decoder layers, shared out over the nodes (ends frozen)."""
TRAIN_BYTES_PER_PARAM = {"bf16": 16, "fp32": 12}
"""Training state per trainable parameter beyond the weights: fp32 gradient and AdamW's two
moments, and with bf16 weights the fp32 master copy."""
RANK_OVERHEAD_GIB = 0.6
"""Interpreter, libraries, data, transfer buffers of one rank."""


def opt_memory_gib(dtype: str, ranks: int) -> float:
    """Host memory an OPT-1.3B Snake run on ``ranks`` ranks needs at its peak, roughly: every
    rank's weights, and one training rank's state at a time."""
    train = OPT_DECODER_PARAMS / ranks * TRAIN_BYTES_PER_PARAM[dtype] / 2**30
    return ranks * (OPT_WEIGHTS_GIB[dtype] + RANK_OVERHEAD_GIB) + train


def cpu_has_bf16() -> bool:
    """Whether this CPU has bfloat16 matrix instructions (AVX512-BF16 or AMX); without them
    torch's bfloat16 matmul on the CPU is some hundred times slower than float32 (0.13 against
    46 GFLOP/s on one core of the development machine)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return True  # not Linux: cannot tell, do not refuse
    return any(flag in text for flag in ("avx512_bf16", "amx_bf16"))


@dataclass(frozen=True, slots=True)
class Workload:
    name: str
    config: Path
    ranks: int
    sets: tuple[str, ...]
    every: int
    """``checkpoint.every`` of the "on" runs."""
    reps: int


@dataclass(slots=True)
class Run:
    workload: Workload
    on: bool
    rep: int
    path: Path
    status: str = "pending"
    job_s: float = float("nan")
    load: float = float("nan")
    """1-minute load average when the run started (the machine's other work)."""
    result: Result | None = field(default=None, repr=False)

    @property
    def label(self) -> str:
        return f"{self.workload.name} {'on' if self.on else 'off'} #{self.rep}"

    @property
    def every(self) -> int:
        return self.workload.every if self.on else 0


def workloads(args: argparse.Namespace) -> list[Workload]:
    out = []
    sets: tuple[str, ...]
    if "demo" in args.parts:
        if args.quick:
            sets = ("train.rounds=6", "data.n_train=1024", "train.local_epochs=1")
        else:
            sets = (f"train.rounds={args.rounds}",)
        out.append(Workload("demo", CONFIGS / "demo.toml", 4, sets, DEFAULT_EVERY, args.reps))
    if "llm" in args.parts:
        steps: tuple[str, ...] = ("train.rounds=3", "train.local_steps=1")
        if args.quick:
            cfg, name = CONFIGS / "llm" / "tiny-snake.toml", "tiny-lm"
            steps += ("data.n_train=256",)
        else:
            suffix = "-bf16" if args.llm_dtype == "bf16" else ""
            cfg, name = CONFIGS / "llm" / f"opt-1.3b-snake{suffix}.toml", f"opt-{args.llm_dtype}"
        out.append(Workload(name, cfg, args.llm_ranks, steps, 1, args.llm_reps))
    return out


def schedule(loads: list[Workload], out: Path) -> list[Run]:
    """Every run in the order they are made: per workload, on and off alternating, the
    first of each pair swapped every repetition (on/off, off/on, ...)."""
    runs = []
    for w in loads:
        for rep in range(w.reps):
            order = (True, False) if rep % 2 == 0 else (False, True)
            for on in order:
                name = f"{w.name}-{'on' if on else 'off'}-{rep}.h5"
                runs.append(Run(w, on, rep, out / name))
    return runs


def snake_mpi() -> str:
    exe = BIN / "snake-mpi"
    return str(exe) if exe.exists() else "snake-mpi"


def launch(n: int, argv: list[str]) -> list[str] | None:
    """The command on ``n`` ranks (``snake_mpi.launch``); None without an MPI launcher."""
    if n == 1:
        return argv
    cmd = launcher(n, argv)
    return cmd if Path(cmd[0]).is_file() or shutil.which(cmd[0]) else None


def available_gib() -> float:
    """MemAvailable of /proc/meminfo in GiB (inf where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024 / 2**30
    except OSError:
        pass
    return float("inf")


def measure(run: Run, env: dict[str, str]) -> None:
    """One run under its launcher, its output beside the result (``<name>.log``), the
    launcher's seconds and the load when it started beside it too (``<name>.json``)."""
    side = run.path.with_suffix(".json")
    if is_complete(run.path):
        print(f"== {run.label}: complete result exists, not repeated ({run.path}) ==")
        run.status = "done"
        with contextlib.suppress(OSError, ValueError, KeyError):
            known = json.loads(side.read_text())
            run.job_s, run.load = float(known["job_s"]), float(known["load"])
        return
    w = run.workload
    argv = [snake_mpi(), "run", str(w.config), "--out", str(run.path), "--overwrite"]
    for s in (*w.sets, f"checkpoint.every={run.every}"):
        argv += ["--set", s]
    cmd = launch(w.ranks, argv)
    if cmd is None:
        print(f"== {run.label}: skipped: no MPI launcher (mpirun) for its {w.ranks} ranks ==")
        run.status = "skipped (no mpirun)"
        return
    run.load = os.getloadavg()[0]
    print(f"== {run.label} (load {run.load:.2f}): {' '.join(cmd)} ==", flush=True)
    log_path = run.path.with_suffix(".log")
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        job = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        try:
            job.wait()
        except BaseException:
            from snake_mpi.proctree import end_job

            end_job(job, grace_s=2.0)  # the launcher and every rank it started
            raise
    run.job_s = time.perf_counter() - t0
    if job.returncode != 0:
        tail = log_path.read_text(errors="replace").splitlines()[-8:]
        print(f"   FAILED (exit {job.returncode}, {run.job_s:.0f} s):\n   " + "\n   ".join(tail))
        run.status = f"failed (exit {job.returncode})"
        return
    print(f"   done in {run.job_s:.1f} s", flush=True)
    run.status = "done"
    side.write_text(json.dumps({"job_s": run.job_s, "load": run.load}) + "\n")


# ---------------------------------------------------------------------------- figures


def wall_s(res: Result) -> float:
    """Training wall time: the largest per-rank sum of ``round_s``."""
    return float(np.max(np.sum(res.rounds["round_s"], axis=0)))


def checkpoint_s(res: Result) -> np.ndarray:
    """Per rank, the sum of ``checkpoint_s`` over the rounds."""
    return np.sum(res.rounds["checkpoint_s"], axis=0)


def analytic_bytes(block_bytes: np.ndarray, owners: np.ndarray, rank: int, rounds_done: int) -> int:
    """Bytes of the blocks Snake P2P rank ``rank`` holds with version > 0 at the checkpoint
    after ``rounds_done`` rounds (``keep = "all"``): the blocks trained by nodes ``0..rank``
    after the first round (every trained block on node 0, which has received the last node's
    hop by then), every trained block after a later one. ``owner`` -1 (trained by several
    nodes, e.g. shared ends) counts as trained by node 0, -2 as never trained."""
    block_bytes, owners = np.asarray(block_bytes), np.asarray(owners)
    trained = owners != OWNER_NONE
    held = trained if rounds_done >= 2 or rank == 0 else trained & (owners <= rank)
    return int(block_bytes[held].sum())


@dataclass(frozen=True, slots=True)
class FileRow:
    workload: str
    run: str
    after_round: int
    rank: int
    measured: int
    analytic: int | None
    seconds: float


def file_rows(run: Run) -> list[FileRow]:
    """Every checkpoint file of a run: a row with ``checkpoint_bytes > 0`` at index ``k`` is
    the checkpoint after round ``k``."""
    res = run.result
    assert res is not None
    cfg = load_config_text(res)
    p2p_all = (
        cfg is not None
        and cfg.scheme == "snake"
        and cfg.snake.mode == "p2p"
        and cfg.snake.keep == "all"
    )
    blocks = res.tables.get("blocks", {})
    nbytes = res.rounds["checkpoint_bytes"]
    secs = res.rounds["checkpoint_s"]
    rows = []
    for k in range(nbytes.shape[0]):
        for rank in range(nbytes.shape[1]):
            if nbytes[k, rank] <= 0:
                continue
            analytic = None
            if p2p_all and "bytes" in blocks and "owner" in blocks:
                analytic = analytic_bytes(blocks["bytes"], blocks["owner"], rank, k)
            rows.append(
                FileRow(
                    run.workload.name,
                    run.path.stem,
                    k,
                    rank,
                    int(nbytes[k, rank]),
                    analytic,
                    float(secs[k, rank]),
                )
            )
    return rows


def load_config_text(res: Result) -> RunConfig | None:
    """The run's config from its stored TOML (None if it cannot be parsed)."""
    try:
        return from_dict(tomllib.loads(res.config_toml))
    except (ConfigError, tomllib.TOMLDecodeError, TypeError, ValueError):
        return None


# ---------------------------------------------------------------------------- tables


def _md(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    """One row per run, in the order they were made."""
    head = [
        "run",
        "every",
        "load",
        "job s",
        "wall s",
        "ckpt s rank 0",
        "ckpt s max rank",
        "checkpoints",
        "status",
    ]
    rows = []
    for r in runs:
        res = r.result
        if res is None:
            rows.append([r.label, str(r.every), "-", "-", "-", "-", "-", "-", r.status])
            continue
        ck = checkpoint_s(res)
        taken = int(np.count_nonzero(res.rounds["checkpoint_bytes"][:, 0] > 0))
        rows.append(
            [
                r.label,
                str(r.every),
                f"{r.load:.2f}" if np.isfinite(r.load) else "-",
                f"{r.job_s:.1f}" if np.isfinite(r.job_s) else "-",
                f"{wall_s(res):.2f}",
                f"{ck[0]:.3f}",
                f"{ck.max():.3f} (rank {int(ck.argmax())})",
                str(taken),
                r.status,
            ]
        )
    return _md(head, rows)


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{min(values):.2f} – {max(values):.2f}"


def cost_table(runs: list[Run]) -> str:
    """Per workload: mean wall time on and off, rank 0's checkpoint seconds and their share
    of the wall, and the difference of the means."""
    head = [
        "workload",
        "checkpoints",
        "runs",
        "wall s mean",
        "wall s range",
        "ckpt s rank 0",
        "ckpt s / wall",
        "on − off wall",
    ]
    rows = []
    for w in dict.fromkeys(r.workload for r in runs):
        means = {}
        for on in (True, False):
            these = [r.result for r in runs if r.workload == w and r.on == on and r.result]
            walls = [wall_s(res) for res in these if res is not None]
            ck = [float(checkpoint_s(res)[0]) for res in these if res is not None]
            if not walls or these[0] is None:
                continue
            means[on] = float(np.mean(walls))
            share = np.mean([c / s for c, s in zip(ck, walls, strict=True)])
            diff = "-"
            if on is False and True in means:
                d = means[True] - means[False]
                diff = f"{d:+.2f} s ({100 * d / means[False]:+.1f} %)"
            taken = int(np.count_nonzero(these[0].rounds["checkpoint_bytes"][:, 0] > 0))
            rows.append(
                [
                    w.name,
                    f"every {w.every}: {taken}" if on else "off",
                    str(len(walls)),
                    f"{means[on]:.2f}",
                    _spread(walls),
                    f"{np.mean(ck):.3f}",
                    f"{100 * share:.2f} %",
                    diff,
                ]
            )
    return _md(head, rows)


def _bytes(n: float) -> str:
    return f"{int(n):,}"


def bytes_table(runs: list[Run]) -> str:
    """Each checkpoint file of the first complete "on" run of every workload (the same in
    every repetition: the runs are deterministic; a repetition that differs is named)."""
    head = [
        "workload",
        "after round",
        "rank",
        "file bytes",
        "analytic block bytes",
        "overhead bytes",
        "overhead %",
        "ckpt s",
    ]
    rows, notes = [], []
    for w in dict.fromkeys(r.workload for r in runs):
        ons = [r for r in runs if r.workload == w and r.on and r.result is not None]
        if not ons:
            continue
        first = file_rows(ons[0])
        for other in ons[1:]:
            if [(f.after_round, f.rank, f.measured) for f in file_rows(other)] != [
                (f.after_round, f.rank, f.measured) for f in first
            ]:
                notes.append(f"{other.path.name}: file sizes differ from {ons[0].path.name}")
        for f in first:
            over = f.measured - f.analytic if f.analytic is not None else None
            rows.append(
                [
                    w.name,
                    str(f.after_round),
                    str(f.rank),
                    _bytes(f.measured),
                    _bytes(f.analytic) if f.analytic is not None else "-",
                    _bytes(over) if over is not None else "-",
                    f"{100 * over / f.measured:.3f} %" if over is not None else "-",
                    f"{f.seconds:.3f}",
                ]
            )
    text = _md(head, rows)
    return text + ("\n\n" + "\n".join(notes) if notes else "")


NOTES = """wall s: the largest per-rank sum of /rounds/round_s (training wall); job s: the whole \
launcher command. ckpt s rank 0: sum of rank 0's /rounds/checkpoint_s (writing the files and \
committing the manifest: the cost on the critical path); ckpt s max rank: the largest rank's \
sum (its own file; the per-round stop-flag agreement's wait is in gather_s). ckpt s / wall: \
rank 0's share, mean over runs. on − off wall: difference of the mean wall times, relative to \
off. Bytes: file bytes = /rounds/checkpoint_bytes; analytic block bytes = bytes of the blocks \
the rank held with version > 0 (/blocks and the Snake P2P rule); overhead = the rest of the \
file (header, versions, random states, counters). ckpt s of a file row: that rank's \
checkpoint_s in the round after the checkpoint."""


def opt_refusal(dtype: str, ranks: int) -> str:
    """Why an OPT-1.3B run would not finish here ("" if it should)."""
    if dtype == "bf16" and not cpu_has_bf16():
        return (
            "this CPU has no bfloat16 matrix instructions (avx512_bf16, amx_bf16): one "
            "OPT-1.3B step would take about an hour; --llm-dtype fp32 --llm-ranks 2 instead"
        )
    need, have = opt_memory_gib(dtype, ranks), available_gib()
    if have < need:
        return f"{have:.1f} GiB available, about {need:.0f} GiB needed; fewer --llm-ranks"
    return ""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--out", required=True, help="directory for result files, logs and tables")
    ap.add_argument("--parts", default="demo,llm", help="comma-separated: demo, llm")
    ap.add_argument("--rounds", type=int, default=20, help="rounds of the demo runs (20)")
    ap.add_argument(
        "--reps", type=int, default=None, help="demo runs on and off each (2; --quick: 1)"
    )
    ap.add_argument("--llm-reps", type=int, default=1, help="LLM runs on and off each (1)")
    ap.add_argument("--llm-ranks", type=int, default=4, help="ranks of the LLM runs (4)")
    ap.add_argument(
        "--llm-dtype",
        choices=("bf16", "fp32"),
        default="bf16",
        help="OPT-1.3B weights: bf16 (opt-1.3b-snake-bf16.toml) or fp32 (opt-1.3b-snake.toml; "
        "4.9 GiB a rank: 2 ranks on 24 GiB)",
    )
    ap.add_argument("--quick", "--tiny", action="store_true", help="a fast check (see above)")
    ap.add_argument(
        "--force",
        action="store_true",
        help="run OPT-1.3B even if memory looks short or the CPU lacks bf16 instructions",
    )
    args = ap.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 2
    args.parts = {p.strip() for p in args.parts.split(",") if p.strip()}
    if not args.parts <= {"demo", "llm"}:
        ap.error("--parts takes demo and/or llm")
    if args.rounds <= DEFAULT_EVERY and not args.quick:
        ap.error(f"--rounds must exceed the default every = {DEFAULT_EVERY} to checkpoint")
    if min(args.reps, args.llm_reps) < 1 or args.llm_ranks < 2:
        ap.error("--reps and --llm-reps must be >= 1, --llm-ranks >= 2")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    env["OMP_NUM_THREADS"] = "1"

    runs = schedule(workloads(args), out)
    for run in runs:
        if run.workload.name.startswith("opt-") and not is_complete(run.path) and not args.force:
            why = opt_refusal(args.llm_dtype, run.workload.ranks)
            if why:
                print(f"== {run.label}: skipped: {why} (or --force) ==")
                run.status = "skipped"
                continue
        measure(run, env)
        if run.status.startswith("done"):
            run.result = read_result(run.path)

    text = "\n\n".join(
        [
            "== runs (in the order made) ==\n" + runs_table(runs),
            "== checkpoint cost ==\n" + cost_table(runs),
            "== checkpoint bytes per rank (first 'on' run) ==\n" + bytes_table(runs),
            NOTES,
        ]
    )
    print("\n" + text)
    (out / "checkpoint.md").write_text(text + "\n")
    print(f"\ntables written to {out / 'checkpoint.md'}")
    return 1 if any(r.status.startswith("failed") for r in runs) else 0


if __name__ == "__main__":
    sys.exit(main())
