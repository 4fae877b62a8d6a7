"""Runs side by side, as a library: which result files can be compared (``scan``, one
workload: ``check_same_workload``), what each run is (``label``, ``workload``), its figures
(``row_of``: one ``Row`` per result file) and their table (``cells``, ``format_text``,
``format_markdown``). Every figure is computed from the file alone; ``docs/compare.md`` says
what each column means. The ``compare`` command (``compare.py``), the claims, the figures and
the report build on this module.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from snake_mpi import numerics
from snake_mpi.analysis.expected import expected_bytes, run_config
from snake_mpi.config import RunConfig, to_toml
from snake_mpi.schemes.registry import scheme_spec
from snake_mpi.store import Result, ResultFormatError, result_paths, scan_results


class WorkloadMismatch(ValueError):
    """Results of different workloads were given to one comparison."""


def label(res: Result) -> str:
    """What ran: the scheme's label (its ``SchemeSpec.label``: ``snake-p2p``, ``snake-cs``,
    ``fedavg``...) and ``+tag`` for each label-skew option away from its default
    (``remedy_tags``), so that e.g. FedAvg with logit adjustment (``fedavg+la1``) is never
    taken for plain FedAvg."""
    cfg = run_config(res)
    return scheme_spec(cfg.scheme).label_of(cfg) + "".join(f"+{t}" for t in _train_tags(cfg))


def remedy_tags(cfg: RunConfig) -> list[str]:
    """Short names of the run's label-skew options that differ from their defaults
    (docs/label-skew.md): the scheme's own (``SchemeSpec.tags``: e.g. ``la0``, ``ends-owner``,
    ``prox0``, ``kd0``), then ``cosine``."""
    tags = scheme_spec(cfg.scheme).tags
    return (tags(cfg) if tags else []) + _train_tags(cfg)


def _train_tags(cfg: RunConfig) -> list[str]:
    return [cfg.train.lr_schedule] if cfg.train.lr_schedule != "constant" else []


def workload(res: Result) -> str:
    """The workload a run trained: its model and data configuration as TOML text."""
    cfg = run_config(res)
    return to_toml(cfg.model) + to_toml(cfg.data)


NEEDED_ROUNDS = (
    "bytes_sent",
    "bytes_received",
    "train_state_bytes",
    "round_s",
    "compute_s",
    "send_s",
    "wait_s",
)
"""``/rounds`` fields every comparison (and the report) reads."""
NEEDED_TABLES = {"ranks": ("peak_rss_bytes", "data_samples"), "blocks": ("bytes",)}
"""Table columns every comparison reads (``ranks``: one row per rank)."""
NEEDED_EVAL = ("round", "accuracy", "wall_s", "cum_bytes_sent")
"""``/eval`` fields every comparison, its plots and the report read."""


def check_usable(res: Result) -> RunConfig:
    """The run's config, or ``ResultFormatError`` naming what compare and report need that the
    file lacks: a readable ``config_toml``, ``NEEDED_ROUNDS``, ``NEEDED_TABLES`` (and, for
    Snake, ``/blocks/params``; for language models, ``/ranks/rss_before_model_bytes``) and
    ``NEEDED_EVAL``. Every other field they read is optional."""
    if not res.config_toml.strip():
        raise ResultFormatError(res.path, "no config_toml attribute (the run's configuration)")
    try:
        cfg = run_config(res)
    except (ValueError, TypeError, KeyError) as e:  # TOMLDecodeError, ConfigError among them
        raise ResultFormatError(
            res.path, f"config_toml attribute is not a valid run configuration: {e}"
        ) from e
    needed = {f"/rounds/{k}": k in res.rounds for k in NEEDED_ROUNDS}
    needed |= {f"/eval/{k}": k in res.evaluation for k in NEEDED_EVAL}
    tables = {name: list(cols) for name, cols in NEEDED_TABLES.items()}
    for need in scheme_spec(cfg.scheme).needs:
        table, _, column = need.partition("/")
        tables.setdefault(table, []).append(column)
    if cfg.model.family == "lm":
        tables["ranks"].append("rss_before_model_bytes")
    for name, cols in tables.items():
        have = res.tables.get(name, {})
        needed |= {f"/{name}/{c}": c in have for c in cols}
    missing = [k for k, ok in needed.items() if not ok]
    if missing:
        raise ResultFormatError(res.path, f"lacks {', '.join(missing)} (needed to compare runs)")
    for name, cols in tables.items():
        for c in cols:
            v = res.tables[name][c]
            rows = v.shape[0] if v.ndim else 0
            want = res.world_size if name == "ranks" else len(res.tables[name][cols[0]])
            if v.dtype.kind not in "biuf" or v.ndim != 1 or rows != want:
                raise ResultFormatError(
                    res.path,
                    f"/{name}/{c} is {v.dtype} of shape {v.shape}, expected {want} numbers"
                    + (" (one per rank)" if name == "ranks" else " (one per block)"),
                )
    return cfg


def scan(
    paths: Iterable[str | os.PathLike],
) -> tuple[list[Result], list[tuple[Path, str]]]:
    """``store.scan_results``, then ``check_usable``: (results compare and report can use,
    [(path, reason)] for every other file, in the order they were found)."""
    paths = list(paths)
    results, skipped = scan_results(paths)
    usable = []
    for res in results:
        try:
            check_usable(res)
        except ResultFormatError as e:
            skipped.append((res.path, e.reason))
        else:
            usable.append(res)
    order = {p: i for i, p in enumerate(result_paths(paths))}
    return usable, sorted(skipped, key=lambda item: order.get(item[0], len(order)))


def check_same_workload(results: Sequence[Result]) -> None:
    """Raise ``WorkloadMismatch`` saying which runs differ from the first, and in what."""
    if not results:
        return
    base = workload(results[0])
    for res in results[1:]:
        other = workload(res)
        if other != base:
            a, b = set(base.splitlines()), set(other.splitlines())
            diff = ", ".join(sorted(b - a)) or "?"
            raise WorkloadMismatch(
                f"{res.path} trains a different workload than {results[0].path} "
                f"(differs in: {diff}); compare runs of one workload, or pass --allow-mixed"
            )


@dataclass(frozen=True, slots=True)
class Row:
    """The figures of one run (bytes per round are means over the rounds)."""

    label: str
    path: str
    ranks: int
    rounds: int
    bytes_per_round: float
    """All ranks' model-transfer bytes sent per round."""
    bytes_per_round_max_rank: float
    """The busiest rank's bytes sent per round."""
    analytic_bytes_per_round: float
    bytes_match: bool
    """Measured bytes equal the analytic count for every rank and round."""
    peak_rss_max_bytes: int
    peak_rss_mean_bytes: float
    train_state_max_bytes: int
    """Largest training state on any rank in any round."""
    train_state_mean_bytes: float
    """Mean over training ranks of each rank's largest training state."""
    round_s: float
    """Wall time per round: the slowest rank's, mean over rounds."""
    compute_s: float
    send_s: float
    wait_s: float
    """Per rank per round, mean over ranks and rounds."""
    final_accuracy: float
    best_accuracy: float
    rounds_to_target: int | None
    bytes_to_target: int | None


