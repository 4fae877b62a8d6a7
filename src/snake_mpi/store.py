"""The result file: HDF5 schema (versioned), atomic write by one writer, and the reader API.

This is the only module that imports h5py. Rank 0 writes ``PATH.partial`` and flushes it
after every round; ``ResultWriter.complete`` writes ``status="complete"`` last, fsyncs and
renames the file to ``PATH``, so a run that dies leaves no file that looks complete. Readers
refuse (or, in ``scan_results``, list) anything incomplete, truncated or foreign with a
message naming the file. The layout is described in docs/results-schema.md.

HDF5 file locking fails on some cluster file systems (NFS, Lustre) with errors such as
"unable to lock file"; set ``HDF5_USE_FILE_LOCKING=FALSE`` in the job's environment (e.g.
``export HDF5_USE_FILE_LOCKING=FALSE`` in the sbatch script) to work around it.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import h5py
import numpy as np

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
RESULT_SUFFIXES = (".h5", ".hdf5", PARTIAL_SUFFIX)
"""File names ``scan_results`` picks up when it is given a directory."""

_CHUNK_TARGET_BYTES = 64 * 1024
_RESERVED_GROUPS = ("rounds", "eval", "series", "provenance")
_TABLE_KIND = "table"


def hdf5_version() -> str:
    """Version of the HDF5 library h5py is built against (for provenance)."""
    return str(h5py.version.hdf5_version)


def partial_path(path: str | os.PathLike) -> pathlib.Path:
    """The in-progress name of a result file: ``PATH.partial``."""
    return pathlib.Path(os.fspath(path) + PARTIAL_SUFFIX)


# ---------------------------------------------------------------------------- writing


class ResultWriter:
    """One writer (rank 0). Writes PATH.partial, flushed after every round; complete() marks
    status='complete' and renames to PATH.

    A stale ``PATH.partial`` from a dead run is replaced; ``PATH`` itself is not touched
    until ``complete()``. Used as a context manager, an exception closes the file incomplete.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        world_size: int,
        round_fields: dict[str, str],
        eval_fields: dict[str, str],
        attrs: dict[str, str | int | float],
        config_toml: str,
    ) -> None:
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.path = pathlib.Path(path)
        self.partial = partial_path(self.path)
        self.world_size = int(world_size)
        self.round_fields = dict(round_fields)
        self.eval_fields = dict(eval_fields)
        self.n_rounds = 0
        self.n_evals = 0
        self._done = False
        self.partial.unlink(missing_ok=True)
        self._file: h5py.File | None = h5py.File(self.partial, "w")
        f = self._file
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["status"] = "running"
        f.attrs["world_size"] = self.world_size
        f.attrs["n_rounds"] = 0
        f.attrs["config_toml"] = _attr(config_toml)
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        rows = max(1, min(1024, _CHUNK_TARGET_BYTES // (8 * self.world_size)))
        rounds = f.create_group("rounds")
        for name, dtype in self.round_fields.items():
            rounds.create_dataset(
                name,
                shape=(0, self.world_size),
                maxshape=(None, self.world_size),
                dtype=np.dtype(dtype),
                chunks=(rows, self.world_size),
            )
        ev = f.create_group("eval")
        for name, dtype in self.eval_fields.items():
            ev.create_dataset(
                name, shape=(0,), maxshape=(None,), dtype=np.dtype(dtype), chunks=(256,)
            )
        f.flush()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close_incomplete()

    @property
    def _f(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"{self.partial}: result writer is already closed")
        return self._file

    def write_provenance(self, prov: dict[str, str | int]) -> None:
        """Store the provenance dict as attributes of ``/provenance``."""
        group = self._f.require_group("provenance")
        for key, value in prov.items():
            group.attrs[key] = _attr(value)
        self._f.flush()

    def write_table(self, name: str, columns: dict[str, np.ndarray]) -> None:
        """Store columns of equal length as datasets ``/<name>/<column>``.

        String (or object) columns become variable-length UTF-8 strings; the group is marked
        ``kind="table"`` so the reader returns it in ``Result.tables``.
        """
        if name in _RESERVED_GROUPS:
            raise ValueError(f"table name {name!r} is reserved")
        lengths = {col: len(np.asarray(data)) for col, data in columns.items()}
        if len(set(lengths.values())) > 1:
            raise ValueError(f"table {name!r}: columns differ in length: {lengths}")
        group = self._f.require_group(name)
        group.attrs["kind"] = _TABLE_KIND
        for col, data in columns.items():
            _put(group, col, data)
        self._f.flush()

    def write_array(self, path: str, data: np.ndarray, *, attrs: dict | None = None) -> None:
        """Store one dataset at ``path`` (e.g. ``"final_sync/bytes_sent"``), replacing any."""
        ds = _put(self._f, path.strip("/"), data)
        for key, value in (attrs or {}).items():
            ds.attrs[key] = _attr(value)
        self._f.flush()

    def append_round(
        self, per_rank: dict[str, np.ndarray], evaluation: dict[str, float] | None = None
    ) -> None:
        """Append one round: every round field, shape (world_size,); optionally one evaluation
        row (every eval field). Flushes the file."""
        _check_names(per_rank, self.round_fields, "round")
        values = {}
        for name, dtype in self.round_fields.items():
            arr = np.asarray(per_rank[name], dtype=dtype)
            if arr.shape != (self.world_size,):
                raise ValueError(
                    f"round field {name!r}: shape {arr.shape}, expected ({self.world_size},)"
                )
            values[name] = arr
        if evaluation is not None:
            _check_names(evaluation, self.eval_fields, "eval")
        f = self._f
        for name, arr in values.items():
            ds = f["rounds"][name]
            ds.resize(self.n_rounds + 1, axis=0)
            ds[self.n_rounds] = arr
        self.n_rounds += 1
        if evaluation is not None:
            for name, dtype in self.eval_fields.items():
                ds = f["eval"][name]
                ds.resize(self.n_evals + 1, axis=0)
                ds[self.n_evals] = np.asarray(evaluation[name], dtype=dtype)
            self.n_evals += 1
        f.attrs["n_rounds"] = self.n_rounds
        f.flush()

    def write_series(self, rank: int, series: dict[str, np.ndarray]) -> None:
        """Store one rank's time series as ``/series/rank_<rank>/<name>``."""
        group = self._f.require_group(f"series/rank_{int(rank)}")
        for name, data in series.items():
            _put(group, name, data)
        self._f.flush()

    def complete(self) -> pathlib.Path:
        """Mark the file complete, close and fsync it, rename it to PATH; returns PATH."""
        if self._done:
            return self.path
        f = self._f
        f.attrs["n_rounds"] = self.n_rounds
        f.attrs["status"] = "complete"
        f.flush()
        f.close()
        self._file = None
        _fsync_path(self.partial)
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)
        self._done = True
        return self.path

    def close_incomplete(self) -> None:
        """Close without completing: PATH.partial stays, status "running" (error paths)."""
        if self._file is not None:
            try:
                self._file.close()
            finally:
                self._file = None


def _check_names(given: dict[str, Any], expected: dict[str, str], kind: str) -> None:
    missing = [n for n in expected if n not in given]
    if missing:
        raise KeyError(f"{kind} field {missing[0]!r} missing (all of {list(expected)} required)")
    unknown = [n for n in given if n not in expected]
    if unknown:
        raise KeyError(f"unknown {kind} field {unknown[0]!r} (known: {list(expected)})")


def _is_text(arr: np.ndarray) -> bool:
    return arr.dtype.kind in "OUS"


def _put(parent: h5py.Group, name: str, data: Any) -> h5py.Dataset:
    """Create dataset ``name`` under ``parent`` (replacing one there); text as UTF-8 strings."""
    if name in parent:
        del parent[name]
    arr = np.asarray(data)
    if _is_text(arr):
        text = [_text(x) for x in arr.ravel()]
        arr = np.array(text, dtype=h5py.string_dtype("utf-8")).reshape(arr.shape)
    return parent.create_dataset(name, data=arr)


def _text(value: Any) -> str:
    """A str HDF5 can hold: NUL characters removed (Open MPI's version string ends in one)."""
    text = value.decode(errors="replace") if isinstance(value, bytes) else str(value)
    return text.replace("\x00", "")


def _attr(value: Any) -> Any:
    return _text(value) if isinstance(value, str | bytes) else value


def _fsync_path(path: pathlib.Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(directory: pathlib.Path) -> None:
    """Make the rename durable; not every platform can open a directory (Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------- reading


class ResultError(Exception):
    """A result file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = pathlib.Path(path)
        self.reason = reason


class IncompleteResultError(ResultError):
    """The run did not finish: status is not "complete", or it is a ``.partial`` file."""


class ResultFormatError(ResultError):
    """Not a usable result file: not HDF5, truncated, foreign (no schema_version) or newer."""


@dataclass
class Result:
    """A result file read into memory (strings as ``str``, numbers as numpy arrays)."""

    path: pathlib.Path
    attrs: dict[str, Any]
    """Root attributes except ``config_toml`` (schema_version, status, world_size, ...)."""
    provenance: dict[str, Any]
    rounds: dict[str, np.ndarray]
    """``/rounds/<field>``, shape (n_rounds, world_size)."""
    evaluation: dict[str, np.ndarray]
    """``/eval/<field>``, one entry per evaluated round."""
    tables: dict[str, dict[str, np.ndarray]]
    """Groups written by ``write_table`` (e.g. "blocks", "ranks"), every dataset in them."""
    arrays: dict[str, np.ndarray]
    """Every other dataset by path, e.g. "final_sync/bytes_sent"."""
    series: dict[int, dict[str, np.ndarray]]
    """``/series/rank_<k>/<name>`` by rank."""
    config_toml: str

    @property
    def world_size(self) -> int:
        """Number of ranks of the run."""
        return int(self.attrs["world_size"])

    @property
    def n_rounds(self) -> int:
        """Rounds actually stored (the length of the round datasets)."""
        for arr in self.rounds.values():
            return int(arr.shape[0])
        return int(self.attrs.get("n_rounds", 0))

    @property
    def scheme(self) -> str:
        """The scheme that ran (e.g. "snake"), "" if not recorded."""
        return str(self.attrs.get("scheme", ""))

    @property
    def status(self) -> str:
        """ "complete" or "running" (a run that did not finish)."""
        return str(self.attrs.get("status", ""))


def read_result(path: str | os.PathLike, *, allow_incomplete: bool = False) -> Result:
    """Read a result file; raises a ``ResultError`` naming the file if it is unusable.

    Without ``allow_incomplete`` a ``.partial`` file or status other than "complete" raises
    ``IncompleteResultError`` (a ``.partial`` file is not opened at all, as its writer may
    still be running).
    """
    p = pathlib.Path(path)
    if not p.is_file():
        raise ResultError(p, "no such file")
    if p.name.endswith(PARTIAL_SUFFIX) and not allow_incomplete:
        raise IncompleteResultError(p, "incomplete result (.partial: the run did not finish)")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise ResultFormatError(p, f"not a readable HDF5 file (truncated or not HDF5): {e}") from e
    try:
        with f:
            return _read_open(p, f, allow_incomplete)
    except ResultError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise ResultFormatError(p, f"damaged result file: {e}") from e


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete, readable result file (what a resumable runner skips)."""
    try:
        read_result(path)
    except (ResultError, OSError):
        return False
    return True


def _read_open(p: pathlib.Path, f: h5py.File, allow_incomplete: bool) -> Result:
    attrs = {k: _py(v) for k, v in f.attrs.items()}
    if "schema_version" not in attrs:
        raise ResultFormatError(p, "not a snake_mpi result file (no schema_version attribute)")
    version = int(attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise ResultFormatError(
            p, f"schema_version {version} is newer than this snake_mpi reads ({SCHEMA_VERSION})"
        )
    status = str(attrs.get("status", ""))
    if not allow_incomplete and status != "complete":
        raise IncompleteResultError(p, f"incomplete result (status {status!r})")
    config_toml = str(attrs.pop("config_toml", ""))
    provenance = {k: _py(v) for k, v in f["provenance"].attrs.items()} if "provenance" in f else {}
    series: dict[int, dict[str, np.ndarray]] = {}
    if "series" in f:
        for name, group in f["series"].items():
            series[int(name.removeprefix("rank_"))] = _datasets(group)
    tables, arrays = {}, {}
    for name, obj in f.items():
        if name in _RESERVED_GROUPS:
            continue
        if isinstance(obj, h5py.Group) and obj.attrs.get("kind") == _TABLE_KIND:
            tables[name] = _datasets(obj)
        elif isinstance(obj, h5py.Dataset):
            arrays[name] = _value(obj)
        else:
            obj.visititems(lambda sub, o, g=name: _collect(arrays, f"{g}/{sub}", o))
    return Result(
        path=p,
        attrs=attrs,
        provenance=provenance,
        rounds=_datasets(f["rounds"]) if "rounds" in f else {},
        evaluation=_datasets(f["eval"]) if "eval" in f else {},
        tables=tables,
        arrays=arrays,
        series=dict(sorted(series.items())),
        config_toml=config_toml,
    )


def _collect(out: dict[str, np.ndarray], path: str, obj: Any) -> None:
    if isinstance(obj, h5py.Dataset):
        out[path] = _value(obj)


def _datasets(group: h5py.Group) -> dict[str, np.ndarray]:
    return {k: _value(v) for k, v in group.items() if isinstance(v, h5py.Dataset)}


def _value(ds: h5py.Dataset) -> np.ndarray:
    """Dataset contents; strings as an object array of ``str``."""
    if h5py.check_string_dtype(ds.dtype) is not None:
        return np.asarray(ds.asstr()[()], dtype=object)
    return np.asarray(ds[()])


def _py(value: Any) -> Any:
    """An attribute as a plain Python value (str, int, float, bool or list)."""
    if isinstance(value, bytes):
        return value.decode(errors="replace")
    if isinstance(value, np.ndarray):
        return [_py(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    return value


def scan_results(
    paths: Iterable[str | os.PathLike],
) -> tuple[list[Result], list[tuple[pathlib.Path, str]]]:
    """Read many results: (complete results, [(path, reason)] for every other file).

    A directory stands for the ``*.h5``, ``*.hdf5`` and ``*.partial`` files in it; incomplete,
    truncated or foreign files are listed with the reason instead of raising.
    """
    results: list[Result] = []
    skipped: list[tuple[pathlib.Path, str]] = []
    for path in _expand(paths):
        try:
            results.append(read_result(path))
        except ResultError as e:
            skipped.append((path, e.reason))
    return results, skipped


def _expand(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    out: list[pathlib.Path] = []
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():
            out.extend(q for q in sorted(p.iterdir()) if q.name.endswith(RESULT_SUFFIXES))
        else:
            out.append(p)
    return out
