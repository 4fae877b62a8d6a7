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

import html
import math
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snake_mpi.compare import (
    Row,
    cells,
    claims,
    default_target,
    label,
    row_of,
    scan,
    workload,
)
from snake_mpi.expected import run_config
from snake_mpi.store import Result

MIB = 2**20
PAPER_MEMORY_RATIO = 19.37 / 3.13
"""The paper's OPT-1.3B memory claim: full fine-tuning / a Snake node (about 6.2)."""


@dataclass
class Doc:
    """The report as blocks, rendered to Markdown and HTML alike."""

    blocks: list[tuple[str, object]] = field(default_factory=list)

    def h(self, level: int, text: str) -> None:
        self.blocks.append((f"h{level}", text))

    def p(self, text: str) -> None:
        self.blocks.append(("p", text))

    def table(self, head: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        self.blocks.append(("table", (list(head), [list(r) for r in rows])))

    def img(self, path: str, caption: str) -> None:
        self.blocks.append(("img", (path, caption)))

    def markdown(self) -> str:
        out = []
        for kind, body in self.blocks:
            if kind.startswith("h"):
                out.append("#" * int(kind[1]) + " " + str(body))
            elif kind == "p":
                out.append(str(body))
            elif kind == "table":
                head, rows = body
                out.append("| " + " | ".join(head) + " |")
                out.append("|" + "---|" * len(head))
                out += ["| " + " | ".join(r) + " |" for r in rows]
            else:
                path, caption = body
                out.append(f"![{caption}]({path})\n\n*{caption}*")
            out.append("")
        return "\n".join(out)

    def html(self, title: str) -> str:
        e = html.escape
        out = [
            "<!DOCTYPE html><html><head><meta charset='utf-8'>",
            f"<title>{e(title)}</title><style>body{{font-family:sans-serif;max-width:1100px;"
            "margin:2em auto;line-height:1.4}table{border-collapse:collapse;font-size:0.85em;"
            "margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
            "th{background:#f3f3f3}img{max-width:100%}figcaption{color:#555}</style></head><body>",
        ]
        for kind, body in self.blocks:
            if kind.startswith("h"):
                out.append(f"<{kind}>{e(str(body))}</{kind}>")
            elif kind == "p":
                out.append(f"<p>{e(str(body))}</p>")
            elif kind == "table":
                head, rows = body
                out.append("<table><tr>" + "".join(f"<th>{e(c)}</th>" for c in head) + "</tr>")
                out += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in r) + "</tr>" for r in rows]
                out.append("</table>")
            else:
                path, caption = body
                out.append(
                    f"<figure><img src='{e(path)}' alt='{e(caption)}'>"
                    f"<figcaption>{e(caption)}</figcaption></figure>"
                )
        out.append("</body></html>")
        return "\n".join(out)


def _pyplot():
    from snake_mpi.plots import _pyplot as get

    return get()


def run_name(res: Result) -> str:
    """A short name for a run in legends: scheme, ranks, and the seed."""
    cfg = run_config(res)
    return f"{label(res)} N={res.world_size} s{cfg.seed}"


def is_lm(res: Result) -> bool:
    return run_config(res).model.family == "lm"


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path)
    _pyplot().close(fig)


def fig_bytes(rows: Sequence[Row], names: Sequence[str], path: Path) -> None:
    """Measured bytes per round (all ranks) beside the analytic count, one bar per run."""
    plt = _pyplot()
    measured = [r.bytes_per_round / MIB for r in rows]
    analytic = [r.analytic_bytes_per_round / MIB for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.7 * len(names) + 2), 4.2), dpi=120)
    x = np.arange(len(names))
    ax.bar(x, measured, color="tab:blue", label="measured")
    ax.scatter(x, analytic, color="black", marker="_", s=400, zorder=3, label="analytic")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("model-transfer bytes per round, all ranks (MiB)")
    ax.set_title("bytes per round by run")
    positive = [m for m in measured if m > 0]
    if positive and max(positive) / min(positive) > 50:
        ax.set_yscale("log")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    _save(fig, path)


def fig_memory(
    results: Sequence[Result], rows: Sequence[Row], names: Sequence[str], path: Path
) -> None:
    """Peak RSS (largest and mean rank) and training state (largest rank), MiB, per run."""
    plt = _pyplot()
    base = [
        r.tables["ranks"].get("rss_before_model_bytes", np.zeros(1)).mean() / MIB for r in results
    ]
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(names) + 2), 4.2), dpi=120)
    x = np.arange(len(names))
    w = 0.27
    ax.bar(x - w, [r.peak_rss_max_bytes / MIB for r in rows], w, label="peak RSS, largest rank")
    ax.bar(x, [r.peak_rss_mean_bytes / MIB for r in rows], w, label="peak RSS, mean over ranks")
    ax.bar(
        x + w,
        [r.train_state_max_bytes / MIB for r in rows],
        w,
        label="training state, largest rank",
    )
    ax.scatter(x, base, color="black", marker="_", s=300, zorder=3, label="RSS before the model")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("memory per node (MiB)")
    ax.set_title("memory per node by run")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    _save(fig, path)