def row_of(res: Result, target: float) -> Row:
    """The figures of one run; ``target`` is the accuracy whose first reaching is reported."""
    sent = res.rounds["bytes_sent"]
    exp_sent, exp_received = expected_bytes(res)
    match = bool(
        np.array_equal(sent, exp_sent)
        and np.array_equal(res.rounds["bytes_received"], exp_received)
    )
    state = res.rounds["train_state_bytes"].max(axis=0)
    trainers = state[state > 0]
    peak = res.tables["ranks"]["peak_rss_bytes"]
    ev = res.evaluation
    acc = ev.get("accuracy", np.zeros(0))
    reached = np.flatnonzero(acc >= target)
    first = int(reached[0]) if reached.size else None
    return Row(
        label=label(res),
        path=str(res.path),
        ranks=res.world_size,
        rounds=res.n_rounds,
        bytes_per_round=float(sent.sum(axis=1).mean()),
        bytes_per_round_max_rank=float(sent.mean(axis=0).max()),
        analytic_bytes_per_round=float(exp_sent.sum(axis=1).mean()),
        bytes_match=match,
        peak_rss_max_bytes=int(peak.max()),
        peak_rss_mean_bytes=float(peak.mean()),
        train_state_max_bytes=int(state.max()),
        train_state_mean_bytes=float(trainers.mean()) if trainers.size else 0.0,
        round_s=float(res.rounds["round_s"].max(axis=1).mean()),
        compute_s=float(res.rounds["compute_s"].mean()),
        send_s=float(res.rounds["send_s"].mean()),
        wait_s=float(res.rounds["wait_s"].mean()),
        final_accuracy=float(acc[-1]) if acc.size else math.nan,
        best_accuracy=float(acc.max()) if acc.size else math.nan,
        rounds_to_target=None if first is None else int(ev["round"][first]) + 1,
        bytes_to_target=None if first is None else int(ev["cum_bytes_sent"][first]),
    )


