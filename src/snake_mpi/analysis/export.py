"""Long-format export for analysis scripts: one row per measured number of a result file.

A row is ``(file, per-run columns from the config, source, round, rank, metric, value)``:
every ``/rounds`` figure of every round and rank, every ``/eval`` figure (rank = the rank that
evaluated), and the numeric per-rank whole-run figures of ``/ranks`` and ``/final_sync`` (round
= ``RUN_ROUND``). ``COLUMNS`` is the header; docs/results-schema.md ("Long-format export") says
what each column means. ``rows`` yields the rows of many files (reading one file at a time),
``write_csv`` needs only the standard library, ``write_parquet`` needs pyarrow and ``to_frame``
pandas. ``snake-mpi export`` is ``main``.
"""

from __future__ import annotations

import csv
import gzip
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from snake_mpi.config import RunConfig, stored_config
from snake_mpi.schemes.rules import check, data_ranks
from snake_mpi.store import Result, ResultError, ResultFormatError, read_result, result_paths

if TYPE_CHECKING:
    import pandas as pd

RUN_ROUND = -1
"""The ``round`` of whole-run figures (``/ranks``, ``/final_sync``)."""
NO_RANK = -1
"""The ``rank`` of an evaluation whose file does not say which rank evaluated."""
SOURCES = ("rounds", "eval", "ranks", "final_sync")
"""Values of the ``source`` column: the HDF5 group a row's number comes from."""

Row = tuple[Any, ...]
"""One row, its values in ``COLUMNS`` order."""


def _remedy(c: RunConfig, key: str) -> float | None:
    """A label-skew option of the run's scheme (``snake.*`` or ``fedavg.*``); None for others."""
    if c.scheme in ("snake", "fedavg"):
        return float(getattr(getattr(c, c.scheme), key))
    return None


def _snake(c: RunConfig, attr: str) -> str:
    return str(getattr(c.snake, attr)) if c.scheme == "snake" else ""


# name -> (kind, value from the config and the result); kind: "str"; "int"; "int?" (an integer
# or None: the setting does not apply to the run's scheme or partition); "float" (or None)
_RUN: dict[str, tuple[str, Callable[[RunConfig, Result], Any]]] = {
    "file": ("str", lambda c, r: str(r.path)),
    "scheme": ("str", lambda c, r: c.scheme),
    "mode": ("str", lambda c, r: _snake(c, "mode")),
    "ranks": ("int", lambda c, r: r.world_size),
    "data_holders": ("int", lambda c, r: len(data_ranks(c, r.world_size))),
    "seed": ("int", lambda c, r: c.seed),
    "model_family": ("str", lambda c, r: c.model.family),
    "model_preset": ("str", lambda c, r: c.model.preset),
    "model_width": ("int", lambda c, r: c.model.width),
    "model_middle_blocks": ("int", lambda c, r: c.model.middle_blocks),
    "model_dtype": ("str", lambda c, r: c.model.dtype),
    "data_name": ("str", lambda c, r: c.data.name),
    "data_partition": ("str", lambda c, r: c.data.partition),
    "data_n_train": ("int", lambda c, r: c.data.n_train),
    "data_n_classes": ("int", lambda c, r: c.data.n_classes),
    "data_alpha": (
        "float",
        lambda c, r: c.data.alpha if c.data.partition == "dirichlet" else None,
    ),
    "train_rounds": ("int", lambda c, r: c.train.rounds),
    "train_local_epochs": ("int", lambda c, r: c.train.local_epochs),
    "train_local_steps": ("int", lambda c, r: c.train.local_steps),
    "train_batch_size": ("int", lambda c, r: c.train.batch_size),
    "train_lr": ("float", lambda c, r: c.train.lr),
    "train_optimizer": ("str", lambda c, r: c.train.optimizer),
    "train_lr_schedule": ("str", lambda c, r: c.train.lr_schedule),
    "snake_transfer": ("str", lambda c, r: _snake(c, "transfer")),
    "snake_ends": ("str", lambda c, r: _snake(c, "ends")),
    "snake_keep": ("str", lambda c, r: _snake(c, "keep")),
    "kd_weight": ("float", lambda c, r: c.snake.kd.weight if c.scheme == "snake" else None),
    "logit_adjust": ("float", lambda c, r: _remedy(c, "logit_adjust")),
    "prox_mu": ("float", lambda c, r: _remedy(c, "prox_mu")),
    "fedavg_clients_per_round": (
        "int?",
        lambda c, r: c.fedavg.clients_per_round if c.scheme == "fedavg" else None,
    ),
    "split_cut": (
        "int?",
        lambda c, r: c.split.cut if c.scheme in ("split", "splitfed") else None,
    ),
    "emulate_bandwidth_bps": ("float", lambda c, r: c.emulate.bandwidth_bps),
    "emulate_latency_s": ("float", lambda c, r: c.emulate.latency_s),
    "device": ("str", lambda c, r: str(r.attrs.get("device", ""))),
}
_KEYS: dict[str, str] = {
    "source": "str",
    "round": "int",
    "rank": "int",
    "metric": "str",
    "value": "float",
}
RUN_COLUMNS: tuple[str, ...] = tuple(_RUN)
"""Per-run columns: the same in every row of a file."""
COLUMNS: tuple[str, ...] = (*RUN_COLUMNS, *_KEYS)
"""The header of the export, in order."""
COLUMN_KINDS: dict[str, str] = {**{k: kind for k, (kind, _) in _RUN.items()}, **_KEYS}
"""Column -> ``"str"``, ``"int"``, ``"int?"`` (may be empty) or ``"float"`` (may be empty)."""


