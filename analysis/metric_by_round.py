"""One metric round by round, a column per run: an example of an analysis script built on the
long-format export (``snake_mpi.analysis.export``, the rows ``snake-mpi export`` writes).

    python analysis/metric_by_round.py RESULTS_DIR [RESULT.h5 ...] [--metric round_s]
        [--reduce mean|max|sum] [--out table.csv]

Reads every complete result file (a folder: its result files; the others are named on stderr
and left out) and writes a CSV with a row per round and a column per run, named by its path:
the ``/rounds`` metric (any per-round figure of docs/results-schema.md, e.g. ``round_s``,
``bytes_sent``, ``peak_rss_bytes``) reduced over the run's ranks. Without ``--out`` the table
is printed.
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import TextIO

from snake_mpi.analysis import export

REDUCE: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda v: math.fsum(v) / len(v),
    "max": max,
    "sum": math.fsum,
}


def by_round(
    paths: Iterable[str | Path], metric: str, reduce: str = "mean"
) -> dict[str, dict[int, float]]:
    """Run (its file, as found under ``paths``) -> round -> ``metric`` over the run's ranks,
    reduced by ``reduce``."""
    col = {name: i for i, name in enumerate(export.COLUMNS)}
    values: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))

    def skipped(path: Path, reason: str) -> None:
        print(f"skipped {path}: {reason}", file=sys.stderr)

    for row in export.rows(paths, on_skip=skipped):
        if row[col["source"]] == "rounds" and row[col["metric"]] == metric:
            run = str(row[col["file"]])
            values[run][int(row[col["round"]])].append(float(row[col["value"]]))
    return {
        run: {r: REDUCE[reduce](v) for r, v in sorted(rounds.items())}
        for run, rounds in values.items()
    }


def write_csv(table: dict[str, dict[int, float]], f: TextIO) -> None:
    """A row per round, a column per run; a round a run does not have is left empty."""
    runs = list(table)
    rounds = sorted({r for per_run in table.values() for r in per_run})
    w = csv.writer(f, lineterminator="\n")
    w.writerow(["round", *runs])
    for r in rounds:
        w.writerow([r, *(repr(table[run][r]) if r in table[run] else "" for run in runs)])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result files or folders of them")
    p.add_argument("--metric", default="round_s", help="a /rounds figure [round_s]")
    p.add_argument("--reduce", choices=sorted(REDUCE), default="mean", help="over ranks [mean]")
    p.add_argument("--out", type=Path, help="CSV file to write (default: print the table)")
    args = p.parse_args(argv)
    table = by_round(args.results, args.metric, args.reduce)
    if not table:
        print(f"no complete result file with the round metric {args.metric!r}", file=sys.stderr)
        return 1
    if args.out is None:
        write_csv(table, sys.stdout)
    else:
        with args.out.open("w", newline="") as f:
            write_csv(table, f)
        print(f"{len(table)} runs, {args.metric} by round -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
