"""The report's figures as PNG (matplotlib is the ``analysis`` extra:
``pip install -e '.[analysis]'``): bytes per round, memory per node, the time split per rank,
accuracy or perplexity against rounds, time and bytes, scaling against N and hop throughput
against ring_bw; and ``accuracy_plots`` for ``snake-mpi compare --plots``."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from snake_mpi.analysis.compare import Row, label
from snake_mpi.analysis.expected import run_config
from snake_mpi.store import Result

MIB = 2**20

AXES = {
    "rounds": ("round", "round"),
    "bytes": ("cumulative bytes sent by all ranks (MiB)", "cum_bytes_sent"),
    "time": ("wall time on the evaluating rank (s)", "wall_s"),
}


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "plots need matplotlib: pip install -e '.[analysis]' (or pip install matplotlib)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_plots(results: Sequence[Result], labels: Sequence[str], out_dir: Path) -> list[Path]:
    """``accuracy_vs_{rounds,bytes,time}.png`` in ``out_dir``; returns their paths."""
    plt = _pyplot()
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (xlabel, key) in AXES.items():
        fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
        for res, name_of_run in zip(results, labels, strict=True):
            ev = res.evaluation
            x = ev[key] + 1 if key == "round" else ev[key]
            if key == "cum_bytes_sent":
                x = x / 2**20
            ax.plot(x, ev["accuracy"], marker="o", markersize=3, label=name_of_run)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy (fraction)")
        ax.set_title(f"accuracy against {name}")
        if key == "cum_bytes_sent":
            ax.set_xscale("symlog", linthresh=1.0)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / f"accuracy_vs_{name}.png"
        fig.savefig(path)
        plt.close(fig)
        paths.append(path)
    return paths


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