def config_of(res: Result) -> RunConfig:
    """The run's stored config, or ``ResultFormatError`` naming the file."""
    try:
        return check(stored_config(res.config_toml))
    except (ValueError, TypeError, KeyError) as e:  # TOMLDecodeError, ConfigError among them
        raise ResultFormatError(
            res.path, f"config_toml attribute is not a valid run configuration: {e}"
        ) from e


def run_values(res: Result) -> Row:
    """The per-run columns of ``res`` (``RUN_COLUMNS`` order)."""
    cfg = config_of(res)
    return tuple(get(cfg, res) for _, get in _RUN.values())


def result_rows(res: Result) -> Iterator[Row]:
    """Every row of one result: ``/rounds`` (round, rank), ``/eval`` (its round, the rank that
    evaluated), then ``/ranks`` and ``/final_sync`` (round ``RUN_ROUND``); metrics in name order.
    Raises ``ResultFormatError`` (before any row) if the stored config cannot be read."""
    run = run_values(res)
    n = res.world_size
    rounds = {k: v.tolist() for k, v in sorted(res.rounds.items())}
    for r in range(res.n_rounds):
        for k in range(n):
            for metric, values in rounds.items():
                yield (*run, "rounds", r, k, metric, values[r][k])
    ev = res.evaluation
    n_evals = min((len(v) for v in ev.values()), default=0)
    ev_round = ev["round"].tolist() if "round" in ev else list(range(n_evals))
    ev_rank = ev["rank"].tolist() if "rank" in ev else [NO_RANK] * n_evals
    ev_metrics = _per_row({k: v for k, v in ev.items() if k not in ("round", "rank")})
    for i in range(n_evals):
        for metric, values in ev_metrics.items():
            yield (*run, "eval", int(ev_round[i]), int(ev_rank[i]), metric, values[i])
    ranks = _per_rank(res.tables.get("ranks", {}), n)
    sync = {k.split("/", 1)[1]: v for k, v in res.arrays.items() if k.startswith("final_sync/")}
    final = _per_rank(sync, n)
    for source, figures in (("ranks", ranks), ("final_sync", final)):
        for k in range(n):
            for metric, values in figures.items():
                yield (*run, source, RUN_ROUND, k, metric, values[k])


