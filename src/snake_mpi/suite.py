"""Benchmark suites: a matrix of configs x rank counts x seeds, each cell its own MPI job with a
time bound, one result file per cell, a manifest, resumable, and a failed cell recorded
without stopping the suite.

A suite is a TOML file (``bench/suites/<name>.toml``)::

    configs = ["bench/configs/schemes/snake-p2p.toml", ...]   # relative to the repository;
                                 # "file.toml@5" runs that config on 5 ranks only; or a table
                                 # {config = "file.toml@5", label = "name", set = ["k=v"]}:
                                 # the label names its cells, its overrides come after `set`
    ranks = [4]                  # every other config at every count (centralised: 1 rank)
    seeds = [0]
    set = ["train.rounds=2"]     # overrides for every cell
    time_limit_s = 900           # per cell

``snake-mpi suite NAME|FILE --out DIR`` (or ``python bench/suite.py``) runs it.

Each cell runs with ``--resume``: a cell that was stopped after a checkpoint (SIGUSR1, or a
crash after one) continues from it when the suite runs again, and a complete cell is skipped.
SIGUSR1 to the suite (``slurm/suite.sbatch`` passes Slurm's ``--signal=B:USR1`` on) is passed on
to the running cell, whose ranks checkpoint at the end of their round and exit 75; the suite
then starts no further cell and exits 75 (``EXIT_CHECKPOINTED``) while work is left.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

from snake_mpi.config import ConfigError
from snake_mpi.launch import launcher
from snake_mpi.schemes.registry import scheme_spec
from snake_mpi.schemes.rules import checked_config
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
    rounds: int = 1
    """The config's ``train.rounds``: with ``ranks``, the cell's size for time estimates."""


@dataclass(slots=True)
class Outcome:
    """What became of a cell (the manifest holds one per cell)."""

    status: str
    """``complete``, ``skipped`` (a complete result was already there; the manifest keeps the
    record of the run that made it, see ``update_manifest``), ``failed``, or
    ``interrupted`` (the suite got TERM/INT while the cell ran, or the cell stopped after a
    checkpoint, exit code 75, on SIGUSR1; it runs again, from that checkpoint, on resume)."""
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


def _int_list(path: Path, raw: dict, key: str, default: list[int], low: int, high: int) -> list:
    values = raw.get(key, default)
    ok = isinstance(values, list) and bool(values)
    ok = ok and all(isinstance(v, int) and not isinstance(v, bool) for v in values)
    if not ok or not all(low <= v < high for v in values):
        bound = f"integers >= {low}" if high == 2**63 else f"integers in [{low}, {high})"
        raise ConfigError(f"{path}: {key} must be a list of {bound}, got {values!r}")
    return values


def _str_list(path: Path, raw: dict, key: str, default: list[str]) -> list[str]:
    values = raw.get(key, default)
    if not (isinstance(values, list) and all(isinstance(v, str) for v in values)):
        raise ConfigError(f"{path}: {key} must be a list of strings, got {values!r}")
    return values


def _entries(path: Path, raw: dict) -> list[tuple[str, str, tuple[str, ...]]]:
    """``configs``: each a string ``"file.toml[@ranks]"`` or a table with ``config``, an
    optional ``label`` (its cells' names; default the file's stem) and ``set`` (overrides)."""
    values = raw.get("configs", [])
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{path}: configs must list at least one config file")
    out: list[tuple[str, str, tuple[str, ...]]] = []
    for v in values:
        if isinstance(v, str):
            out.append((v, "", ()))
            continue
        bad = sorted(set(v) - {"config", "label", "set"}) if isinstance(v, dict) else None
        if bad is None or bad or not isinstance(v.get("config"), str):
            what = f"unknown key {bad[0]!r}" if bad else 'needs config = "file.toml"'
            raise ConfigError(f"{path}: configs entry {v!r}: {what}")
        label, sets = v.get("label", ""), v.get("set", [])
        ok_label = isinstance(label, str) and all(c.isalnum() or c in "-_." for c in label)
        if not ok_label:
            raise ConfigError(f"{path}: label {label!r}: letters, digits, '-', '_' and '.' only")
        if not (isinstance(sets, list) and all(isinstance(x, str) for x in sets)):
            raise ConfigError(f"{path}: {label or v['config']}: set must be a list of strings")
        out.append((v["config"], label, tuple(sets)))
    return out


def load_suite(name: str) -> tuple[list[Cell], float]:
    """The cells of a suite and its per-cell time limit in seconds (``ConfigError`` naming the
    file and key for anything malformed)."""
    path = suite_path(name)
    try:
        raw = tomllib.loads(path.read_text())
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"{path}: not a readable TOML suite: {e}") from None
    unknown = sorted(set(raw) - {"configs", "ranks", "seeds", "set", "time_limit_s"})
    if unknown:
        raise ConfigError(f"{path}: unknown key {unknown[0]!r}")
    configs = _entries(path, raw)
    ranks = _int_list(path, raw, "ranks", [4], 1, 2**63)
    seeds = _int_list(path, raw, "seeds", [0], 0, 2**63)
    overrides = tuple(_str_list(path, raw, "set", []))
    limit = raw.get("time_limit_s", 900)
    if isinstance(limit, bool) or not isinstance(limit, int | float) or not 0 < limit < 1e9:
        raise ConfigError(f"{path}: time_limit_s must be a positive number, got {limit!r}")
    cells: list[Cell] = []
    for entry, label, extra in configs:
        config, _, at = entry.partition("@")  # "file.toml@5": this config on 5 ranks only
        if at and not (at.isdigit() and int(at) >= 1):
            raise ConfigError(f"{path}: {entry!r}: the rank count after @ must be an integer >= 1")
        cfg_path = REPO / config if not Path(config).is_absolute() else Path(config)
        sets = (*overrides, *extra)
        try:
            cfg = checked_config(cfg_path, list(sets))
        except ConfigError as e:
            raise ConfigError(f"{path}: {label or entry}: {e}") from None
        counts = [int(at)] if at else ranks
        spec = scheme_spec(cfg.scheme)
        if spec.min_ranks == spec.max_ranks:  # e.g. centralised: one rank whatever the suite says
            counts = [spec.min_ranks]
        for n in counts:
            for seed in seeds:
                name_ = f"{label or Path(config).stem}-n{n}-s{seed}"
                cells.append(Cell(name_, str(cfg_path), int(n), int(seed), sets, cfg.train.rounds))
    names = [c.name for c in cells]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ConfigError(f"{path}: two cells would be named {twice[0]!r}: give them labels")
    return cells, float(limit)


def update_manifest(out_dir: Path, suite: str, name: str, outcome: Outcome) -> None:
    """Merge one cell's outcome into ``manifest.json`` under an exclusive lock, so that the
    tasks of a Slurm job array can update it at the same time; written atomically. A cell
    skipped because its result is complete keeps the record of the run that made it (status,
    exit code, time, command) and gains the time of the skip in ``skipped_at``."""
    import fcntl

    path = out_dir / MANIFEST
    with open(out_dir / (MANIFEST + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            manifest = json.loads(path.read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            manifest = {"cells": {}}
        manifest["suite"] = suite
        cells = manifest.setdefault("cells", {})
        old = cells.get(name)
        kept = isinstance(old, dict) and old.get("status") == "complete"
        if outcome.status == "skipped" and kept:
            # the run that made the result keeps its record; the rerun only notes it looked
            now = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
            old["skipped_at"] = [*old.get("skipped_at", []), now]
        else:
            cells[name] = asdict(outcome)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, path)


GRACE_S = 10.0
"""After a TERM/INT is forwarded to a running cell, how long it may take to end before the
rest of its processes are killed."""


class Interrupted(Exception):
    """The suite got SIGTERM or SIGINT (Slurm's time limit, Ctrl-C)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum
        self.outcome: Outcome | None = None
        """The interrupted cell's outcome, once ``run_cell`` has recorded it."""


def _raise_interrupted(signum: int, _frame: object) -> None:
    raise Interrupted(signum)


EXIT_CHECKPOINTED = 75
"""The cells' exit status after a checkpoint taken on SIGUSR1 (``checkpoint.EXIT_CHECKPOINTED``),
and the suite's when it stopped on SIGUSR1 with work left: run it again to resume."""


class _Stop:
    """SIGUSR1 to the suite: set ``asked``, and pass the signal on to the running cell's
    launcher (srun and Open MPI's mpirun pass it on to the ranks), which is not waited for
    here: ``run_cell`` goes on waiting for the cell to end (a round and a checkpoint)."""

    asked = False
    cell: subprocess.Popen | None = None

    @classmethod
    def handler(cls, _signum: int, _frame: object) -> None:
        cls.asked = True
        cell = cls.cell
        if cell is not None and cell.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                cell.send_signal(signal.SIGUSR1)


def stop_requested() -> bool:
    """Whether the suite got SIGUSR1 (it starts no further cell)."""
    return _Stop.asked


def resume_flag(cell: Cell, result: Path) -> tuple[str, str]:
    """``--resume``, unless the cell's newest checkpoint is of another run (its config or the
    suite's overrides changed since): then ``--overwrite``, which starts the cell again and
    removes that checkpoint. Returns the flag and a note for the log ("" if none)."""
    from snake_mpi.checkpoint import manifest as mf

    try:
        cfg = checked_config(Path(cell.config), [f"seed={cell.seed}", *cell.overrides])
    except ConfigError:
        return "--resume", ""  # the run says what is wrong (exit 2)
    try:
        found = mf.committed(mf.checkpoint_dir(cfg, result))
        if found:
            folder = found[0][1]
            mf.check_same_run(mf.read_manifest(folder), folder, cfg, cell.ranks)
    except ConfigError as e:
        return "--overwrite", f"starting again: {e}"
    except (OSError, ValueError):
        pass  # an unreadable manifest: the run itself skips it for an older one, or starts over
    return "--resume", ""


def run_cell(cell: Cell, out_dir: Path, time_limit_s: float) -> Outcome:
    """Run one cell as its own MPI job, with ``--resume`` (``resume_flag``). At the time limit
    the whole job ends (launcher, ranks, orphans: ``proctree.end_job``); on TERM/INT
    (``Interrupted``) the signal is forwarded to the launcher, the job gets ``GRACE_S`` to end,
    the rest is killed, and ``Interrupted`` propagates with the outcome attached
    (``.outcome``). On SIGUSR1 (``_Stop``) the cell is waited for as before, up to the time
    limit: its ranks checkpoint and exit 75, an "interrupted" outcome."""
    from snake_mpi.proctree import end_job

    result = out_dir / f"{cell.name}.h5"
    exe = Path(sys.executable).parent / "snake-mpi"
    argv = [str(exe) if exe.exists() else "snake-mpi", "run", cell.config, "--out", str(result)]
    flag, flag_note = resume_flag(cell, result)
    argv += [flag, "--set", f"seed={cell.seed}"]
    for o in cell.overrides:
        argv += ["--set", o]
    cmd = launcher(cell.ranks, argv)
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    log = out_dir / f"{cell.name}.log"
    t0 = time.perf_counter()
    status, note, interrupted, timed_out = "", "", None, False
    again = log.exists() and log.stat().st_size > 0
    with log.open("a") as out, tempfile.TemporaryFile("w+") as err:  # an earlier try's log stays
        if again or flag_note:
            why = f": {flag_note}" if flag_note else ""
            when = time.strftime("%Y-%m-%d %H:%M:%S")
            print(f"suite: {when} {cell.name}: runs again with {flag}{why}", file=out, flush=True)
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, start_new_session=True)
        _Stop.cell = proc
        try:
            try:
                proc.wait(timeout=time_limit_s)
            except subprocess.TimeoutExpired:
                killed = end_job(proc)
                timed_out = True
                note = f"\nsuite: killed at the time limit of {time_limit_s:g} s"
                note += f" ({len(killed)} process(es) needed SIGKILL)" if killed else ""
        except Interrupted as e:
            interrupted = e
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(e.signum)  # mpirun and srun pass it on to the ranks
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=GRACE_S)
            end_job(proc, grace_s=1.0)
            status = "interrupted"
            note = f"\nsuite: interrupted by {e}; the cell's processes were ended"
        finally:
            _Stop.cell = None
        err.seek(0)
        tail = err.read()[-2000:] + note
    code = None if timed_out else proc.returncode
    elapsed = time.perf_counter() - t0
    ok = code == 0 and is_complete(result)
    if code == EXIT_CHECKPOINTED and not status:
        status = "interrupted"
        tail += "\nsuite: the cell stopped after a checkpoint (exit 75); it resumes from it"
    outcome = Outcome(
        status=status or ("complete" if ok else "failed"),
        result=result.name,
        ranks=cell.ranks,
        seed=cell.seed,
        config=cell.config,
        exit_code=code,
        elapsed_s=round(elapsed, 3),
        stderr_tail="" if ok else tail[-2000:],
        command=cmd,
    )
    if interrupted is not None:
        interrupted.outcome = outcome
        raise interrupted
    return outcome


