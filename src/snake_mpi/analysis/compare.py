"""``snake-mpi compare``: runs side by side (one row of figures per result file, as a terminal
or Markdown table), the paper's claims over them, and optional plots.

Only complete results of the same workload (the ``[model]`` and ``[data]`` tables of their
configs) are compared, unless the caller allows mixing. The figures: ``analysis/runs.py``;
the claims: ``analysis/claims.py``; ``docs/compare.md`` says what each column means.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from snake_mpi.analysis.runs import (
    WorkloadMismatch,
    check_same_workload,
    default_target,
    format_markdown,
    format_text,
    row_of,
    scan,
    settings_differences,
)

SETTINGS_NOTE = (
    "note: these runs differ in settings that change the last digits of their numbers "
    "(docs/reproducibility.md), so equal configs and seeds need not give equal figures here:"
)


CLAIMS_HEADING = (
    "The paper's claims (Snake against FedAvg with as many data holders, on the seeds both "
    "have; figures are means over seeds [min–max, seeds]; rules in docs/compare.md):"
)


def main(argv: Sequence[str] | None = None) -> int:
    """``snake-mpi compare``: print the table; exit status 0, or 1
    (no complete result), or 2 (different workloads without ``--allow-mixed``)."""
    import argparse
    import sys

    p = argparse.ArgumentParser(
        prog="snake-mpi compare", description="Compare result files side by side (one workload)."
    )
    p.add_argument("results", nargs="+", help="result files, or directories of them")
    p.add_argument(
        "--target",
        type=float,
        default=None,
        help="accuracy to reach (default: 90 %% of the best accuracy among the runs)",
    )
    p.add_argument("--markdown", action="store_true", help="print a Markdown table")
    p.add_argument("--out", default=None, help="also write the Markdown table to this file")
    p.add_argument(
        "--allow-mixed", action="store_true", help="compare runs of different workloads anyway"
    )
    p.add_argument(
        "--plots",
        default=None,
        metavar="DIR",
        help="write accuracy against rounds, bytes and time as PNG into DIR",
    )
    args = p.parse_args(argv)
    from snake_mpi.analysis.claims import format_claims, paper_claims

    results, skipped = scan(args.results)
    for path, why in skipped:
        print(f"compare: skipped {path}: {why}", file=sys.stderr)
    if not results:
        print("compare: no complete result files to compare", file=sys.stderr)
        return 1
    if not args.allow_mixed:
        try:
            check_same_workload(results)
        except WorkloadMismatch as e:
            print(f"compare: {e}", file=sys.stderr)
            return 2
    target = args.target if args.target is not None else default_target(results)
    rows = [row_of(r, target) for r in results]
    md = format_markdown(rows)
    print(f"{len(rows)} run(s); target accuracy {target:.4f}")
    print(md if args.markdown else format_text(rows))
    differ = settings_differences(results, [r.label for r in rows])
    note = "\n".join([SETTINGS_NOTE, *(f"  {d}" for d in differ)]) if differ else ""
    if note:
        print(f"\n{note}")
    found = paper_claims(results, target)
    claim_md = format_claims(found) if found else ""
    if found:
        print(f"\n{CLAIMS_HEADING}")
        print(claim_md)
    if args.out:
        text = f"Target accuracy {target:.4f}.\n\n{md}\n"
        if note:
            text += f"\n{note}\n"
        if found:
            text += f"\n{CLAIMS_HEADING}\n\n{claim_md}\n"
        Path(args.out).write_text(text)
    if args.plots:
        from snake_mpi.analysis.figures import accuracy_plots

        for path in accuracy_plots(results, [r.label for r in rows], Path(args.plots)):
            print(f"wrote {path}")
    return 0