def _per_row(columns: dict[str, np.ndarray]) -> dict[str, list[Any]]:
    """``/eval`` fields by name, one value per evaluation; a field of shape (n, m) gives m
    metrics ``<name>_<j>`` (``class_accuracy_<class>``)."""
    out: dict[str, list[Any]] = {}
    for name, arr in sorted(columns.items()):
        if arr.ndim == 2:
            for j in range(arr.shape[1]):
                out[f"{name}_{j}"] = arr[:, j].tolist()
        else:
            out[name] = arr.tolist()
    return out


def _per_rank(columns: dict[str, np.ndarray], n: int) -> dict[str, list[Any]]:
    """Numeric columns with one entry per rank, by name; a column of shape (n, m) gives m
    metrics ``<name>_<j>`` (``label_histogram_<class>``). Text columns are left out."""
    out: dict[str, list[Any]] = {}
    for name, arr in sorted(columns.items()):
        if arr.dtype.kind not in "biuf" or arr.ndim == 0 or arr.shape[0] != n:
            continue
        if arr.ndim == 1:
            out[name] = arr.tolist()
        elif arr.ndim == 2:
            for j in range(arr.shape[1]):
                out[f"{name}_{j}"] = arr[:, j].tolist()
    return out


def rows(
    paths: Iterable[str | os.PathLike],
    *,
    on_skip: Callable[[Path, str], None] | None = None,
    on_export: Callable[[Path], None] | None = None,
) -> Iterator[Row]:
    """The rows of every complete result file among ``paths`` (a directory stands for its
    result files, as in ``store.result_paths``), one file read at a time. Files that cannot be
    exported (incomplete, damaged, foreign, an unreadable config) are passed to ``on_skip`` as
    ``(path, reason)``; each exported file to ``on_export`` before its rows."""
    for path in result_paths(paths):
        try:
            res = read_result(path)
            first = result_rows(res)
            head = next(first, None)
        except ResultError as e:
            if on_skip is not None:
                on_skip(path, e.reason)
            continue
        if on_export is not None:
            on_export(path)
        if head is not None:
            yield head
            yield from first


def _cell(value: Any) -> Any:
    """A CSV cell: None empty, floats as ``repr`` (exact; ``nan``, ``inf``)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    return value


def write_csv(data: Iterable[Row], out: str | os.PathLike) -> int:
    """Write ``COLUMNS`` and the rows as CSV (gzip-compressed if ``out`` ends in ``.gz``);
    returns the number of rows. Standard library only."""
    path = Path(out)
    opener = gzip.open if path.name.endswith(".gz") else open
    count = 0
    with opener(path, "wt", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for row in data:
            w.writerow([_cell(v) for v in row])
            count += 1
    return count


def _arrow() -> tuple[Any, Any]:
    """(pyarrow, pyarrow.parquet), or ImportError saying what to install."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            "writing Parquet (.parquet) needs the package pyarrow, which is not installed: "
            "pip install pyarrow (or write .csv)"
        ) from e
    return pa, pq


def write_parquet(data: Iterable[Row], out: str | os.PathLike, *, batch: int = 65536) -> int:
    """Write the rows as Parquet (needs pyarrow, not pandas); returns the number of rows."""
    pa, pq = _arrow()
    types = {"str": pa.string(), "int": pa.int64(), "int?": pa.int64(), "float": pa.float64()}
    schema = pa.schema([(c, types[COLUMN_KINDS[c]]) for c in COLUMNS])
    count = 0
    with pq.ParquetWriter(os.fspath(out), schema) as writer:
        chunk: list[Row] = []
        for row in data:
            chunk.append(row)
            if len(chunk) >= batch:
                writer.write_table(_arrow_table(pa, schema, chunk))
                count += len(chunk)
                chunk = []
        if chunk or not count:
            writer.write_table(_arrow_table(pa, schema, chunk))
            count += len(chunk)
    return count


def _arrow_table(pa: Any, schema: Any, chunk: list[Row]) -> Any:
    """One batch of rows as a pyarrow Table of ``schema`` (integers of float columns as floats)."""
    cols = list(zip(*chunk)) if chunk else [() for _ in COLUMNS]
    data = {}
    for name, col in zip(COLUMNS, cols):
        if COLUMN_KINDS[name] == "float":
            data[name] = [None if v is None else float(v) for v in col]
        else:
            data[name] = list(col)
    return pa.Table.from_pydict(data, schema=schema)