def fig_time_split(results: Sequence[Result], path: Path) -> None:
    """Per run, per rank: mean seconds per round in compute, send, wait, the round-end gather
    (waiting for the slowest rank) and the rest."""
    plt = _pyplot()
    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), dpi=110, squeeze=False)
    parts = ["compute_s", "send_s", "wait_s", "gather_s"]
    for ax, res in zip(axes.flat, results, strict=False):
        r = res.rounds
        ranks = np.arange(res.world_size)
        bottom = np.zeros(res.world_size)
        for key in parts:
            if key not in r:  # files from before gather_s was recorded
                continue
            v = r[key].mean(axis=0)
            ax.bar(ranks, v, bottom=bottom, label=key[:-2])
            bottom += v
        other = np.maximum(r["round_s"].mean(axis=0) - bottom, 0)
        ax.bar(ranks, other, bottom=bottom, label="other (eval, recv, ...)", color="lightgrey")
        ax.set_title(run_name(res), fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylabel("seconds per round")
        ax.set_xticks(ranks if res.world_size <= 16 else ranks[:: max(1, res.world_size // 8)])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    _save(fig, path)


def fig_metric(results: Sequence[Result], path: Path) -> str:
    """Accuracy (or perplexity) against rounds, wall time and cumulative bytes."""
    plt = _pyplot()
    lm = all(is_lm(r) for r in results)
    metric, ylabel = ("perplexity", "test perplexity") if lm else ("accuracy", "test accuracy")
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8), dpi=110)
    for res in results:
        ev = res.evaluation
        if metric not in ev or not len(ev[metric]):
            continue
        y = ev[metric]
        for ax, x in zip(
            axes, (ev["round"] + 1, ev["wall_s"], ev["cum_bytes_sent"] / MIB), strict=True
        ):
            ax.plot(x, y, marker="o", markersize=3, label=run_name(res))
    for ax, xl in zip(
        axes,
        ("round", "wall time on the evaluating rank (s)", "cumulative bytes sent (MiB)"),
        strict=True,
    ):
        ax.set_xlabel(xl)
        ax.set_ylabel(ylabel + (" (log)" if lm else " (fraction)"))
        if lm:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[2].set_xscale("symlog", linthresh=1.0)
    axes[2].set_xlim(left=0)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"{ylabel} against rounds, time and bytes")
    _save(fig, path)
    return metric


def scaling_groups(results: Sequence[Result], rows: Sequence[Row]) -> dict[str, list[Row]]:
    """Runs of one scheme (and seed) at two or more rank counts, sorted by N."""
    groups: dict[str, list[Row]] = defaultdict(list)
    for res, row in zip(results, rows, strict=True):
        groups[f"{row.label} s{run_config(res).seed}"].append(row)
    return {
        k: sorted(v, key=lambda r: r.ranks)
        for k, v in groups.items()
        if len({r.ranks for r in v}) >= 2
    }


def fig_scaling(groups: dict[str, list[Row]], path: Path) -> None:
    """Against N: bytes per round (measured points, analytic line), round time, peak RSS and
    training state of the largest rank."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8), dpi=110)
    for i, (name, runs) in enumerate(groups.items()):
        color = f"C{i}"
        n = [r.ranks for r in runs]
        axes[0].plot(
            n,
            [r.analytic_bytes_per_round / MIB for r in runs],
            "-",
            color=color,
            label=f"{name} analytic",
        )
        axes[0].plot(
            n, [r.bytes_per_round / MIB for r in runs], "o", color=color, label=f"{name} measured"
        )
        axes[1].plot(n, [r.round_s for r in runs], "o-", color=color)
        axes[2].plot(n, [r.peak_rss_max_bytes / MIB for r in runs], "o-", color=color, label=name)
        axes[3].plot(n, [r.train_state_max_bytes / MIB for r in runs], "o-", color=color)
    titles = [
        ("bytes per round, all ranks (MiB)", "bytes"),
        ("round time, slowest rank (s)", "time"),
        ("peak RSS, largest rank (MiB)", "memory"),
        ("training state, largest rank (MiB)", "training state"),
    ]
    for ax, (yl, t) in zip(axes, titles, strict=True):
        ax.set_xlabel("ranks N")
        ax.set_ylabel(yl)
        ax.set_title(f"{t} against N", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    _save(fig, path)


def read_csv(path: Path) -> dict[str, np.ndarray]:
    lines = [ln for ln in path.read_text().splitlines() if ln and not ln.startswith("#")]
    head = lines[0].split(",")
    rows = np.array([[float(v) for v in ln.split(",")] for ln in lines[1:]])
    return {h: rows[:, i] for i, h in enumerate(head)}


def fig_hops(
    ring: dict[str, np.ndarray],
    hops: dict[str, np.ndarray],
    path: Path,
    sendrecv: dict[str, np.ndarray] | None = None,
) -> None:
    """Throughput against message size: ring_bw (C; token mode, and sendrecv where given),
    bare mpi4py, snake_mpi's comm layer one way and back and forth; and comm / ring_bw."""
    plt = _pyplot()
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), dpi=110)
    ax.plot(ring["bytes"], ring["bandwidth_MBps"] / 1e3, "o-", label="ring_bw token (C)")
    if sendrecv is not None:
        ax.plot(
            sendrecv["bytes"],
            sendrecv["bandwidth_MBps"] / 1e3,
            "o--",
            label="ring_bw sendrecv (C, both directions at once)",
        )
    ax.plot(hops["bytes"], hops["bare_GBps"], "s-", label="bare mpi4py Send/Recv, one way")
    ax.plot(hops["bytes"], hops["comm_GBps"], "^-", label="snake_mpi comm, one way")
    ax.plot(hops["bytes"], hops["comm_token_GBps"], "v-", label="snake_mpi comm, token")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("message size (bytes)")
    ax.set_ylabel("throughput per hop (GB/s)")
    ax.set_title("hop throughput against the ring_bw limit")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax2.plot(
        hops["bytes"],
        hops["comm_token_GBps"] / hops["ring_bw_GBps"],
        "o-",
        label="comm token / ring_bw token",
    )
    ax2.plot(
        hops["bytes"],
        hops["comm_GBps"] / hops["bare_GBps"],
        "s-",
        label="comm / bare mpi4py (one way)",
    )
    ax2.axhline(1.0, color="grey", lw=0.8)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("message size (bytes)")
    ax2.set_ylabel("ratio")
    ax2.set_title("snake_mpi's share of the limit")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=8)
    _save(fig, path)