def settings_differences(results: Sequence[Result], labels: Sequence[str]) -> list[str]:
    """One phrase per numeric setting (``numerics``: torch threads, CPU kernels, math-library
    variables, torch and numpy versions) in which the runs differ; empty when they agree. Runs
    that differ in one may differ in their last digits for that alone."""
    runs = []
    for res, name in zip(results, labels, strict=True):
        ranks = res.tables.get("ranks", {})
        columns: dict[str, list[object]] = {
            k: list(ranks[k]) for k in numerics.SETTING_COLUMNS if k in ranks
        }
        columns |= {k: [res.provenance.get(k, "")] for k in numerics.PROVENANCE_KEYS}
        runs.append((name, columns))
    return numerics.run_differences(runs)


TARGET_FRACTION = 0.9
"""The default target accuracy is this fraction of the best accuracy any of the runs reached."""


def best_accuracy(results: Sequence[Result]) -> float | None:
    """The best accuracy any of the runs reached; None where none was evaluated."""
    best = [
        float(r.evaluation["accuracy"].max())
        for r in results
        if r.evaluation.get("accuracy") is not None and r.evaluation["accuracy"].size
    ]
    return max(best) if best else None


def default_target(results: Sequence[Result]) -> float:
    """``TARGET_FRACTION`` (90 %) of the best accuracy any of the runs reached (1.0 if none)."""
    best = best_accuracy(results)
    return TARGET_FRACTION * best if best is not None else 1.0


def target_text(results: Sequence[Result], target: float | None) -> str:
    """Where the target accuracy comes from, e.g. "target accuracy 0.7242 (90 % of the best
    run's accuracy, 0.8047)"; ``target``: the one given with ``--target``, None for the
    default."""
    if target is not None:
        return f"target accuracy {target:.4f} (--target)"
    best = best_accuracy(results)
    if best is None:
        return f"target accuracy {default_target(results):.4f} (no run has an evaluation)"
    return (
        f"target accuracy {default_target(results):.4f} ({TARGET_FRACTION * 100:g} % of the "
        f"best run's accuracy, {best:.4f})"
    )


COLUMNS = [
    ("scheme", lambda r: r.label),
    ("N", lambda r: str(r.ranks)),
    ("rounds", lambda r: str(r.rounds)),
    ("MiB/round", lambda r: f"{r.bytes_per_round / 2**20:.3f}"),
    ("MiB/round max rank", lambda r: f"{r.bytes_per_round_max_rank / 2**20:.3f}"),
    ("analytic MiB/round", lambda r: f"{r.analytic_bytes_per_round / 2**20:.3f}"),
    ("= analytic", lambda r: "exact" if r.bytes_match else "DIFFERS"),
    ("peak RSS MiB max", lambda r: f"{r.peak_rss_max_bytes / 2**20:.1f}"),
    ("peak RSS MiB mean", lambda r: f"{r.peak_rss_mean_bytes / 2**20:.1f}"),
    ("train state KiB max", lambda r: f"{r.train_state_max_bytes / 2**10:.1f}"),
    ("train state KiB mean", lambda r: f"{r.train_state_mean_bytes / 2**10:.1f}"),
    ("round s", lambda r: f"{r.round_s:.3f}"),
    ("compute s", lambda r: f"{r.compute_s:.3f}"),
    ("send s", lambda r: f"{r.send_s:.3f}"),
    ("wait s", lambda r: f"{r.wait_s:.3f}"),
    ("final acc", lambda r: f"{r.final_accuracy:.4f}"),
    ("best acc", lambda r: f"{r.best_accuracy:.4f}"),
    ("rounds to target", lambda r: "—" if r.rounds_to_target is None else str(r.rounds_to_target)),
    (
        "MiB to target",
        lambda r: "—" if r.bytes_to_target is None else f"{r.bytes_to_target / 2**20:.3f}",
    ),
]


def cells(rows: Sequence[Row]) -> tuple[list[str], list[list[str]]]:
    """Header and formatted cells of the table."""
    return [c for c, _ in COLUMNS], [[f(r) for _, f in COLUMNS] for r in rows]


def format_markdown(rows: Sequence[Row]) -> str:
    """The table in Markdown."""
    head, body = cells(rows)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in body]
    return "\n".join(lines)


def format_text(rows: Sequence[Row]) -> str:
    """The table for a terminal, transposed (a line per figure, a column per run): the table
    has too many figures to fit one run on one line."""
    head, body = cells(rows)
    width = max(len(h) for h in head)
    runs = [max(10, *(len(c) for c in row)) for row in body]
    return "\n".join(
        f"{h:<{width}}  " + "  ".join(f"{row[i]:>{w}}" for row, w in zip(body, runs, strict=True))
        for i, h in enumerate(head)
    )