def _pandas() -> Any:
    try:
        import pandas as pd
    except ImportError as e:
        raise ImportError(
            "to_frame needs pandas, which is not installed: pip install 'snake-mpi[analysis]' "
            "(the analysis extra) or pip install pandas"
        ) from e
    return pd


def to_frame(results: Iterable[Result]) -> pd.DataFrame:
    """The rows of ``results`` as a pandas DataFrame with ``COLUMNS``: ``value`` and the
    ``"float"`` columns float64 (NaN where empty), ``"int"`` int64, ``"int?"`` nullable Int64.
    Needs pandas (the ``analysis`` extra); raises ``ResultFormatError`` for an unreadable
    config."""
    pd = _pandas()
    data: list[Row] = [row for res in results for row in result_rows(res)]
    cols = list(zip(*data)) if data else [() for _ in COLUMNS]
    dtypes = {"int": "int64", "int?": "Int64", "float": "float64"}
    frame = {}
    for name, col in zip(COLUMNS, cols):
        kind = COLUMN_KINDS[name]
        if kind == "str":
            frame[name] = pd.Series(list(col), dtype=object).astype(str)
        elif kind == "float":
            frame[name] = pd.Series([np.nan if v is None else v for v in col], dtype="float64")
        else:
            frame[name] = pd.Series(list(col), dtype=dtypes[kind])
    return pd.DataFrame(frame, columns=list(COLUMNS))


FORMATS = {".csv": write_csv, ".csv.gz": write_csv, ".parquet": write_parquet}
"""Output suffix -> writer."""


def format_of(out: str | os.PathLike) -> str | None:
    """The ``FORMATS`` suffix ``out`` ends in (case-insensitive), or None."""
    name = Path(out).name.lower()
    return next((s for s in sorted(FORMATS, key=len, reverse=True) if name.endswith(s)), None)


def main(argv: Sequence[str] | None = None) -> int:
    """``snake-mpi export``: exit status 0 (rows written; some files may have been skipped),
    1 (nothing exported, a missing package, or the output cannot be written), 2 (usage)."""
    import argparse

    p = argparse.ArgumentParser(
        prog="snake-mpi export",
        description="Write every measured figure of result files as one long table: one row per "
        "(file, source, round, rank, metric) with per-run columns from the config "
        "(docs/results-schema.md, 'Long-format export'). Incomplete or unreadable files are "
        "skipped with the reason on stderr.",
    )
    p.add_argument("results", nargs="+", help="result files, or directories of them")
    p.add_argument(
        "--out",
        required=True,
        metavar="FILE",
        help="table to write; the format by its suffix: .csv, .csv.gz, .parquet (needs pyarrow)",
    )
    args = p.parse_args(argv)
    out = Path(args.out)
    suffix = format_of(out)
    if suffix is None:
        p.error(f"--out {out}: unknown suffix; use one of {', '.join(FORMATS)}")
    if suffix == ".parquet":
        try:
            _arrow()
        except ImportError as e:
            print(f"snake-mpi export: {e}", file=sys.stderr)
            return 1
    exported: list[Path] = []

    def skip(path: Path, why: str) -> None:
        print(f"snake-mpi export: skipped {path}: {why}", file=sys.stderr)

    tmp = out.with_name(f".tmp{os.getpid()}.{out.name}")  # the same suffix: the same format
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        n = FORMATS[suffix](rows(args.results, on_skip=skip, on_export=exported.append), tmp)
        if exported:
            os.replace(tmp, out)
    except OSError as e:
        print(f"snake-mpi export: cannot write {out}: {e}", file=sys.stderr)
        return 1
    finally:
        tmp.unlink(missing_ok=True)
    if not exported:
        print("snake-mpi export: no complete result files to export", file=sys.stderr)
        return 1
    print(f"wrote {n} rows from {len(exported)} result file(s) to {out}")
    return 0
