"""Label skew across runs (docs/label-skew.md): final accuracy against the Dirichlet alpha for
each variant (scheme, mode and label-skew options: ``runs.label``), as mean [min–max] over
seeds, next to plain FedAvg's at the same alpha; bytes per round beside it; the label-skew
goal (``GOAL_*``) checked; the paper's claims at each alpha.
``python -m snake_mpi.analysis.skew DIR --out OUT`` (``bench/label_skew.sh`` runs it after the
suite ``label-skew``)."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from snake_mpi.analysis.claims import HEAD, claim_rows, paper_claims
from snake_mpi.analysis.expected import run_config
from snake_mpi.analysis.render import Doc
from snake_mpi.analysis.runs import default_target, label, scan
from snake_mpi.config import RunConfig, to_toml
from snake_mpi.store import Result

MIB = 2**20
BASELINE = "fedavg"
"""Plain FedAvg: the paper's baseline, what every variant's accuracy is set against."""
GOAL_RATIO = 0.95
"""The goal: Snake P2P with the defaults reaches this fraction of plain FedAvg's accuracy."""
GOAL_BYTES = 0.5
"""... while sending at most this fraction of FedAvg's bytes per round."""
GOAL_IID_DROP = 0.01
"""... and loses at most this much IID accuracy against the old defaults."""
DEFAULT = "snake-p2p"
OLD_DEFAULT = "snake-p2p+la0+prox0+ends-owner+kd0"
CLAIMED = (BASELINE, DEFAULT, OLD_DEFAULT, "snake-cs", "snake-cs+la0+prox0+ends-owner+kd0")
"""Variants whose paper claims the report lists (every variant's accuracy is in the table)."""


def skew_key(cfg: RunConfig) -> str:
    """The partition as a column: ``0.1`` .. (Dirichlet alpha), ``IID``, or ``shards-K``."""
    d = cfg.data
    if d.partition == "dirichlet":
        return f"{d.alpha:g}"
    if d.partition == "shards":
        return f"shards-{d.shards_per_node}"
    return "IID"


def _key_order(k: str) -> tuple[int, float, str]:
    """Dirichlet columns by alpha (most skewed first), then shards, then IID."""
    try:
        return (0, float(k), "")
    except ValueError:
        return (2 if k == "IID" else 1, 0.0, k)


def workload_of(cfg: RunConfig) -> tuple[str, str]:
    """(grouping key, name) of a run's workload, its partition left out."""
    skew = ("partition", "alpha", "shards_per_node")
    data = [ln for ln in to_toml(cfg.data).splitlines() if ln.split(" = ")[0] not in skew]
    key = to_toml(cfg.model) + "\n".join(data) + f"rounds={cfg.train.rounds}"
    model = cfg.model.preset or f"{cfg.model.family} width {cfg.model.width}"
    name = f"{model} on {cfg.data.name}, {cfg.data.n_train} samples, {cfg.train.rounds} rounds"
    return key, name


@dataclass
class Cell:
    """The runs of one variant at one partition."""

    seeds: list[int] = field(default_factory=list)
    final: list[float] = field(default_factory=list)
    bytes_per_round: list[float] = field(default_factory=list)
    runs: list[Result] = field(default_factory=list)

    def mean(self) -> float:
        return float(np.mean(self.final)) if self.final else math.nan

    def spread(self) -> str:
        """``0.761 [0.732–0.789]`` (one seed: the value alone)."""
        if len(self.final) == 1:
            return f"{self.final[0]:.3f}"
        return f"{self.mean():.3f} [{min(self.final):.3f}–{max(self.final):.3f}]"


@dataclass
class Workload:
    name: str
    cells: dict[str, dict[str, Cell]] = field(default_factory=lambda: defaultdict(dict))
    """variant -> partition column -> Cell."""

    def columns(self) -> list[str]:
        keys = {k for by in self.cells.values() for k in by}
        return sorted(keys, key=_key_order)

    def cell(self, variant: str, column: str) -> Cell | None:
        return self.cells.get(variant, {}).get(column)


