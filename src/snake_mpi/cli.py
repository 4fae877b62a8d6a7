"""The ``snake-mpi`` command: argument parsing and a table of commands (``COMMANDS``); the work
is done in run.py, store.py, analysis/ and the other modules each command names."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

from snake_mpi.config import EXIT_CONFIG, ConfigError
from snake_mpi.schemes.rules import checked_config, validate_for_world


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="snake-mpi",
        description="Snake Learning and its baselines as MPI jobs, measured per rank per round.",
    )
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    subs = {
        name: sub.add_parser(name, help=text, add_help=name in _OWN_PARSERS)
        for name, (_function, text) in COMMANDS.items()
    }
    run = subs["run"]
    _config_arguments(run)
    run.add_argument("--out", required=True, help="result file (HDF5) to write")
    _memory_argument(run)
    run.add_argument("--overwrite", action="store_true", help="replace an existing result file")
    run.add_argument(
        "--resume",
        action="store_true",
        help="continue after the newest checkpoint of this run (OUT.partial and its "
        "[checkpoint] dir); start from round 1 if there is none; exit 0 at once if OUT is "
        "complete. A run stopped by SIGUSR1 exits 75 after its checkpoint",
    )

    val = subs["validate"]
    val.description = (
        "Check a run configuration as `run` does before it starts (keys, values, data), "
        "without MPI; exit 0 if valid, 2 with the reason if not."
    )
    _config_arguments(val)
    val.add_argument(
        "--np",
        type=int,
        default=None,
        help="check it for this many ranks, all on this host, with the checks that depend on "
        "the rank count (default: only the memory and data checks, for the fewest ranks the "
        "scheme runs on)",
    )
    _memory_argument(val)
    val.add_argument(
        "--no-data",
        action="store_true",
        help="check the config only, not its data (by default the data are read and checked "
        "in full, as `run` does before it starts)",
    )
    subs["show"].add_argument("result", help="result file written by `snake-mpi run`")
    return p


_OWN_PARSERS = ("run", "validate", "show")
"""The commands whose arguments this parser reads; the others parse their own."""


def _config_arguments(p: argparse.ArgumentParser) -> None:
    """The config file and its ``--set`` overrides (``run`` and ``validate`` take the same)."""
    p.add_argument("config", help="TOML run configuration, e.g. bench/configs/demo.toml")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set train.rounds=3 (repeatable)",
    )


def _size(text: str) -> int:
    from snake_mpi.resources import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _memory_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--max-memory",
        type=_size,
        default=None,
        metavar="SIZE",
        help="memory the run's ranks on one host may use together, e.g. 16GiB (default: what "
        "the host has available, within its control group and ulimit -v); a config whose "
        "estimate exceeds it is refused with exit 2",
    )


def _version() -> str:
    """The installed snake-mpi version (package metadata), "unknown" when not installed."""
    from snake_mpi.provenance import dist_version

    return dist_version("snake-mpi")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and dispatch; returns the process exit status. Output cut short by its
    reader (``snake-mpi compare DIR | head``) ends quietly, as other command-line tools do."""
    try:
        code = _main(argv)
        sys.stdout.flush()  # a closed pipe shows here, not in an "Exception ignored" at exit
        return code
    except BrokenPipeError:
        import os

        devnull = os.open(os.devnull, os.O_WRONLY)  # no second error when Python flushes stdout
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what the shell reports for a program killed by it


