"""Benchmark suites: a matrix of configs x rank counts x seeds, each cell its own MPI job with a
time bound, one result file per cell, a manifest, resumable, and a failed cell recorded
without stopping the suite.

A suite is a TOML file (``bench/suites/<name>.toml``)::

    configs = ["bench/configs/schemes/snake-p2p.toml", ...]   # relative to the repository;
                                 # "file.toml@5" runs that config on 5 ranks only
    ranks = [4]                  # every other config at every count (centralised: 1 rank)
    seeds = [0]
    set = ["train.rounds=2"]     # overrides for every cell
    time_limit_s = 900           # per cell

``snake-mpi suite NAME|FILE --out DIR`` (or ``python bench/suite.py``) runs it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snake_mpi.config import ConfigError, load_config
from snake_mpi.launch import launcher
from snake_mpi.store import is_complete

REPO = Path(__file__).resolve().parents[2]
SUITES = REPO / "bench" / "suites"
MANIFEST = "manifest.json"


@dataclass(frozen=True, slots=True)
class Cell:
    """One run of a suite."""

    name: str
    config: str
    ranks: int
    seed: int
    overrides: tuple[str, ...] = ()


@dataclass(slots=True)
class Outcome:
    """What became of a cell (the manifest holds one per cell)."""

    status: str
    """``complete``, ``skipped`` (a complete result was already there) or ``failed``."""
    result: str
    ranks: int
    seed: int
    config: str
    exit_code: int | None = None
    elapsed_s: float = 0.0
    stderr_tail: str = ""
    command: list[str] = field(default_factory=list)


def suite_path(name: str) -> Path:
    """A suite by name (``bench/suites/<name>.toml``) or by path."""
    p = Path(name)
    if p.suffix == ".toml" and p.exists():
        return p
    p = SUITES / f"{name}.toml"
    if not p.exists():
        known = ", ".join(sorted(q.stem for q in SUITES.glob("*.toml")))
        raise ConfigError(f"unknown suite {name!r}; known: {known}")
    return p


def load_suite(name: str) -> tuple[list[Cell], float]:
    """The cells of a suite and its per-cell time limit in seconds."""
    path = suite_path(name)
    raw = tomllib.loads(path.read_text())
    unknown = sorted(set(raw) - {"configs", "ranks", "seeds", "set", "time_limit_s"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}")
    cells: list[Cell] = []
    overrides = tuple(raw.get("set", []))
    for entry in raw["configs"]:
        config, _, at = entry.partition("@")  # "file.toml@5": this config on 5 ranks only
        cfg_path = REPO / config if not Path(config).is_absolute() else Path(config)
        cfg = load_config(cfg_path, list(overrides))
        counts = [int(at)] if at else raw.get("ranks", [4])
        if cfg.scheme == "centralised":
            counts = [1]
        for n in counts:
            for seed in raw.get("seeds", [0]):
                name_ = f"{Path(config).stem}-n{n}-s{seed}"
                cells.append(Cell(name_, str(cfg_path), int(n), int(seed), overrides))
    return cells, float(raw.get("time_limit_s", 900))


def update_manifest(out_dir: Path, suite: str, name: str, outcome: Outcome) -> None:
    """Merge one cell's outcome into ``manifest.json`` under an exclusive lock, so that the
    tasks of a Slurm job array can update it at the same time; written atomically."""
    import fcntl

    path = out_dir / MANIFEST
    with open(out_dir / (MANIFEST + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            manifest = {"cells": {}}
        manifest["suite"] = suite
        manifest.setdefault("cells", {})[name] = asdict(outcome)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


def run_cell(cell: Cell, out_dir: Path, time_limit_s: float) -> Outcome:
    """Run one cell as its own MPI job, killed (the whole process group) at the time limit."""
    result = out_dir / f"{cell.name}.h5"
    exe = Path(sys.executable).parent / "snake-mpi"
    argv = [str(exe) if exe.exists() else "snake-mpi", "run", cell.config, "--out", str(result)]
    argv += ["--overwrite", "--set", f"seed={cell.seed}"]
    for o in cell.overrides:
        argv += ["--set", o]
    cmd = launcher(cell.ranks, argv)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    log = out_dir / f"{cell.name}.log"
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.PIPE, text=True, env=env, start_new_session=True
        )
        try:
            _, err = proc.communicate(timeout=time_limit_s)
            code: int | None = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            _, err = proc.communicate()
            code = None
            err += f"\nsuite: killed at the time limit of {time_limit_s:g} s"
    elapsed = time.perf_counter() - t0
    ok = code == 0 and is_complete(result)
    return Outcome(
        status="complete" if ok else "failed",
        result=result.name,
        ranks=cell.ranks,
        seed=cell.seed,
        config=cell.config,
        exit_code=code,
        elapsed_s=round(elapsed, 3),
        stderr_tail="" if ok else err[-2000:],
        command=cmd,
    )


def run_suite(
    name: str, out_dir: Path, *, dry_run: bool = False, only: int | None = None
) -> dict[str, Outcome]:
    """Run every cell not already complete (``only``: just cell number ``only``, 0-based, as a
    Slurm array task does); update the manifest after each; print progress."""
    cells, limit = load_suite(name)
    if only is not None:
        if not 0 <= only < len(cells):
            raise ConfigError(
                f"cell {only} does not exist: suite {name!r} has {len(cells)} cells "
                f"(0..{len(cells) - 1})"
            )
        cells = [cells[only]]
    out_dir.mkdir(parents=True, exist_ok=True)
    outcomes: dict[str, Outcome] = {}
    t_start = time.perf_counter()
    ran_s: list[float] = []
    for i, cell in enumerate(cells, 1):
        result = out_dir / f"{cell.name}.h5"
        if is_complete(result):
            outcomes[cell.name] = Outcome(
                "skipped", result.name, cell.ranks, cell.seed, cell.config
            )
        elif dry_run:
            print(f"suite: would run {cell.name}: {' '.join(launcher(cell.ranks, ['...']))}")
            continue
        else:
            outcomes[cell.name] = run_cell(cell, out_dir, limit)
            ran_s.append(outcomes[cell.name].elapsed_s)
        o = outcomes[cell.name]
        left = len(cells) - i
        eta = f", about {left * sum(ran_s) / len(ran_s):.0f} s left" if ran_s and left else ""
        print(
            f"suite: [{i}/{len(cells)}] {cell.name}: {o.status}"
            + (f" (exit {o.exit_code})" if o.status == "failed" else "")
            + f", {time.perf_counter() - t_start:.0f} s elapsed{eta}",
            flush=True,
        )
        update_manifest(out_dir, str(suite_path(name)), cell.name, o)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """``snake-mpi suite``: exit 0 if every cell is complete, 1 if any failed, 2 on a bad suite."""
    import argparse

    p = argparse.ArgumentParser(prog="suite", description="Run a benchmark suite (resumable).")
    p.add_argument("suite", help="a name under bench/suites/ (smoke, scaling, ...) or a file")
    p.add_argument("--out", required=True, help="output directory (results, logs, manifest)")
    p.add_argument("--dry-run", action="store_true", help="list the cells to run, run nothing")
    p.add_argument(
        "--cell",
        type=int,
        default=None,
        metavar="K",
        help="run only cell K (0-based; a Slurm array task: --cell $SLURM_ARRAY_TASK_ID)",
    )
    p.add_argument("--count", action="store_true", help="print the number of cells and exit")
    p.add_argument("--list", action="store_true", help="print the cells, numbered, and exit")
    args = p.parse_args(argv)
    if args.count or args.list:
        try:
            cells, _ = load_suite(args.suite)
        except (ConfigError, KeyError, tomllib.TOMLDecodeError) as e:
            print(f"suite: {e}", file=sys.stderr)
            return 2
        if args.count:
            print(len(cells))
        else:
            for k, c in enumerate(cells):
                print(f"{k} {c.name} ranks={c.ranks} seed={c.seed} {c.config}")
        return 0
    try:
        outcomes = run_suite(args.suite, Path(args.out), dry_run=args.dry_run, only=args.cell)
    except (ConfigError, KeyError, tomllib.TOMLDecodeError) as e:
        print(f"suite: {e}", file=sys.stderr)
        return 2
    failed = [k for k, o in outcomes.items() if o.status == "failed"]
    for k in failed:
        print(f"suite: FAILED {k}: see {Path(args.out) / (k + '.log')} and {MANIFEST}")
    return 1 if failed else 0