def collect(results: Sequence[Result]) -> list[Workload]:
    """Runs by workload, variant and partition; each run's final accuracy and bytes/round."""
    out: dict[str, Workload] = {}
    for res in results:
        cfg = run_config(res)
        acc = res.evaluation.get("accuracy")
        if acc is None or not acc.size:
            continue
        key, name = workload_of(cfg)
        w = out.setdefault(key, Workload(name))
        c = w.cells[label(res)].setdefault(skew_key(cfg), Cell())
        c.seeds.append(cfg.seed)
        c.final.append(float(acc[-1]))
        c.bytes_per_round.append(float(res.rounds["bytes_sent"].sum(axis=1).mean()))
        c.runs.append(res)
    return list(out.values())


def _variants(w: Workload) -> list[str]:
    """Plain FedAvg first, then the Snake defaults, then the rest by name."""
    first = [v for v in (BASELINE, DEFAULT, OLD_DEFAULT) if v in w.cells]
    return first + sorted(v for v in w.cells if v not in first)


def accuracy_table(w: Workload) -> tuple[list[str], list[list[str]]]:
    """Rows per variant: final accuracy per partition as mean [min–max] (× plain FedAvg's
    mean), then MiB per round (× FedAvg's) and the seeds."""
    cols = w.columns()
    head = ["variant", *[f"alpha {c}" if c[0].isdigit() else c for c in cols]]
    head += ["MiB/round", "seeds"]
    fed_bytes = [b for c in w.cells.get(BASELINE, {}).values() for b in c.bytes_per_round]
    rows = []
    for v in _variants(w):
        row = [v]
        for col in cols:
            c, base = w.cell(v, col), w.cell(BASELINE, col)
            if c is None:
                row.append("—")
                continue
            text = c.spread()
            if base is not None and v != BASELINE and base.mean() > 0:
                text += f" ({c.mean() / base.mean():.2f}×)"
            row.append(text)
        mine = [b for c in w.cells[v].values() for b in c.bytes_per_round]
        mib = f"{np.mean(mine) / MIB:.3f}"
        if fed_bytes and v != BASELINE:
            mib += f" ({np.mean(mine) / np.mean(fed_bytes):.3f}×)"
        row.append(mib)
        seeds = sorted({s for c in w.cells[v].values() for s in c.seeds})
        row.append(",".join(map(str, seeds)))
        rows.append(row)
    return head, rows


def goal_lines(w: Workload, alpha: str = "0.5") -> list[str]:
    """The label-skew goal for this workload, each part with its figures and verdict."""
    out = []
    d, f = w.cell(DEFAULT, alpha), w.cell(BASELINE, alpha)
    if d is None or f is None:
        return [f"goal not judged: needs {DEFAULT} and {BASELINE} at alpha {alpha}"]
    seeds = sorted(set(d.seeds) & set(f.seeds))
    ratio = d.mean() / f.mean()
    ok = ratio >= GOAL_RATIO
    out.append(
        f"accuracy at Dirichlet({alpha}): {DEFAULT} {d.spread()} / {BASELINE} {f.spread()} = "
        f"{ratio:.3f} (goal ≥ {GOAL_RATIO}: {'holds' if ok else 'does not hold'}; "
        f"seeds {','.join(map(str, seeds))})"
    )
    b = float(np.mean(d.bytes_per_round) / np.mean(f.bytes_per_round))
    verdict = "holds" if b <= GOAL_BYTES else "does not hold"
    out.append(f"bytes per round: {b:.3f} × FedAvg's (goal ≤ {GOAL_BYTES}: {verdict})")
    new, old = w.cell(DEFAULT, "IID"), w.cell(OLD_DEFAULT, "IID")
    if new is not None and old is not None:
        drop = old.mean() - new.mean()
        ok = drop <= GOAL_IID_DROP
        out.append(
            f"IID accuracy: {DEFAULT} {new.spread()} against the old defaults ({OLD_DEFAULT}) "
            f"{old.spread()}: {-drop:+.3f} (goal: at most {GOAL_IID_DROP} lower: "
            f"{'holds' if ok else 'does not hold'})"
        )
    return out


