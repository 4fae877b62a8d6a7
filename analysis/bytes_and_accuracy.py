"""Bytes per round and accuracy of every run in a folder, one CSV row per run: an example of an
analysis script that reads result files through the public API (``snake_mpi.store``).

    python analysis/bytes_and_accuracy.py RESULTS_DIR [RESULT.h5 ...] [--out runs.csv]

A row per complete result file (incomplete or unreadable files are named on stderr and left
out): its file, scheme, Snake mode, ranks and rounds; the bytes all ranks sent per round (mean
over rounds), in all (rounds and final sync), and in the final sync alone; the accuracy of the
last evaluation (empty for a run without one) and the largest peak RSS of any rank. Without
``--out`` the table is printed.
"""

from __future__ import annotations

import argparse
import csv
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, TextIO

from snake_mpi.store import Result, ResultError, read_result, result_paths

COLUMNS = (
    "file",
    "scheme",
    "mode",
    "ranks",
    "rounds",
    "bytes_per_round",
    "total_bytes",
    "final_sync_bytes",
    "final_accuracy",
    "peak_rss_bytes",
)


def run_row(res: Result) -> dict[str, Any]:
    """The figures of one run, by ``COLUMNS`` name."""
    per_round = res.rounds["bytes_sent"].sum(axis=1)  # (rounds, ranks) -> all ranks, per round
    sync = res.arrays.get("final_sync/bytes_sent")
    sync_bytes = int(sync.sum()) if sync is not None else 0
    accuracy = res.evaluation.get("accuracy")
    ran = res.n_rounds > 0
    return {
        "file": str(res.path),
        "scheme": res.scheme,
        "mode": res.attrs.get("mode", ""),
        "ranks": res.world_size,
        "rounds": res.n_rounds,
        "bytes_per_round": round(float(per_round.mean()), 1) if ran else "",
        "total_bytes": int(per_round.sum()) + sync_bytes,
        "final_sync_bytes": sync_bytes,
        "final_accuracy": round(float(accuracy[-1]), 4) if accuracy is not None else "",
        "peak_rss_bytes": int(res.rounds["peak_rss_bytes"].max()) if ran else "",
    }


def table(paths: Iterable[str | Path], skipped: TextIO = sys.stderr) -> list[dict[str, Any]]:
    """A row per readable, complete result among ``paths`` (a folder: its result files)."""
    rows = []
    for path in result_paths(paths):
        try:
            rows.append(run_row(read_result(path)))
        except ResultError as e:
            print(f"skipped {path}: {e.reason}", file=skipped)
    return rows


def write_csv(rows: list[dict[str, Any]], f: TextIO) -> None:
    """``rows`` as CSV with a header line."""
    w = csv.DictWriter(f, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("results", nargs="+", help="result files or folders of them")
    p.add_argument("--out", type=Path, help="CSV file to write (default: print the table)")
    args = p.parse_args(argv)
    rows = table(args.results)
    if not rows:
        print("no complete result file found", file=sys.stderr)
        return 1
    if args.out is None:
        write_csv(rows, sys.stdout)
    else:
        with args.out.open("w", newline="") as f:
            write_csv(rows, f)
        print(f"{len(rows)} runs -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
