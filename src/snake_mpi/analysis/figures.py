"""The report's figures as PNG (matplotlib is the ``analysis`` extra:
``pip install -e '.[analysis]'``): bytes per round, memory per node, the time split per rank,
accuracy or perplexity against rounds, time and bytes, per-class accuracy over rounds, the
accuracy after each turn, scaling against N and hop throughput against ring_bw; and
``accuracy_plots`` for ``snake-mpi compare --plots``."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

from snake_mpi.analysis.expected import run_config
from snake_mpi.analysis.runs import Row, label
from snake_mpi.analysis.summary import trained_ranks
from snake_mpi.store import Result

if TYPE_CHECKING:
    from matplotlib.artist import Artist
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

MIB = 2**20

AXES = {
    "rounds": ("round", "round"),
    "bytes": ("cumulative bytes sent by all ranks (MiB)", "cum_bytes_sent"),
    "time": ("wall time on the evaluating rank (s)", "wall_s"),
}


def _pyplot() -> ModuleType:
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
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (xlabel, key) in AXES.items():
        fig, axes = _figure(1, width=6.4, height=4.8, dpi=120)
        ax = axes[0, 0]
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
        if key == "round":
            _integer_ticks(ax)
        ax.grid(alpha=0.3)
        _legend_below(fig)
        path = out_dir / f"accuracy_vs_{name}.png"
        _save(fig, path)
        paths.append(path)
    return paths


def run_name(res: Result) -> str:
    """A short name for a run in legends: scheme, ranks, and the seed."""
    cfg = run_config(res)
    return f"{label(res)} N={res.world_size} s{cfg.seed}"


def is_lm(res: Result) -> bool:
    return run_config(res).model.family == "lm"


def _figure(
    ncols: int, nrows: int = 1, *, width: float, height: float, dpi: int = 110
) -> tuple[Figure, np.ndarray]:
    """A figure with constrained layout (room for legends outside the axes) and its axes."""
    plt = _pyplot()
    return plt.subplots(
        nrows, ncols, figsize=(width, height), dpi=dpi, layout="constrained", squeeze=False
    )


def _legend_below(
    fig: Figure, handles: Sequence[Artist] | None = None, labels: Sequence[str] | None = None
) -> None:
    """One legend for the whole figure, under the axes, where it covers no data."""
    if handles is None:
        found: dict[str, Artist] = {}
        for ax in fig.axes:
            for h, lab in zip(*ax.get_legend_handles_labels(), strict=True):
                found.setdefault(lab, h)
        labels, handles = list(found), list(found.values())
    if labels:
        ncol = min(len(labels), 4 if max(len(s) for s in labels) > 24 else 6)
        fig.legend(
            handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False
        )


def _integer_ticks(ax: Axes, axis: str = "x") -> None:
    """Whole-number ticks only (rounds, ranks)."""
    from matplotlib.ticker import MaxNLocator

    getattr(ax, f"{axis}axis").set_major_locator(MaxNLocator(integer=True))


def byte_unit(largest: float) -> tuple[float, str]:
    """(divisor, name) of the binary unit that shows ``largest`` bytes as 1 to 1023."""
    for div, name in ((2**30, "GiB"), (MIB, "MiB"), (2**10, "KiB")):
        if largest >= div:
            return float(div), name
    return 1.0, "bytes"


def _save(fig: Figure, path: Path) -> None:
    fig.savefig(path)
    _pyplot().close(fig)


def _log_floor(values: Sequence[float]) -> float | None:
    """Where zeros go on a log axis: a third of the smallest positive value (None: no
    positive value, so the axis stays linear)."""
    positive = [v for v in values if v > 0]
    return min(positive) / 3 if positive else None


def fig_bytes(rows: Sequence[Row], names: Sequence[str], path: Path) -> None:
    """Measured bytes per round (all ranks) beside the analytic count, one bar per run. A run
    that sends nothing (centralised) gets a marker and "0 B" at the bottom of the axis."""
    measured = [r.bytes_per_round / MIB for r in rows]
    analytic = [r.analytic_bytes_per_round / MIB for r in rows]
    fig, axes = _figure(1, width=max(6.4, 0.7 * len(names) + 2), height=4.6, dpi=120)
    ax = axes[0, 0]
    x = np.arange(len(names))
    positive = [m for m in measured if m > 0]
    log = bool(positive) and max(positive) / min(positive) > 50
    floor = (_log_floor(measured + analytic) or 0.0) if log else 0.0
    ax.bar(x, measured, color="tab:blue", label="measured")
    drawn = [i for i, a in enumerate(analytic) if a > 0 or measured[i] > 0]
    ax.scatter(
        x[drawn],
        [analytic[i] if analytic[i] > 0 else floor for i in drawn],
        color="black",
        marker="_",
        s=400,
        zorder=3,
        label="analytic",
    )
    zeros = [i for i, m in enumerate(measured) if m <= 0]
    if log:
        ax.set_yscale("log")
        ax.set_ylim(bottom=floor / 1.5)
    if zeros:
        ax.scatter(
            zeros,
            [floor] * len(zeros),
            marker="v",
            color="tab:red",
            s=60,
            zorder=4,
            label="0 bytes (no model transfer)",
        )
        for i in zeros:
            text = "0 B" + (" (analytic 0)" if analytic[i] <= 0 else "")
            ax.annotate(text, (i, floor), xytext=(0, 8), textcoords="offset points", ha="center")
    ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("model-transfer bytes per round,\nall ranks (MiB" + (", log)" if log else ")"))
    ax.set_title("bytes per round by run")
    ax.grid(axis="y", alpha=0.3)
    _legend_below(fig)
    _save(fig, path)


def rss_increase(res: Result) -> np.ndarray | None:
    """Per rank, peak RSS minus the RSS before the model was built (bytes); None where the
    file lacks ``/ranks/rss_before_model_bytes`` or it is zero."""
    ranks = res.tables.get("ranks", {})
    before = ranks.get("rss_before_model_bytes")
    if before is None or not np.all(np.asarray(before) > 0):
        return None
    return np.asarray(ranks["peak_rss_bytes"], dtype=float) - np.asarray(before, dtype=float)


VISIBLE_STATE_BYTES = 64 * MIB
"""Training state from which a model shows in a process's RSS above allocator noise."""