def figure(workloads: Sequence[Workload], path: Path) -> None:
    """Final accuracy against the partition (most skewed left, IID right), one panel per
    workload, one line per variant: mean with min–max bars over seeds."""
    from snake_mpi.analysis.figures import _figure, _legend_below

    fig, axes = _figure(len(workloads), width=5.2 * len(workloads) + 0.6, height=4.6)
    everyone = list(dict.fromkeys(v for w in workloads for v in _variants(w)))
    import matplotlib

    cmap = matplotlib.colormaps["tab20" if len(everyone) > 10 else "tab10"]
    colour = {v: cmap(i % cmap.N) for i, v in enumerate(everyone)}  # one colour per variant
    for ax, w in zip(axes[0], workloads, strict=True):
        cols = w.columns()
        x = np.arange(len(cols))
        variants = _variants(w)
        for i, v in enumerate(variants):
            pts: list[tuple[int, Cell]] = []
            for j, col in enumerate(cols):
                c = w.cell(v, col)
                if c is not None:
                    pts.append((j, c))
            if not pts:
                continue
            xs = np.array([j for j, _ in pts]) + (i - (len(variants) - 1) / 2) * 0.04
            m = np.array([c.mean() for _, c in pts])
            lo = m - np.array([min(c.final) for _, c in pts])
            hi = np.array([max(c.final) for _, c in pts]) - m
            style = "-" if len(pts) > 1 else "none"
            ax.errorbar(
                xs,
                m,
                yerr=[lo, hi],
                marker="o" if v.startswith("snake") else "s",
                linestyle=style,
                linewidth=2.2 if v in (DEFAULT, BASELINE) else 1.2,
                capsize=3,
                color=colour[v],
                label=v,
            )
        ax.set_xticks(x, [f"α={c}" if c[0].isdigit() else c for c in cols])
        ax.set_xlabel("label skew over the nodes (Dirichlet α; smaller: more skew)")
        ax.set_ylabel("final test accuracy (mean, min–max over seeds)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(w.name, fontsize=9)
    _legend_below(fig)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    import matplotlib.pyplot as plt

    plt.close(fig)


def build(paths: Sequence[str], out_dir: Path) -> Path:
    """Write ``label-skew.md``, ``label-skew.html`` and ``figures/label_skew.png``."""
    results, skipped = scan(paths)
    workloads = collect(results)
    doc = Doc()
    doc.h(1, "Label skew: accuracy against Dirichlet α")
    doc.p(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(results)} complete "
        f"result file(s) in {', '.join(paths)}"
        + (f"; left out (incomplete or unreadable): {len(skipped)}." if skipped else ".")
    )
    if not workloads:
        doc.p("No complete classification runs found.")
    else:
        figure(workloads, out_dir / "figures" / "label_skew.png")
        doc.img(
            "figures/label_skew.png",
            "Final test accuracy against the label skew, per variant: mean over seeds with "
            "min–max bars; one panel per workload.",
        )
    for w in workloads:
        doc.h(2, w.name)
        doc.p(
            "Final test accuracy, mean [min–max] over seeds, and in brackets its ratio to plain "
            "FedAvg's mean at the same α; MiB per round: mean over rounds and runs (× FedAvg's). "
            "Variants: scheme and mode, +tag for each label-skew option away from its default "
            "(la0: no logit adjustment, ends-owner: only the last node trains the head, kd0: "
            "no distillation, prox0: no proximal term; on FedAvg la1: logit adjustment, prox0.01: "
            "FedProx µ)."
        )
        head, rows = accuracy_table(w)
        doc.table(head, rows)
        doc.p("Goal (issue 14): " + "; ".join(goal_lines(w)) + ".")
        for col in w.columns():
            runs = [r for v in CLAIMED if col in w.cells.get(v, {}) for r in w.cells[v][col].runs]
            found = claim_rows(paper_claims(runs, default_target(runs)))
            if found:
                doc.p(f"The paper's claims at {('α = ' + col) if col[0].isdigit() else col}:")
                doc.table(HEAD, found)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "label-skew.md").write_text(doc.markdown())
    (out_dir / "label-skew.html").write_text(doc.html("snake_mpi: label skew"))
    return out_dir / "label-skew.md"


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m snake_mpi.analysis.skew",
        description="Accuracy against label skew, per variant.",
    )
    p.add_argument("results", nargs="+", help="result files, or directories of them")
    p.add_argument("--out", required=True, help="directory for label-skew.md/.html and figures")
    args = p.parse_args(argv)
    md = build(args.results, Path(args.out))
    print(md.read_text())
    print(f"wrote {md} and {md.with_suffix('.html')}")
    return 0


if __name__ == "__main__":
    import sys

    sys.exit(main())
