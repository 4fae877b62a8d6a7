"""``snake-mpi report RESULTS_DIR --out REPORT_DIR`` (also ``analysis/report.py``): a directory
of result files becomes a report a person reads: ``report.md`` and ``report.html`` with PNG
figures in ``figures/``.

Runs are grouped by workload (model and data configuration). For each group: the comparison
table of ``snake-mpi compare``; bytes per round by run (measured beside the analytic count);
memory per node by run; time per round split into compute / send / wait / other per rank;
accuracy (perplexity for language models) against rounds, time and bytes; scaling against the
number of ranks with the analytic bytes as lines, where a scheme ran at several N; and the
paper-claims table (measured ratio beside the claimed one, with the verdict). Where the results
directory holds ``ring_bw.csv`` and ``transfer.csv`` (``bench/hop_vs_ring.sh``), the hop
throughput against the ring_bw limit. Matplotlib is the ``analysis`` extra.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from snake_mpi.analysis.claims import HEAD, claim_rows, paper_claims
from snake_mpi.analysis.compare import cells, default_target, label, row_of, scan, workload
from snake_mpi.analysis.expected import run_config
from snake_mpi.analysis.figures import (
    MIB,
    fig_bytes,
    fig_hops,
    fig_memory,
    fig_metric,
    fig_scaling,
    fig_time_split,
    is_lm,
    read_csv,
    run_name,
    scaling_groups,
)
from snake_mpi.analysis.render import Doc
from snake_mpi.store import Result


def build(
    paths: Sequence[str],
    out_dir: Path,
    *,
    title: str = "snake_mpi report",
    scanned: tuple[list[Result], list[tuple[Path, str]]] | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    ``scanned`` is ``compare.scan(paths)`` where the caller has it already."""
    results, skipped = scanned if scanned is not None else scan(paths)
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    doc = Doc()
    doc.h(1, title)
    doc.p(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(results)} complete result "
        f"file(s) in {', '.join(paths)}."
        + (f" Left out (incomplete or unreadable): {len(skipped)}." if skipped else "")
    )
    if skipped:
        doc.table(["file", "why left out"], [[p.name, why] for p, why in skipped])
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        groups[workload(r)].append(r)
    all_claims: list[list[str]] = []
    for gi, (wl, runs) in enumerate(groups.items(), 1):
        runs.sort(key=lambda r: (label(r), r.world_size, run_config(r).seed))
        cfg = run_config(runs[0])
        model = cfg.model.preset or cfg.model.family
        doc.h(2, f"Workload {gi}: {model} on {cfg.data.name} ({len(runs)} runs)")
        doc.p("Model and data: " + "; ".join(ln for ln in wl.splitlines() if "=" in ln) + ".")
        target = default_target(runs)
        rows = [row_of(r, target) for r in runs]
        doc.p(f"Comparison (target accuracy {target:.4f}: 90 % of the best run's):")
        doc.table(*cells(rows))
        names = [run_name(r) for r in runs]
        prefix = f"w{gi}"
        fig_bytes(rows, names, figs / f"{prefix}_bytes.png")
        doc.img(
            f"figures/{prefix}_bytes.png",
            "Bytes per round by run: measured (bars), analytic (black).",
        )
        fig_memory(runs, rows, names, figs / f"{prefix}_memory.png")
        doc.img(f"figures/{prefix}_memory.png", "Memory per node by run.")
        fig_time_split(runs, figs / f"{prefix}_time.png")
        doc.img(
            f"figures/{prefix}_time.png",
            "Time per round per rank: compute, send, wait for a peer, and the rest.",
        )
        metric = fig_metric(runs, figs / f"{prefix}_{'ppl' if is_lm(runs[0]) else 'acc'}.png")
        doc.img(
            f"figures/{prefix}_{'ppl' if is_lm(runs[0]) else 'acc'}.png",
            f"Test {metric} against rounds, wall time and bytes.",
        )
        scal = scaling_groups(runs, rows)
        if scal:
            fig_scaling(scal, figs / f"{prefix}_scaling.png")
            doc.img(
                f"figures/{prefix}_scaling.png",
                "Scaling against the number of ranks: bytes (analytic lines, measured points), "
                "round time, peak RSS and training state.",
            )
            doc.table(
                ["run", "N", "MiB/round", "analytic MiB/round", "round s", "peak RSS MiB max"],
                [
                    [
                        name,
                        str(r.ranks),
                        f"{r.bytes_per_round / MIB:.3f}",
                        f"{r.analytic_bytes_per_round / MIB:.3f}",
                        f"{r.round_s:.3f}",
                        f"{r.peak_rss_max_bytes / MIB:.1f}",
                    ]
                    for name, rs in scal.items()
                    for r in rs
                ],
            )
        found = claim_rows(paper_claims(runs, target))
        if found:
            doc.p(
                "The paper's claims, measured on this workload: each Snake configuration "
                "against FedAvg with as many data holders, on the seeds both have; figures are "
                "means over seeds [min–max, seeds] (rules: docs/compare.md):"
            )
            doc.table(HEAD, found)
            all_claims += [[f"workload {gi}", *c] for c in found]
    hop_dirs = [Path(p) for p in paths if Path(p).is_dir()]
    for d in hop_dirs:
        ring_csv, hop_csv = d / "ring_bw.csv", d / "transfer.csv"
        if ring_csv.exists() and hop_csv.exists():
            ring, hops = read_csv(ring_csv), read_csv(hop_csv)
            both = d / "ring_bw_sendrecv.csv"
            fig_hops(ring, hops, figs / "hops.png", read_csv(both) if both.exists() else None)
            doc.h(2, "Hop throughput against the machine's limit")
            doc.p(
                "ring_bw (bench/c/ring_bw.c) in token mode passes one message round the ring, "
                "hop after hop, as Snake's weights travel; snake_mpi's comm layer is timed with "
                "the same pattern (token) and one way (bench/transfer.py, in the same job: "
                "bench/hop_vs_ring.sh)."
            )
            doc.img("figures/hops.png", "Throughput against message size; comm / ring_bw ratio.")
            doc.table(
                [
                    "bytes",
                    "ring_bw token GB/s",
                    "bare GB/s",
                    "comm GB/s",
                    "comm token GB/s",
                    "comm token / ring_bw",
                ],
                [
                    [f"{int(b):,}", f"{r:.2f}", f"{bb:.2f}", f"{c:.2f}", f"{t:.2f}", f"{t / r:.3f}"]
                    for b, bb, c, t, r in zip(
                        hops["bytes"],
                        hops["bare_GBps"],
                        hops["comm_GBps"],
                        hops["comm_token_GBps"],
                        hops["ring_bw_GBps"],
                        strict=True,
                    )
                ],
            )
            break
    if all_claims:
        doc.h(2, "All claims")
        doc.table(["workload", *HEAD], all_claims)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(doc.markdown())
    (out_dir / "report.html").write_text(doc.html(title))
    return out_dir / "report.md"


def main(argv: Sequence[str] | None = None) -> int:
    """``snake-mpi report RESULTS [RESULTS ...] --out REPORT_DIR``: 0, or 1 if no complete,
    usable result was found. Every file left out is named on stderr with the reason."""
    import argparse

    p = argparse.ArgumentParser(
        prog="snake-mpi report",
        description="Turn result files (or directories of them) into a Markdown + HTML report "
        "with PNG figures.",
    )
    p.add_argument("results", nargs="+", help="result files or directories")
    p.add_argument("--out", required=True, help="report directory (report.md, report.html)")
    p.add_argument("--title", default="snake_mpi report")
    args = p.parse_args(argv)
    results, skipped = scan(args.results)
    for bad, why in skipped:
        print(f"snake-mpi report: skipped {bad}: {why}", file=sys.stderr)
    if not results:
        where = ", ".join(args.results)
        why = f" ({len(skipped)} file(s) skipped, each for the reason above)" if skipped else ""
        print(f"snake-mpi report: no complete result files found in {where}{why}", file=sys.stderr)
        return 1
    path = build(args.results, Path(args.out), title=args.title, scanned=(results, skipped))
    print(f"snake-mpi report: wrote {path} and {path.with_suffix('.html')}")
    return 0