class Stopped(Exception):
    """The suite stopped on SIGUSR1 with cells left to run (or to resume)."""


def run_suite(
    name: str, out_dir: Path, *, dry_run: bool = False, only: int | None = None
) -> dict[str, Outcome]:
    """Run every cell not already complete (``only``: just cell number ``only``, 0-based, as a
    Slurm array task does); update the manifest after each; print progress. After SIGUSR1 no
    further cell starts, and ``Stopped`` is raised if a cell is left undone."""
    cells, limit = load_suite(name)
    total, first = len(cells), only or 0
    if only is not None:
        if not 0 <= only < len(cells):
            raise ConfigError(
                f"cell {only} does not exist: suite {name!r} has {len(cells)} cells "
                f"(0..{len(cells) - 1})"
            )
        cells = [cells[only]]
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if not dry_run:
            held.enter_context(_own_directory(out_dir, whole=only is None))
        return _run_cells(name, cells, limit, out_dir, dry_run=dry_run, first=first, total=total)


SUITE_LOCK = "suite"
"""A whole suite owns its output directory by ``OUT/suite.lock`` (``outlock`` rules); a cell
being run (by the whole suite or by ``--cell``) is owned by ``OUT/NAME.cell.lock``."""


@contextlib.contextmanager
def _own_directory(out_dir: Path, *, whole: bool) -> Iterator[None]:
    """A whole suite takes ``OUT/suite.lock`` for its lifetime (``ConfigError`` naming the
    holder if another suite has it); ``--cell K`` (a Slurm array task, beside other tasks)
    takes no directory lock but refuses to run while a whole suite holds it."""
    from snake_mpi.outlock import Holder, LockError, OutputLock, read_holder, stale_reason

    lock = OutputLock(out_dir / SUITE_LOCK, owner="suite")
    if not whole:
        holder = read_holder(lock.path)
        if holder is not None and stale_reason(holder, Holder.me()) is None:
            raise ConfigError(
                f"{out_dir} is being run by a whole suite ({holder.describe()}); a cell runs "
                f"beside other cells only: wait for it, or use another --out"
            )
        yield
        return
    try:
        lock.acquire()
    except LockError as e:
        raise ConfigError(str(e)) from None
    if lock.took_over:
        print(f"suite: took over the stale lock {lock.path} ({lock.took_over})", flush=True)
    try:
        yield
    finally:
        lock.release()