def fig_memory(
    results: Sequence[Result], rows: Sequence[Row], names: Sequence[str], path: Path
) -> str:
    """Training state per node (largest and mean over training ranks) and, where a real model
    makes it visible (language models, or a training state of 64 MiB or more), the peak RSS
    increase over the pre-model baseline (largest and mean rank), each on its own axis.
    Returns the caption, which gives the process baseline (not drawn) as a note."""
    increases = [rss_increase(r) for r in results]
    show_increase = all(v is not None for v in increases) and (
        any(is_lm(r) for r in results)
        or max(r.train_state_max_bytes for r in rows) >= VISIBLE_STATE_BYTES
    )
    panels = 2 if show_increase else 1
    fig, axes = _figure(panels, width=panels * max(4.8, 0.55 * len(names) + 2), height=4.8, dpi=120)
    x = np.arange(len(names))
    w = 0.38

    def bars(ax: Axes, largest: Sequence[float], mean: Sequence[float], what: str) -> None:
        div, unit = byte_unit(max([*largest, *mean, 1.0]))
        ax.bar(x - w / 2, [v / div for v in largest], w, color="tab:green", label="largest node")
        ax.bar(x + w / 2, [v / div for v in mean], w, color="tab:olive", label="mean over nodes")
        ax.set_xticks(x, names, rotation=30, ha="right", fontsize=8)
        ax.set_ylabel(f"{what} ({unit})")
        ax.grid(axis="y", alpha=0.3)

    ax = axes[0, 0]
    bars(
        ax,
        [r.train_state_max_bytes for r in rows],
        [r.train_state_mean_bytes for r in rows],
        "training state per node",
    )
    ax.set_title("training state per node\n(weights, gradients, optimiser state)", fontsize=10)
    if show_increase:
        inc = [np.maximum(v, 0) for v in increases if v is not None]
        ax2 = axes[0, 1]
        bars(ax2, [float(v.max()) for v in inc], [float(v.mean()) for v in inc], "peak increase")
        ax2.set_title("peak RSS increase over the RSS\nbefore the model was built", fontsize=10)
    before = [
        float(v) for r in results for v in r.tables["ranks"].get("rss_before_model_bytes", [])
    ]
    peaks = [float(v) for r in results for v in r.tables["ranks"]["peak_rss_bytes"]]
    note = (
        f"Not drawn: the process baseline, RSS before the model was built, "
        f"{_span(before)} per rank; peak RSS {_span(peaks)} per rank."
        if before and peaks
        else "Not drawn: peak RSS per rank (the process baseline dominates it; see the table)."
    )
    if not show_increase:
        note += " The peak RSS increase over that baseline is not drawn either: "
        note += (
            "the files lack /ranks/rss_before_model_bytes."
            if any(v is None for v in increases)
            else "a training state this small does not show above the allocator's noise."
        )
    _legend_below(fig)
    _save(fig, path)
    drawn = (
        ", and the peak RSS increase over the RSS before the model was built"
        if show_increase
        else ""
    )
    return (
        "Memory per node by run: the training state (weights, gradients and optimiser state a "
        f"node holds), largest node and mean over the nodes that train{drawn}. {note}"
    )