def _main(argv: list[str] | None) -> int:
    """Parse the command's name and dispatch the rest of the line to it (``COMMANDS``)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    name = argv[0] if argv else ""
    if name not in COMMANDS:
        args = _parser().parse_args(argv)  # --help, --version and usage errors exit here
        name, argv = args.command, argv[argv.index(args.command) :]
    function, _help = COMMANDS[name]
    return function(argv[1:])


def _run(argv: list[str]) -> int:
    """``snake-mpi run``: on every rank, the checked config, then ``run.main``."""
    early_usr1 = _note_usr1()
    args = _parser().parse_args(["run", *argv])
    from snake_mpi.data import DataError

    try:
        cfg = checked_config(args.config, args.overrides)
    except (ConfigError, DataError) as e:
        return _config_error("run", e)
    if cfg.checkpoint.every == 0:
        _usr1_as_default(early_usr1)  # no checkpoints: SIGUSR1 ends the rank, as it would later
    from snake_mpi import run  # initialises MPI

    if cfg.checkpoint.every > 0:
        from snake_mpi.checkpoint import install_stop_handler, request_stop

        install_stop_handler()
        if early_usr1:
            request_stop()
    return run.main(
        cfg, args.out, overwrite=args.overwrite, resume=args.resume, max_memory=args.max_memory
    )


def _validate_command(argv: list[str]) -> int:
    """``snake-mpi validate``: the checks ``run`` makes before it starts, without MPI."""
    args = _parser().parse_args(["validate", *argv])
    from snake_mpi.data import DataError

    try:
        cfg = checked_config(args.config, args.overrides)
        estimate = _validate(cfg, args)
    except (ConfigError, DataError) as e:
        return _config_error("validate", e)
    print(f"snake-mpi: {args.config}: {_validated(cfg, args, estimate)}")
    return 0


def _config_error(command: str, error: Exception) -> int:
    """A refused config: ``validate`` and rank 0 of ``run`` say why; every rank of a run
    exits ``EXIT_CONFIG`` once rank 0 has said it."""
    if command == "validate" or _is_rank0():
        print(f"snake-mpi: config error: {error}", file=sys.stderr, flush=True)
    if command == "run" and _launched_size() > 1:
        from snake_mpi.transport.mpi import world

        world.settle()
    return EXIT_CONFIG


def _show(argv: list[str]) -> int:
    """``snake-mpi show``: a readable summary of one result file (exit 1 if it is none)."""
    args = _parser().parse_args(["show", *argv])
    from snake_mpi.analysis.summary import format_summary
    from snake_mpi.store import ResultError, partial_path, read_result, result_paths

    try:
        print(format_summary(read_result(args.result, allow_incomplete=True)))
        _print_stop_note(args.result)
    except ResultError as e:
        hint = ""
        if e.path.is_dir():
            found = result_paths([e.path])
            hint = (
                f"; name one of its {len(found)} result file(s) (e.g. {found[0]}), or "
                f"compare them with `snake-mpi compare {e.path}`"
                if found
                else "; it holds no result files (*.h5, *.hdf5, *.partial)"
            )
        elif not e.path.exists() and partial_path(e.path).is_file():
            hint = (
                f"; {partial_path(e.path)} is there (a run still writing it, or one that"
                f" stopped): `snake-mpi show {partial_path(e.path)}`"
            )
        print(f"snake-mpi: {e}{hint}", file=sys.stderr)
        return 1
    return 0


def _compare(argv: list[str]) -> int:
    from snake_mpi.analysis.compare import main

    return main(argv)


def _report(argv: list[str]) -> int:
    from snake_mpi.analysis.report import main

    return main(argv)


def _launch(argv: list[str]) -> int:
    from snake_mpi.launch import main

    return main(argv)


def _memory(argv: list[str]) -> int:
    from snake_mpi.analysis.memory_accounting import main

    return main(argv)


def _export(argv: list[str]) -> int:
    from snake_mpi.analysis.export import main

    return main(argv)


def _suite(argv: list[str]) -> int:
    from snake_mpi.suite import main

    return main(argv)


def _validate_ranks(cfg: Any, args: argparse.Namespace) -> int:
    """Ranks ``validate`` checks for: ``--np``, else the fewest the scheme runs on."""
    from snake_mpi.schemes.registry import scheme_spec

    return args.np if args.np is not None else max(1, scheme_spec(cfg.scheme).min_ranks)


def _validate(cfg: Any, args: argparse.Namespace) -> Any:
    """``validate``'s checks, as ``run`` makes them before it starts: with ``--np``, the
    world-size checks; the memory of that many ranks on this host (the scheme's fewest without
    ``--np``), each also needing this process's baseline; the data, read in full. Returns the
    memory estimate."""
    import psutil

    from snake_mpi.resources import check_memory
    from snake_mpi.run import load_checked

    n = _validate_ranks(cfg, args)
    if args.np is not None:
        validate_for_world(cfg, n)
    estimate = check_memory(
        cfg,
        n,
        ranks_on_host=n,
        max_memory_bytes=args.max_memory,
        runtime_bytes=int(psutil.Process().memory_info().rss),
    )
    if not args.no_data:
        load_checked(cfg, n)
    return estimate


def _validated(cfg: Any, args: argparse.Namespace, estimate: Any) -> str:
    """``validate``'s verdict: for how many ranks, and the memory they need on one host."""
    from snake_mpi.resources import format_bytes

    n = _validate_ranks(cfg, args)
    ranks = f"{n} rank{'s' if n != 1 else ''}"
    memory = f"about {format_bytes(estimate.ranks_bytes(n))} of memory for {ranks} on one host"
    data = "" if args.no_data else ", data read and checked"
    if args.np is not None:
        return f"valid for {ranks} ({memory}{data})"
    return (
        f"valid for {ranks}, the fewest scheme {cfg.scheme!r} runs on ({memory}{data}); the "
        f"checks that depend on the number of ranks were not made: --np N checks it for N ranks"
    )