def _run_cells(
    name: str,
    cells: list[Cell],
    limit: float,
    out_dir: Path,
    *,
    dry_run: bool,
    first: int,
    total: int,
) -> dict[str, Outcome]:
    """``run_suite``'s loop over its cells, the output directory owned; progress numbers the
    cells within the whole suite (``first``: the suite number of ``cells[0]``, of ``total``)."""
    from snake_mpi.outlock import LockError, OutputLock

    outcomes: dict[str, Outcome] = {}
    t_start = time.perf_counter()
    ran_s, ran_work = 0.0, 0  # seconds and size (ranks x rounds) of the cells run so far
    for i, cell in enumerate(cells, 1):
        at_k = f"[{first + i}/{total}]"
        result = out_dir / f"{cell.name}.h5"
        if is_complete(result):
            outcomes[cell.name] = Outcome(
                "skipped", result.name, cell.ranks, cell.seed, cell.config
            )
        elif dry_run:
            print(f"suite: would run {cell.name}: {' '.join(launcher(cell.ranks, ['...']))}")
            continue
        elif stop_requested():
            at = f"suite: {time.strftime('%H:%M:%S')} {at_k} {cell.name}"
            print(f"{at}: not started (SIGUSR1: the suite stops)", flush=True)
            raise Stopped(cell.name)
        else:
            cell_lock = OutputLock(out_dir / f"{cell.name}.cell", owner="suite")
            try:
                cell_lock.acquire()
            except LockError as e:  # another suite process runs this cell: not touched
                print(f"suite: {time.strftime('%H:%M:%S')} {at_k} {cell.name}: not "
                      f"run: {e}", flush=True)  # fmt: skip
                outcomes[cell.name] = Outcome(
                    "failed", result.name, cell.ranks, cell.seed, cell.config,
                    stderr_tail=f"not run: {e}",
                )  # fmt: skip
                continue
            print(
                f"suite: {time.strftime('%H:%M:%S')} {at_k} {cell.name}: started, "
                f"{cell.ranks} rank(s) x {cell.rounds} round(s), log {out_dir / cell.name}.log",
                flush=True,
            )
            try:
                outcomes[cell.name] = run_cell(cell, out_dir, limit)
            except Interrupted as e:
                if e.outcome is not None:
                    update_manifest(out_dir, str(suite_path(name)), cell.name, e.outcome)
                at = f"suite: {time.strftime('%H:%M:%S')} {at_k} {cell.name}"
                print(f"{at}: interrupted ({e})", flush=True)
                raise
            finally:
                cell_lock.release()
            ran_s += outcomes[cell.name].elapsed_s
            ran_work += cell.ranks * cell.rounds
        o = outcomes[cell.name]
        left = sum(c.ranks * c.rounds for c in cells[i:])  # weighted by size, not a plain mean
        eta = f", about {left * ran_s / ran_work:.0f} s left" if ran_work and left else ""
        print(
            f"suite: {time.strftime('%H:%M:%S')} {at_k} {cell.name}: {o.status}"
            + (f" (exit {o.exit_code})" if o.status == "failed" else "")
            + f", {time.perf_counter() - t_start:.0f} s elapsed{eta}",
            flush=True,
        )
        update_manifest(out_dir, str(suite_path(name)), cell.name, o)
        if o.status == "interrupted" and stop_requested():
            raise Stopped(cell.name)
    return outcomes


