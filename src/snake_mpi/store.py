"""The result file: HDF5 schema (versioned), atomic write by one writer, and the reader API.

This is the only module that imports h5py. Rank 0 writes ``PATH.partial`` and flushes it
after every round; ``ResultWriter.complete`` writes ``status="complete"`` last, fsyncs and
renames the file to ``PATH``, so a run that dies leaves no file that looks complete. Readers
refuse (or, in ``scan_results``, list) anything incomplete, truncated, foreign or damaged with
a message naming the file; asked for incomplete data (``snake-mpi show``), they read what
they can and list the objects they could not read. The layout is described in
docs/results-schema.md, its metrics in ``schema.py``.

HDF5 file locking fails on some cluster file systems (NFS, Lustre) with errors such as
"unable to lock file"; set ``HDF5_USE_FILE_LOCKING=FALSE`` in the job's environment (e.g.
``export HDF5_USE_FILE_LOCKING=FALSE`` in the sbatch script) to work around it.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import pathlib
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import h5py
import numpy as np

from snake_mpi import durable, schema
from snake_mpi.durable import as_storage_full, ensure_room, is_no_space

SCHEMA_VERSION = 1
PARTIAL_SUFFIX = ".partial"
RESULT_SUFFIXES = (".h5", ".hdf5", PARTIAL_SUFFIX)
"""File names ``scan_results`` picks up when it is given a directory."""

_CHUNK_TARGET_BYTES = 64 * 1024
_NEW_FILE_BYTES = 256 * 1024
"""Room a new result file's groups, datasets and attributes take (before any round)."""
_METADATA_BYTES = 16 * 1024
"""Room for the metadata a write updates, beyond its data (object headers, B-tree nodes)."""
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
        round_fields: Mapping[str, str] | None = None,
        eval_fields: Mapping[str, str] | None = None,
        attrs: Mapping[str, str | int | float],
        config_toml: str,
        carried_over: tuple[Result, int] | None = None,
        eval_widths: Mapping[str, int] | None = None,
    ) -> None:
        """``carried_over = (result, k)``: a resumed run's file starts with the first ``k``
        rounds (and their evaluations) of ``result`` (its ``.partial``); it is built under a
        temporary name and then replaces that ``.partial``, so a kill leaves the old one.
        ``round_fields`` and ``eval_fields``: name -> dtype of the ``/rounds`` and ``/eval``
        datasets, by default every ``schema.ROUNDS`` and 1-D ``schema.EVAL`` metric.
        ``eval_widths``: eval fields that hold a row of that many values per evaluation
        (shape (n_evals, width), e.g. ``class_accuracy``); the others are 1-D."""
        if world_size < 1:
            raise ValueError(f"world_size must be at least 1, got {world_size}")
        self.path = pathlib.Path(path)
        self.partial = partial_path(self.path)
        self.world_size = int(world_size)
        if round_fields is None:
            round_fields = schema.dtypes(schema.ROUNDS)
        if eval_fields is None:
            eval_fields = schema.dtypes(schema.EVAL, one_per_row=True)
        self.round_fields = dict(round_fields)
        self.eval_fields = dict(eval_fields)
        self.eval_widths = {k: int(w) for k, w in (eval_widths or {}).items()}
        for name, width in self.eval_widths.items():
            if name not in self.eval_fields or width < 1:
                raise ValueError(f"eval_widths: {name!r} = {width}: not an eval field, or < 1")
        self.n_rounds = 0
        self.n_evals = 0
        self._done = False
        target = self.partial
        if carried_over is not None:
            target = pathlib.Path(f"{self.partial}.new")
            target.unlink(missing_ok=True)
            carried = carried_over[0].path.stat().st_size
            kept = f"{self.partial} is kept as it was; free space, then run again with --resume"
            ensure_room(target, carried + _NEW_FILE_BYTES, what="the resumed result", kept=kept)
        else:
            self.partial.unlink(missing_ok=True)
            ensure_room(target, _NEW_FILE_BYTES, what="a new result file", kept="nothing yet")
        self._file: h5py.File | None = h5py.File(target, "w")
        f = self._file
        f.attrs["schema_version"] = SCHEMA_VERSION
        f.attrs["status"] = "running"
        f.attrs["world_size"] = self.world_size
        f.attrs["n_rounds"] = 0
        f.attrs["config_toml"] = _attr(config_toml)
        for key, value in attrs.items():
            f.attrs[key] = _attr(value)
        self._create_datasets(f)
        if carried_over is not None:
            self._carry_over(*carried_over)
            f.flush()
            _fsync_path(target)
            os.replace(target, self.partial)
            _fsync_dir(self.partial.parent)
        f.flush()
        self._identity = _identity(self.partial)

    def _create_datasets(self, f: h5py.File) -> None:
        """Empty, growable ``/rounds`` (one column per rank) and ``/eval`` datasets."""
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
            row = (self.eval_widths[name],) if name in self.eval_widths else ()
            ev.create_dataset(
                name,
                shape=(0, *row),
                maxshape=(None, *row),
                dtype=np.dtype(dtype),
                chunks=(max(1, min(256, _CHUNK_TARGET_BYTES // (8 * math.prod(row)))), *row),
            )

    def _carry_over(self, res: Result, n_rounds: int) -> None:
        """Copy the first ``n_rounds`` rounds and their evaluations of ``res``."""
        f = self._f
        for name, dtype in self.round_fields.items():
            if name not in res.rounds:
                raise ValueError(f"{res.path}: round field {name!r} missing; cannot resume")
            data = np.asarray(res.rounds[name][:n_rounds], dtype=dtype)
            ds = f["rounds"][name]
            ds.resize(n_rounds, axis=0)
            ds[:] = data
        self.n_rounds = n_rounds
        rounds = res.evaluation.get("round", np.zeros(0, dtype=np.int64))
        keep = int(np.count_nonzero(rounds < n_rounds))
        for name, dtype in self.eval_fields.items():
            if keep and name not in res.evaluation:
                raise ValueError(f"{res.path}: eval field {name!r} missing; cannot resume")
            ds = f["eval"][name]
            ds.resize(keep, axis=0)
            if keep:
                data = np.asarray(res.evaluation[name][:keep], dtype=dtype)
                if data.shape != ds.shape:
                    raise ValueError(
                        f"{res.path}: /eval/{name} has shape {data.shape[1:]} per evaluation, "
                        f"this run {ds.shape[1:]}; cannot resume"
                    )
                ds[:] = data
        self.n_evals = keep
        f.attrs["n_rounds"] = self.n_rounds

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close_incomplete()

    @property
    def _f(self) -> h5py.File:
        if self._file is None:
            raise RuntimeError(f"{self.partial}: result writer is already closed")
        return self._file

    def _kept(self) -> str:
        return (
            f"{self.partial} keeps its {self.n_rounds} complete round(s) (a result in progress); "
            "free space, then run again with --resume to continue after the last checkpoint"
        )

    @contextlib.contextmanager
    def _writing(self, what: str, needed_bytes: int) -> Iterator[h5py.File]:
        """A write that grows the file by up to ``needed_bytes``: refused before it starts
        where the file system lacks the room (``durable.StorageFull``; the file keeps its last
        flushed state), and an ``ENOSPC`` that happens anyway reported the same way, the file
        closed without another write."""
        f = self._f
        ensure_room(self.partial, needed_bytes + _METADATA_BYTES, what=what, kept=self._kept())
        try:
            yield f
        except (OSError, RuntimeError) as e:
            if not is_no_space(e):
                raise
            self.close_incomplete()
            raise as_storage_full(e, self.partial, what=what, kept=self._kept()) from None

    def write_provenance(self, prov: dict[str, str | int]) -> None:
        """Store the provenance dict as attributes of ``/provenance``."""
        need = sum(len(str(v)) + len(k) for k, v in prov.items())
        with self._writing("the provenance", need) as f:
            group = f.require_group("provenance")
            for key, value in prov.items():
                group.attrs[key] = _attr(value)
            f.flush()

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
        with self._writing(f"the /{name} table", _nbytes(columns.values())) as f:
            group = f.require_group(name)
            group.attrs["kind"] = _TABLE_KIND
            for col, data in columns.items():
                _put(group, col, data)
            f.flush()

    def write_array(self, path: str, data: np.ndarray, *, attrs: dict | None = None) -> None:
        """Store one dataset at ``path`` (e.g. ``"final_sync/bytes_sent"``), replacing any."""
        with self._writing(f"/{path.strip('/')}", _nbytes([data])) as f:
            ds = _put(f, path.strip("/"), data)
            for key, value in (attrs or {}).items():
                ds.attrs[key] = _attr(value)
            f.flush()

    def append_round(
        self, per_rank: dict[str, np.ndarray], evaluation: Mapping[str, Any] | None = None
    ) -> None:
        """Append one round: every round field, shape (world_size,); optionally one evaluation
        row (every eval field: a number, or for those of ``eval_widths`` a row of that many).
        Flushes the file."""
        _check_names(per_rank, self.round_fields, "round")
        values = {}
        for name, dtype in self.round_fields.items():
            arr = np.asarray(per_rank[name], dtype=dtype)
            if arr.shape != (self.world_size,):
                raise ValueError(
                    f"round field {name!r}: shape {arr.shape}, expected ({self.world_size},)"
                )
            values[name] = arr
        ev_values = {}
        if evaluation is not None:
            _check_names(evaluation, self.eval_fields, "eval")
            for name, dtype in self.eval_fields.items():
                arr = np.asarray(evaluation[name], dtype=dtype)
                want = (self.eval_widths[name],) if name in self.eval_widths else ()
                if arr.shape != want:
                    raise ValueError(f"eval field {name!r}: shape {arr.shape}, expected {want}")
                ev_values[name] = arr
        need = self._new_chunk_bytes("rounds", self.n_rounds)
        if evaluation is not None:
            need += self._new_chunk_bytes("eval", self.n_evals)
        with self._writing(f"round {self.n_rounds + 1}'s rows", need) as f:
            for name, arr in values.items():
                ds = f["rounds"][name]
                ds.resize(self.n_rounds + 1, axis=0)
                ds[self.n_rounds] = arr
            if evaluation is not None:
                for name, arr in ev_values.items():
                    ds = f["eval"][name]
                    ds.resize(self.n_evals + 1, axis=0)
                    ds[self.n_evals] = arr
            f.attrs["n_rounds"] = self.n_rounds + 1
            f.flush()
        self.n_rounds += 1
        if evaluation is not None:
            self.n_evals += 1

    def _new_chunk_bytes(self, group: str, row: int) -> int:
        """Bytes HDF5 allocates to write row ``row`` of every dataset of ``group``: a chunk of
        each that has none for that row yet."""
        total = 0
        for ds in self._f[group].values():
            chunks = ds.chunks or ds.shape
            if row % chunks[0] == 0:
                total += math.prod(chunks) * ds.dtype.itemsize
        return total

    def write_series(self, rank: int, series: dict[str, np.ndarray]) -> None:
        """Store one rank's time series as ``/series/rank_<rank>/<name>``."""
        with self._writing(f"rank {rank}'s series", _nbytes(series.values())) as f:
            group = f.require_group(f"series/rank_{int(rank)}")
            for name, data in series.items():
                _put(group, name, data)
            f.flush()

    def complete(self) -> pathlib.Path:
        """Mark the file complete, close and fsync it, rename it to PATH; returns PATH."""
        if self._done:
            return self.path
        with self._writing("its completion", 0) as f:
            f.attrs["n_rounds"] = self.n_rounds
            f.attrs["status"] = "complete"
            f.flush()
            f.close()
        self._file = None
        try:
            same = _identity(self.partial) == self._identity
        except FileNotFoundError:
            same = False
        if not same:  # never rename a file this writer did not write
            raise RuntimeError(
                f"{self.partial} is no longer the file this run wrote (another run replaced or "
                f"removed it); {self.path} was not written"
            )
        _fsync_path(self.partial)
        os.replace(self.partial, self.path)
        _fsync_dir(self.path.parent)
        self._done = True
        return self.path

    def close_incomplete(self) -> None:
        """Close without completing: PATH.partial stays, status "running" (error paths: an
        error of the close itself, such as a full disk, does not hide the one being handled)."""
        if self._file is not None:
            try:
                with contextlib.suppress(OSError, RuntimeError):
                    self._file.close()
            finally:
                self._file = None


def _nbytes(arrays: Iterable[Any]) -> int:
    """Bytes the arrays (or lists of strings) take in the file, roughly: their data."""
    total = 0
    for data in arrays:
        arr = np.asarray(data)
        if arr.dtype.kind in "OUS":
            total += sum(len(str(x).encode()) + 16 for x in arr.ravel())
        else:
            total += arr.nbytes
    return total


def _check_names(given: Mapping[str, Any], expected: dict[str, str], kind: str) -> None:
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


def _identity(path: pathlib.Path) -> tuple[int, int]:
    """(device, inode) of a file: the same name may later hold another file."""
    st = os.stat(path)
    return st.st_dev, st.st_ino


_fsync_path = durable.fsync_path
_fsync_dir = durable.fsync_dir


# ---------------------------------------------------------------------------- reading


class ResultError(Exception):
    """A result file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | os.PathLike, reason: str) -> None:
        super().__init__(f"{os.fspath(path)}: {reason}")
        self.path = pathlib.Path(path)
        self.reason = reason


class IncompleteResultError(ResultError):
    """The run did not finish: status is not "complete", or it is a ``.partial`` file."""


class ResultInUseError(IncompleteResultError):
    """Another process (the run writing it) holds the file's HDF5 lock."""


class ResultFormatError(ResultError):
    """Not a usable result file: not HDF5, truncated, foreign (no schema_version), newer, or
    damaged (an object the schema needs is missing its data or has the wrong kind or shape)."""


IN_USE = (
    "in use by a running job (HDF5 file lock held); try again when it ends, "
    "or open with HDF5_USE_FILE_LOCKING=FALSE"
)
"""The reason given for a file whose HDF5 lock another process holds."""


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
    """``/eval/<field>``, one entry per evaluated round: shape (n_evals,), or (n_evals, k) for
    a field with a row per evaluation (``class_accuracy``: (n_evals, n_classes); absent in
    files of language models and files written before it)."""
    tables: dict[str, dict[str, np.ndarray]]
    """Groups written by ``write_table`` (e.g. "blocks", "ranks"), every dataset in them."""
    arrays: dict[str, np.ndarray]
    """Every other dataset by path, e.g. "final_sync/bytes_sent"."""
    series: dict[int, dict[str, np.ndarray]]
    """``/series/rank_<k>/<name>`` by rank."""
    config_toml: str
    unreadable: list[tuple[str, str]] = field(default_factory=list)
    """Incomplete files only: (HDF5 path, reason) for every object that could not be read;
    what was read is in the fields above."""
    in_use: bool = False
    """Read without the HDF5 lock while another process (its run) held it: the round being
    written when it was read may be missing or half there."""

    @property
    def world_size(self) -> int:
        """Number of ranks of the run."""
        return int(self.attrs["world_size"])

    @property
    def n_rounds(self) -> int:
        """Rounds actually stored (the length of the round datasets)."""
        for arr in self.rounds.values():
            return int(arr.shape[0])
        n = self.attrs.get("n_rounds", 0)
        return n if isinstance(n, int) and n >= 0 else 0

    @property
    def scheme(self) -> str:
        """The scheme that ran (e.g. "snake"), "" if not recorded."""
        return str(self.attrs.get("scheme", ""))

    @property
    def status(self) -> str:
        """ "complete" or "running" (a run that did not finish)."""
        return str(self.attrs.get("status", ""))


_READ_ERRORS = (OSError, KeyError, ValueError, TypeError, RuntimeError, AttributeError)
"""What h5py and numpy raise on damaged or half-written objects."""


def read_result(path: str | os.PathLike, *, allow_incomplete: bool = False) -> Result:
    """Read a result file; raises a ``ResultError`` naming the file if it is unusable.

    Without ``allow_incomplete`` a ``.partial`` file or status other than "complete" raises
    ``IncompleteResultError`` (a ``.partial`` file is not opened at all, as its writer may
    still be running). With it, an incomplete file is read as far as it can be: objects that
    are damaged or half-written are left out and listed in ``Result.unreadable``, and a file
    locked by its running writer is read without the lock (``Result.in_use``). A complete file
    with any such object raises ``ResultFormatError``.
    """
    p = pathlib.Path(path)
    if p.is_dir():
        raise ResultError(p, "is a directory, not a result file")
    if not p.exists():
        raise ResultError(p, "no such file")
    if not p.is_file():
        raise ResultError(p, "not a regular file")
    partial = p.name.endswith(PARTIAL_SUFFIX)
    if partial and not allow_incomplete:
        raise IncompleteResultError(p, "incomplete result (.partial: the run did not finish)")
    in_use = False
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        if not _lock_failed(e):
            raise ResultFormatError(p, _open_failure(e)) from e
        held = _lock_held(e)
        if not allow_incomplete:
            if held:
                raise ResultInUseError(p, IN_USE) from e
            raise ResultFormatError(p, _no_locking(e)) from e
        try:
            f = h5py.File(p, "r", locking=False)
        except (OSError, ValueError, TypeError) as e2:
            reason = IN_USE if held else _no_locking(e)
            raise (ResultInUseError if held else ResultFormatError)(p, reason) from e2
        in_use = held
    try:
        with f:
            return _read_open(
                p, f, allow_incomplete=allow_incomplete, partial=partial, in_use=in_use
            )
    except ResultError:
        raise
    except _READ_ERRORS as e:
        raise ResultFormatError(p, f"damaged result file: {e}") from e


def is_complete(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a complete, readable result file (what a resumable runner skips)."""
    try:
        read_result(path)
    except (ResultError, OSError):
        return False
    return True


def _lock_failed(e: OSError) -> bool:
    return "unable to lock file" in str(e)


def _lock_held(e: OSError) -> bool:
    """The lock is held by another process (EAGAIN), not unsupported by the file system."""
    return e.errno in (errno.EAGAIN, errno.EWOULDBLOCK) or f"errno = {errno.EAGAIN}," in str(e)


def _no_locking(e: OSError) -> str:
    return (
        f"HDF5 could not lock the file ({e}); file systems such as NFS or Lustre do not "
        "support it: set HDF5_USE_FILE_LOCKING=FALSE"
    )


def _open_failure(e: OSError) -> str:
    """Why h5py could not open the file, in words."""
    text = str(e)
    m = re.search(r"truncated file: eof = (\d+).*stored_eof = (\d+)", text)
    if m:
        have, want = int(m.group(1)), int(m.group(2))
        return (
            f"truncated HDF5 file: {have:,} of its {want:,} bytes are there (its writer was "
            "killed or the disk filled up); HDF5 cannot open it, so nothing in it is readable"
        )
    if "file signature not found" in text:
        return "not an HDF5 file (no HDF5 signature)"
    return f"not a readable HDF5 file (truncated or not HDF5): {e}"


class _Problems:
    """Collects objects that cannot be read: listed for an incomplete file, an error else."""

    def __init__(self, path: pathlib.Path, tolerant: bool) -> None:
        self.path = path
        self.tolerant = tolerant
        self.items: list[tuple[str, str]] = []

    def add(self, where: str, reason: str) -> None:
        if not self.tolerant:
            raise ResultFormatError(self.path, f"damaged result file: {where}: {reason}")
        self.items.append((where, reason))


def _read_open(
    p: pathlib.Path, f: h5py.File, *, allow_incomplete: bool, partial: bool, in_use: bool
) -> Result:
    attrs = {k: _py(v) for k, v in f.attrs.items()}
    if "schema_version" not in attrs:
        raise ResultFormatError(p, "not a snake_mpi result file (no schema_version attribute)")
    version = int(attrs["schema_version"])
    if version > SCHEMA_VERSION:
        raise ResultFormatError(
            p, f"schema_version {version} is newer than this snake_mpi reads ({SCHEMA_VERSION})"
        )
    status = str(attrs.get("status", ""))
    incomplete = partial or in_use or status != "complete"
    if not allow_incomplete and incomplete:
        raise IncompleteResultError(p, f"incomplete result (status {status!r})")
    ws = attrs.get("world_size")
    if not isinstance(ws, int) or isinstance(ws, bool) or ws < 1:
        raise ResultFormatError(p, f"world_size attribute is {ws!r}, not a positive integer")
    bad = _Problems(p, tolerant=incomplete)
    config_toml = str(attrs.pop("config_toml", ""))
    provenance: dict[str, Any] = {}
    group = _group(f, "provenance", bad, required=False)
    if group is not None:
        provenance = _attrs(group, "/provenance", bad)
    rounds = _fields(f, "rounds", bad, ndim=2, width=ws)
    evaluation = _fields(f, "eval", bad, ndim=(1, 2))
    series: dict[int, dict[str, np.ndarray]] = {}
    group = _group(f, "series", bad, required=False)
    for name in _names(group, "/series", bad):
        where = f"/series/{name}"
        rank = name.removeprefix("rank_")
        if not rank.isdigit():
            bad.add(where, "not named rank_<k>")
            continue
        sub = _group(group, name, bad, where=where)
        if sub is not None:
            series[int(rank)] = _datasets(sub, where, bad)
    tables: dict[str, dict[str, np.ndarray]] = {}
    arrays: dict[str, np.ndarray] = {}
    for name in _names(f, "", bad):
        if name in _RESERVED_GROUPS:
            continue
        try:
            obj = f[name]
            kind = obj.attrs.get("kind") if isinstance(obj, h5py.Group) else None
        except _READ_ERRORS as e:
            bad.add(f"/{name}", _why(e))
            continue
        if kind == _TABLE_KIND:
            tables[name] = _datasets(obj, f"/{name}", bad)
        elif isinstance(obj, h5py.Dataset):
            _read_into(arrays, name, obj, bad)
        elif isinstance(obj, h5py.Group):
            _collect(arrays, name, obj, bad)
    return Result(
        path=p,
        attrs=attrs,
        provenance=provenance,
        rounds=rounds,
        evaluation=evaluation,
        tables=tables,
        arrays=arrays,
        series=dict(sorted(series.items())),
        config_toml=config_toml,
        unreadable=bad.items,
        in_use=in_use,
    )


def _why(e: BaseException) -> str:
    return str(e) or type(e).__name__


def _names(group: h5py.Group | None, where: str, bad: _Problems) -> list[str]:
    """Member names of ``group`` (none if it is None or its index cannot be read)."""
    if group is None:
        return []
    try:
        return list(group.keys())
    except _READ_ERRORS as e:
        bad.add(where or "/", f"members cannot be listed: {_why(e)}")
        return []


def _group(
    parent: h5py.Group, name: str, bad: _Problems, *, required: bool = True, where: str = ""
) -> h5py.Group | None:
    """``parent[name]`` if it is a readable group; else listed (when required) and None."""
    where = where or f"/{name}"
    try:
        if name not in parent:
            if required:
                bad.add(where, "missing")
            return None
        obj = parent[name]
    except _READ_ERRORS as e:
        bad.add(where, _why(e))
        return None
    if not isinstance(obj, h5py.Group):
        bad.add(where, "a dataset where a group is expected")
        return None
    return obj


def _attrs(obj: h5py.HLObject, where: str, bad: _Problems) -> dict[str, Any]:
    try:
        return {k: _py(v) for k, v in obj.attrs.items()}
    except _READ_ERRORS as e:
        bad.add(f"{where} (attributes)", _why(e))
        return {}


def _fields(
    f: h5py.File,
    name: str,
    bad: _Problems,
    *,
    ndim: int | tuple[int, ...],
    width: int | None = None,
) -> dict[str, np.ndarray]:
    """``/rounds`` or ``/eval``: numeric datasets of ``ndim`` dimensions (or one of several;
    the second one ``width`` where given), cut to their common length (a half-appended row
    is left out)."""
    group = _group(f, name, bad)
    if group is None:
        return {}
    ndims = (ndim,) if isinstance(ndim, int) else ndim
    out = {}
    for key, arr in _datasets(group, f"/{name}", bad).items():
        where = f"/{name}/{key}"
        if width is not None:
            want = f"(n_rounds, {width})"
        else:
            want = " or ".join({1: "(n,)", 2: "(n, k)"}.get(d, f"{d}-D") for d in ndims)
        if arr.dtype.kind not in "biuf":
            bad.add(where, f"dtype {arr.dtype}, expected a number")
        elif arr.ndim not in ndims or (width is not None and arr.shape[1] != width):
            bad.add(where, f"shape {arr.shape}, expected {want}")
        else:
            out[key] = arr
    lengths = {len(a) for a in out.values()}
    if len(lengths) > 1:
        n = min(lengths)
        longer = sorted(k for k, a in out.items() if len(a) > n)
        bad.add(
            f"/{name}",
            f"datasets differ in length ({n} to {max(lengths)} rows; a row was being "
            f"appended): rows after the first {n} of {', '.join(longer)} are left out",
        )
        out = {k: a[:n] for k, a in out.items()}
    return out


def _members(group: h5py.Group, where: str, bad: _Problems) -> Iterator[tuple[str, Any]]:
    """(name, object) of each readable member of ``group``; unreadable ones are listed."""
    for name in _names(group, where, bad):
        try:
            yield name, group[name]
        except _READ_ERRORS as e:
            bad.add(f"{where}/{name}", _why(e))


def _datasets(group: h5py.Group, where: str, bad: _Problems) -> dict[str, np.ndarray]:
    """Every dataset directly in ``group``; subgroups and unreadable datasets are listed."""
    out: dict[str, np.ndarray] = {}
    for name, obj in _members(group, where, bad):
        if isinstance(obj, h5py.Dataset):
            _read_into(out, name, obj, bad, where=f"{where}/{name}")
        else:
            bad.add(f"{where}/{name}", "a group where a dataset is expected")
    return out


def _collect(out: dict[str, np.ndarray], prefix: str, group: h5py.Group, bad: _Problems) -> None:
    """Every dataset under ``group`` by its path (``prefix/...``), recursively."""
    for name, obj in _members(group, f"/{prefix}", bad):
        path = f"{prefix}/{name}"
        if isinstance(obj, h5py.Dataset):
            _read_into(out, path, obj, bad)
        elif isinstance(obj, h5py.Group):
            _collect(out, path, obj, bad)


def _read_into(
    out: dict[str, np.ndarray], key: str, ds: h5py.Dataset, bad: _Problems, *, where: str = ""
) -> None:
    try:
        out[key] = _value(ds)
    except _READ_ERRORS as e:
        bad.add(where or f"/{key}", f"data cannot be read: {_why(e)}")


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
    for path in result_paths(paths):
        try:
            results.append(read_result(path))
        except ResultError as e:
            skipped.append((path, e.reason))
    return results, skipped


def result_paths(paths: Iterable[str | os.PathLike]) -> list[pathlib.Path]:
    """The files ``scan_results`` reads, in its order: a directory stands for its result files
    (``RESULT_SUFFIXES``, sorted by name)."""
    out: list[pathlib.Path] = []
    for path in paths:
        p = pathlib.Path(path)
        if p.is_dir():
            out.extend(q for q in sorted(p.iterdir()) if q.name.endswith(RESULT_SUFFIXES))
        else:
            out.append(p)
    return out