def snake_claims(rows: Sequence[Row]) -> list[list[str]]:
    """The paper's bytes and accuracy claims for every Snake run against the FedAvg run with
    the same number of ranks (else the one with the same number of data holders: one rank
    more, the server), as table rows."""
    fed = {r.ranks: r for r in rows if r.label == "fedavg"}
    out = []
    for r in rows:
        if not r.label.startswith("snake"):
            continue
        partner = fed.get(r.ranks) or fed.get(r.ranks + 1)
        if partner is None:
            continue
        for c in claims([partner, r]):
            out.append(
                [
                    f"{c.label} N={r.ranks} vs fedavg N={partner.ranks}",
                    c.what,
                    f"{c.measured:.3f}",
                    c.claimed,
                    "holds" if c.holds else "does not hold",
                ]
            )
    return out


def perplexity_claim(results: Sequence[Result]) -> list[list[str]]:
    """For language-model runs: Snake's final perplexity against FedAvg's (the paper: lower)."""
    final = {}
    for res in results:
        ev = res.evaluation
        if "perplexity" in ev and len(ev["perplexity"]):
            final.setdefault(label(res), (res, float(ev["perplexity"][-1])))
    if "fedavg" not in final:
        return []
    fed = final["fedavg"][1]
    return [
        [
            f"{name} N={res.world_size}",
            "final perplexity / FedAvg's",
            f"{ppl / fed:.3f}",
            "< 1 (lower)",
            "holds" if ppl < fed else "does not hold",
        ]
        for name, (res, ppl) in final.items()
        if name.startswith("snake")
    ]


def memory_claim(rows: Sequence[Row], results: Sequence[Result]) -> list[list[str]]:
    """For language-model runs: the full / Snake ratio of the largest training state and of
    the largest peak-RSS increase, against the paper's 6.2."""

    def increase(res: Result) -> float:
        ranks = res.tables["ranks"]
        return float((ranks["peak_rss_bytes"] - ranks["rss_before_model_bytes"]).max())

    pairs = list(zip(rows, results, strict=True))
    full = next(((r, res) for r, res in pairs if r.label == "centralised"), None)
    if full is None:
        return []
    out = []
    for row, res in pairs:
        if not row.label.startswith("snake"):
            continue
        for what, ratio in (
            (
                "training state per node",
                full[0].train_state_max_bytes / max(row.train_state_max_bytes, 1),
            ),
            ("peak RSS increase per node", increase(full[1]) / max(increase(res), 1)),
        ):
            verdict = "holds" if ratio >= 0.9 * PAPER_MEMORY_RATIO else "does not hold"
            out.append(
                [
                    f"{row.label} N={row.ranks}",
                    f"full fine-tuning / Snake, {what}",
                    f"{ratio:.2f}",
                    f"about {PAPER_MEMORY_RATIO:.1f} (OPT-1.3B)",
                    verdict,
                ]
            )
    return out


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
        found = snake_claims(rows)
        if is_lm(runs[0]):
            found += perplexity_claim(runs) + memory_claim(rows, runs)
        if found:
            doc.p("The paper's claims, measured on this workload:")
            doc.table(["run", "claim", "measured", "paper", "verdict"], found)
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
        doc.table(["workload", "run", "claim", "measured", "paper", "verdict"], all_claims)
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