def main(argv: list[str] | None = None) -> int:
    """``snake-mpi suite``: exit 0 if every cell is complete, 1 if any failed, 2 on a bad suite,
    75 when SIGUSR1 stopped it with a cell left to run or to resume, 128 + N on TERM/INT."""
    import argparse

    p = argparse.ArgumentParser(
        prog="snake-mpi suite", description="Run a benchmark suite (resumable)."
    )
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
        except ConfigError as e:
            print(f"suite: {e}", file=sys.stderr)
            return 2
        if args.count:
            print(len(cells))
        else:
            for i, c in enumerate(cells):
                print(f"{i} {c.name} ranks={c.ranks} seed={c.seed} {c.config}")
        return 0
    _Stop.asked = False
    handlers = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGTERM, signal.SIGINT)}
    handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _Stop.handler)
    try:
        outcomes = run_suite(args.suite, Path(args.out), dry_run=args.dry_run, only=args.cell)
    except ConfigError as e:
        print(f"suite: {e}", file=sys.stderr)
        return 2
    except Stopped as e:
        print(
            f"suite: stopped by SIGUSR1 at {e}; completed cells are kept and a cell stopped "
            f"after a checkpoint resumes from it: run the suite again (exit {EXIT_CHECKPOINTED})",
            file=sys.stderr,
        )
        return EXIT_CHECKPOINTED
    except Interrupted as e:
        print(
            f"suite: stopped by {e}; completed cells are kept, run the suite again to resume",
            file=sys.stderr,
        )
        return 128 + e.signum
    finally:
        for s, h in handlers.items():
            signal.signal(s, h)
    failed = [k for k, o in outcomes.items() if o.status == "failed"]
    for k in failed:
        if outcomes[k].stderr_tail.startswith("not run: "):  # nothing of it in log or manifest
            print(f"suite: FAILED {k}: {outcomes[k].stderr_tail}")
        else:
            print(f"suite: FAILED {k}: see {Path(args.out) / (k + '.log')} and {MANIFEST}")
    stopped = [k for k, o in outcomes.items() if o.status == "interrupted"]
    for k in stopped:  # its ranks got SIGUSR1 from elsewhere: it checkpointed, exit 75
        print(f"suite: {k} stopped after a checkpoint: run the suite again to resume it")
    return EXIT_CHECKPOINTED if stopped else 1 if failed else 0