def _span(values: Sequence[float]) -> str:
    """ "351 MiB" or "323–571 MiB": the range of byte counts in whole MiB."""
    lo, hi = f"{min(values) / MIB:.0f}", f"{max(values) / MIB:.0f}"
    return f"{lo} MiB" if lo == hi else f"{lo}–{hi} MiB"


def fig_time_split(results: Sequence[Result], path: Path) -> None:
    """Per run, per rank: mean seconds per round in compute, send, wait, the round-end gather
    (waiting for the slowest rank), checkpoints and the rest."""
    n = len(results)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = _figure(cols, rows, width=4.2 * cols, height=3.0 * rows + 0.6)
    parts = ["compute_s", "send_s", "wait_s", "gather_s", "checkpoint_s"]
    for ax, res in zip(axes.flat, results, strict=False):
        r = res.rounds
        ranks = np.arange(res.world_size)
        bottom = np.zeros(res.world_size)
        for i, key in enumerate(parts):
            if key not in r:  # files from before gather_s (checkpoint_s) was recorded
                continue
            v = r[key].mean(axis=0)
            ax.bar(ranks, v, bottom=bottom, label=key[:-2], color=f"C{i}")
            bottom += v
        other = np.maximum(r["round_s"].mean(axis=0) - bottom, 0)
        ax.bar(ranks, other, bottom=bottom, label="other (eval, recv, ...)", color="lightgrey")
        ax.set_title(run_name(res), fontsize=9)
        ax.set_xlabel("rank")
        ax.set_ylabel("seconds per round")
        ax.set_xticks(ranks if res.world_size <= 16 else ranks[:: max(1, res.world_size // 8)])
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    _legend_below(fig)
    _save(fig, path)


def fig_metric(results: Sequence[Result], path: Path) -> str:
    """Accuracy (or perplexity) against rounds, wall time and cumulative bytes. On the bytes
    axis (log) a run's evaluations at 0 bytes (centralised) sit on a dotted line at the left."""
    lm = all(is_lm(r) for r in results)
    metric, ylabel = ("perplexity", "test perplexity") if lm else ("accuracy", "test accuracy")
    fig, axes2d = _figure(3, width=13, height=4.4)
    axes = axes2d[0]
    usable = [r for r in results if metric in r.evaluation and len(r.evaluation[metric])]
    cum = [float(v) / MIB for r in usable for v in r.evaluation["cum_bytes_sent"]]
    floor = _log_floor(cum)
    for i, res in enumerate(usable):
        ev = res.evaluation
        y = ev[metric]
        style = {"marker": "o", "markersize": 3, "color": f"C{i % 10}"}
        axes[0].plot(ev["round"] + 1, y, label=run_name(res), **style)
        axes[1].plot(ev["wall_s"], y, **style)
        b = ev["cum_bytes_sent"] / MIB
        if floor is None:
            axes[2].plot(b, y, **style)
            continue
        pos = b > 0
        axes[2].plot(b[pos], y[pos], **style)
        if not pos.all():
            at_zero = {**style, "marker": "s", "markersize": 6}
            axes[2].plot(np.full(int((~pos).sum()), floor), y[~pos], ls="none", **at_zero)
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
    _integer_ticks(axes[0])
    if floor is not None:
        from matplotlib.ticker import NullFormatter

        axes[2].set_xscale("log")
        axes[2].xaxis.set_minor_formatter(NullFormatter())
        axes[2].set_xlabel("cumulative bytes sent (MiB, log)")
        if any(v <= 0 for v in cum):
            axes[2].axvline(floor, color="grey", ls=":", lw=1)
            axes[2].annotate(
                "0 bytes",
                (floor, 1),
                xycoords=("data", "axes fraction"),
                xytext=(3, -3),
                textcoords="offset points",
                va="top",
                fontsize=8,
                color="grey",
            )
    _legend_below(fig)
    fig.suptitle(f"{ylabel} against rounds, time and bytes")
    _save(fig, path)
    return metric


def class_accuracy_of(res: Result) -> np.ndarray | None:
    """``/eval/class_accuracy`` (n_evals, n_classes) where the file has it, else None."""
    ca = res.evaluation.get("class_accuracy")
    if ca is None or ca.ndim != 2 or 0 in ca.shape or "round" not in res.evaluation:
        return None
    return ca


def turn_accuracy_of(res: Result) -> np.ndarray | None:
    """``/rounds/turn_accuracy`` (n_rounds, world_size) where some turn was evaluated."""
    turn = res.rounds.get("turn_accuracy")
    if turn is None or turn.ndim != 2 or not np.isfinite(turn).any():
        return None
    return turn


def fig_class_accuracy(results: Sequence[Result], path: Path) -> None:
    """Per run, a heat map of the test accuracy of each class (rows) after each evaluated
    round (columns), 0 to 1 on one colour scale for every run; grey: no test sample."""
    runs = [(r, ca) for r in results if (ca := class_accuracy_of(r)) is not None]
    n = len(runs)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    n_classes = max(ca.shape[1] for _, ca in runs)
    height = min(2.0 + 0.22 * n_classes, 7.0)
    fig, axes = _figure(cols, rows, width=4.4 * cols + 1.2, height=height * rows + 0.4)
    cmap = _pyplot().get_cmap("viridis").with_extremes(bad="lightgrey")
    image = None
    for ax, (res, ca) in zip(axes.flat, runs, strict=False):
        rounds = res.evaluation["round"] + 1
        data = np.ma.masked_invalid(ca.T.astype(float))
        image = ax.imshow(
            data,
            aspect="auto",
            origin="lower",
            cmap=cmap,
            vmin=0.0,
            vmax=1.0,
            interpolation="nearest",
            extent=(-0.5, len(rounds) - 0.5, -0.5, ca.shape[1] - 0.5),
        )
        ticks = np.unique(np.linspace(0, len(rounds) - 1, min(len(rounds), 8)).round().astype(int))
        ax.set_xticks(ticks, [str(int(rounds[t])) for t in ticks])
        _integer_ticks(ax, "y")
        ax.set_xlabel("round")
        ax.set_ylabel("class")
        ax.set_title(run_name(res), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    if image is not None:
        bar = fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9)
        bar.set_label("test accuracy on the class (fraction)")
    fig.suptitle("test accuracy per class after each evaluated round", fontsize=11)
    _save(fig, path)


def fig_turn_accuracy(results: Sequence[Result], path: Path) -> None:
    """Per run, the test accuracy after each turn (``eval.after_each_turn``) in turn order
    across rounds: x = round x ranks that train + position, dotted lines between rounds, the
    round's ``/eval`` accuracy as a cross at its end. Snake's turns follow one another (a
    line joins them); FedAvg's clients train side by side from one model (points only)."""
    runs = [(r, t) for r in results if (t := turn_accuracy_of(r)) is not None]
    n = len(runs)
    cols = min(2, n)
    rows = math.ceil(n / cols)
    fig, axes = _figure(cols, rows, width=6.2 * cols, height=3.4 * rows + 0.6)
    for ax, (res, turn) in zip(axes.flat, runs, strict=False):
        ranks = trained_ranks(turn)
        per = len(ranks)
        x = np.arange(turn.shape[0] * per)
        y = turn[:, ranks].ravel()
        sequential = res.scheme == "snake"
        ax.plot(
            x,
            y,
            marker="o",
            markersize=3 if len(x) <= 200 else 1,
            ls="-" if sequential else "none",
            color="tab:blue",
            label="after a turn",
        )
        for r in range(1, turn.shape[0]):
            ax.axvline(r * per - 0.5, color="grey", ls=":", lw=0.8)
        ev = res.evaluation
        if "accuracy" in ev and "round" in ev:
            ends = (ev["round"] + 1) * per - 1
            ax.plot(ends, ev["accuracy"], "x", color="black", ms=6, label="round's /eval")
        step = max(1, math.ceil(turn.shape[0] / 10))
        marks = np.arange(0, turn.shape[0], step)
        ax.set_xticks(marks * per, [str(m + 1) for m in marks])
        ax.set_xlabel(f"round (tick: its first turn; {per} turns each: ranks {_ranks(ranks)})")
        ax.set_ylabel("test accuracy (fraction)")
        ax.set_ylim(-0.02, 1.02)
        ax.grid(axis="y", alpha=0.3)
        ax.set_title(run_name(res), fontsize=9)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    _legend_below(fig)
    fig.suptitle("test accuracy after each turn, across the ring", fontsize=11)
    _save(fig, path)


def _ranks(ranks: Sequence[int]) -> str:
    """ "0..3" for consecutive ranks, else "1, 3, 4"."""
    if list(ranks) == list(range(ranks[0], ranks[-1] + 1)) and len(ranks) > 2:
        return f"{ranks[0]}..{ranks[-1]}"
    return ", ".join(str(k) for k in ranks)


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
    from matplotlib.lines import Line2D
    from matplotlib.ticker import NullLocator, ScalarFormatter

    fig, axes2d = _figure(2, 2, width=11, height=7.4)
    axes = list(axes2d.flat)
    state_div, state_unit = byte_unit(
        max([r.train_state_max_bytes for rs in groups.values() for r in rs] + [1])
    )
    handles = []
    for i, (name, runs) in enumerate(groups.items()):
        color = f"C{i}"
        n = [r.ranks for r in runs]
        axes[0].plot(n, [r.analytic_bytes_per_round / MIB for r in runs], "-", color=color)
        axes[0].plot(n, [r.bytes_per_round / MIB for r in runs], "o", color=color)
        axes[1].plot(n, [r.round_s for r in runs], "o-", color=color)
        axes[2].plot(n, [r.peak_rss_max_bytes / MIB for r in runs], "o-", color=color)
        axes[3].plot(n, [r.train_state_max_bytes / state_div for r in runs], "o-", color=color)
        handles.append(Line2D([], [], color=color, marker="o", label=name))
    handles += [
        Line2D([], [], color="grey", ls="-", label="bytes: analytic (line)"),
        Line2D([], [], color="grey", ls="none", marker="o", label="bytes: measured (points)"),
    ]
    titles = [
        ("bytes per round, all ranks (MiB)", "bytes"),
        ("round time, slowest rank (s)", "time"),
        ("peak RSS, largest rank (MiB)", "peak RSS"),
        (f"training state, largest rank ({state_unit})", "training state"),
    ]
    ns = sorted({r.ranks for rs in groups.values() for r in rs})
    for ax, (yl, t) in zip(axes, titles, strict=True):
        ax.set_xlabel("ranks N")
        ax.set_ylabel(yl)
        ax.set_title(f"{t} against N", fontsize=10)
        ax.set_xscale("log", base=2)
        ax.set_xticks(ns)
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_locator(NullLocator())
        ax.grid(alpha=0.3)
    _legend_below(fig, handles, [str(h.get_label()) for h in handles])
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
    fig, axes = _figure(2, width=12, height=4.8)
    ax, ax2 = axes[0]
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
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2)
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
    ax2.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18))
    _save(fig, path)
