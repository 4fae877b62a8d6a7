"""Accuracy against rounds, bytes and time, one line per run (PNG; matplotlib is the
``analysis`` extra: ``pip install -e '.[analysis]'``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from snake_mpi.store import Result

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
        for res, label in zip(results, labels, strict=True):
            ev = res.evaluation
            x = ev[key] + 1 if key == "round" else ev[key]
            if key == "cum_bytes_sent":
                x = x / 2**20
            ax.plot(x, ev["accuracy"], marker="o", markersize=3, label=label)
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