def _note_usr1() -> list[int]:
    """Until the run knows whether it takes checkpoints, SIGUSR1 (Slurm's ``--signal``, passed
    on by the launcher) is noted, not fatal: installed before torch and MPI are imported (the
    first seconds of a rank's life), so that a signal then is kept for the first round end,
    as one later is."""
    import signal

    noted: list[int] = []
    signal.signal(signal.SIGUSR1, lambda _s, _f: noted.append(1))
    return noted


def _usr1_as_default(noted: list[int]) -> None:
    """Without checkpoints SIGUSR1 has its default action again; one noted during start-up
    takes it now."""
    import os
    import signal

    signal.signal(signal.SIGUSR1, signal.SIG_DFL)
    if noted:
        os.kill(os.getpid(), signal.SIGUSR1)


def _print_stop_note(result: str) -> None:
    """The line a run stopped by a signal left beside its output (``run.stop_note_path``)."""
    from pathlib import Path

    out = result.removesuffix(".partial")
    note = Path(f"{out}.stopped")
    if Path(result).name.endswith(".partial") and note.is_file():
        print(note.read_text().strip())


def _launched_size() -> int:
    """The job size the launcher announced in the environment (1 when not under one)."""
    import os

    for var in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var, "").isdigit():
            return int(os.environ[var])
    return 1


def _is_rank0() -> bool:
    """Rank 0 of an mpirun/srun job (from the launcher's environment; MPI is not started yet)."""
    import os

    for var in ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID"):
        if var in os.environ:
            return os.environ[var] == "0"
    return True


COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "run": (_run, "run a config under mpirun (every rank runs this)"),
    "validate": (_validate_command, "check a config without running it"),
    "show": (_show, "print a readable summary of a result file"),
    "compare": (_compare, "compare result files side by side (see `snake-mpi compare --help`)"),
    "report": (
        _report,
        "Markdown + HTML report with figures from result files (`snake-mpi report --help`)",
    ),
    "launch": (
        _launch,
        "run a command on N ranks with srun or mpirun (`snake-mpi launch --help`)",
    ),
    "memory": (
        _memory,
        "training-state memory per scheme and node vs the paper (`snake-mpi memory --help`)",
    ),
    "export": (
        _export,
        "every figure of result files as one long CSV/Parquet table, one row per "
        "(file, source, round, rank, metric) (`snake-mpi export --help`)",
    ),
    "suite": (_suite, "run a benchmark suite, resumable (see `snake-mpi suite --help`)"),
}
"""Every command: name -> (its function of the rest of the command line, returning the exit
status; its line in ``snake-mpi --help``), in the order the help lists them."""


if __name__ == "__main__":
    sys.exit(main())
