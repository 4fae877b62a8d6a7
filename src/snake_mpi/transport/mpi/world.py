"""Process-wide MPI: the job's world (rank, size, host-local ranks), the start-up agreement
(``agree``, ``settle``), the MPI library's CUDA support, and ending the whole job on an error
(``abort_job``, ``install_abort_on_error``). No transfers here (``comm.py``).
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
from types import TracebackType
from typing import Any, NoReturn

import numpy as np
from mpi4py import MPI

from snake_mpi.durable import StorageFull, is_no_space
from snake_mpi.numerics import DataMismatch
from snake_mpi.transport.wire import PeerTimeout, ProtocolError


def cuda_support() -> tuple[bool | None, str]:
    """Whether the MPI library can take CUDA device buffers, and how that was learnt.

    MPI 4.1's ``mpi_memory_alloc_kinds`` in the world communicator's info (the kinds the
    library supports; ``MPI_INFO_ENV`` holds the requested ones) when it names ``cuda`` or
    ``cuda:device``; else Open MPI's ``MPIX_Query_cuda_support()`` or MPICH's
    ``MPIX_GPU_query_support`` found in the loaded MPI library (mpi4py has no query of its
    own); ``(None, reason)`` when nothing answers.
    """
    kinds = ""
    with contextlib.suppress(Exception):
        info = MPI.COMM_WORLD.Get_info()
        try:
            kinds = info.Get("mpi_memory_alloc_kinds") or ""
        finally:
            info.Free()
    if {k.strip() for k in kinds.split(",")} & {"cuda", "cuda:device"}:
        return True, f"mpi_memory_alloc_kinds = {kinds}"
    lib = _loaded_mpi_library()
    if lib is None:
        return None, "no CUDA query in the MPI library"
    name, handle = lib
    if hasattr(handle, "MPIX_Query_cuda_support"):
        return bool(handle.MPIX_Query_cuda_support()), f"MPIX_Query_cuda_support in {name}"
    if hasattr(handle, "MPIX_GPU_query_support"):
        import ctypes

        flag = ctypes.c_int(0)
        if handle.MPIX_GPU_query_support(0, ctypes.byref(flag)) == 0:  # 0: MPIX_GPU_SUPPORT_CUDA
            return bool(flag.value), f"MPIX_GPU_query_support in {name}"
    return None, f"no CUDA query in {name}"


def _loaded_mpi_library() -> tuple[str, Any] | None:
    """The MPI shared library this process has loaded (via mpi4py), opened again by ctypes
    without loading anything new; None where it cannot be found."""
    import ctypes

    try:
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "/libmpi" in line}
    except OSError:
        return None
    for path in sorted(paths):
        name = os.path.basename(path)
        if not name.startswith("libmpi.so"):  # not libmpi_mpifh, libmpicxx, ...
            continue
        try:
            return name, ctypes.CDLL(path, mode=os.RTLD_NOLOAD | os.RTLD_GLOBAL)
        except OSError:
            continue
    return None


def local_rank_by_split() -> int:
    """This rank's index among the job's ranks on its host (a shared-memory split of the world
    communicator): the fallback when no launcher variable names the local rank."""
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_rank()
    finally:
        local.Free()


def world_ranks_on_host() -> int:
    """How many of the job's ranks share this rank's host (collective over the world)."""
    local = MPI.COMM_WORLD.Split_type(MPI.COMM_TYPE_SHARED)
    try:
        return local.Get_size()
    finally:
        local.Free()


def world_rank_size() -> tuple[int, int]:
    """This process's rank and the job size in COMM_WORLD."""
    return MPI.COMM_WORLD.Get_rank(), MPI.COMM_WORLD.Get_size()


def settle(timeout_s: float = 10.0) -> None:
    """Wait (at most ``timeout_s``) until every rank gets here: before all ranks exit with the
    same error, so that rank 0's message is out before the launcher kills the job on the
    first non-zero exit."""
    req = MPI.COMM_WORLD.Ibarrier()
    deadline = time.perf_counter() + timeout_s
    while not req.Test() and time.perf_counter() < deadline:
        time.sleep(0.001)


def agree(code: int, timeout_s: float = 60.0) -> list[int]:
    """Every rank's ``code`` (0: ready), on every rank: the start-up checks' verdicts, so that
    all ranks stop together when any one of them cannot start. A non-blocking allgather of one
    int64 per rank, polled under ``timeout_s``; a rank that never gets here aborts the job."""
    mine = np.array([code], dtype=np.int64)
    codes = np.zeros(MPI.COMM_WORLD.Get_size(), dtype=np.int64)
    req = MPI.COMM_WORLD.Iallgather([mine, MPI.INT64_T], [codes, MPI.INT64_T])
    deadline = time.perf_counter() + timeout_s
    while not req.Test():
        if time.perf_counter() > deadline:
            abort_job(f"not every rank finished its start-up checks within {timeout_s:g} s")
        time.sleep(0.001)
    return [int(c) for c in codes]


_AT_ABORT: list[Callable[[], None]] = []


def at_abort(fn: Callable[[], None]) -> None:
    """Run ``fn`` (briefly, best effort) on this rank before it aborts the job, e.g. to remove
    the output lock; ``abort_job`` skips atexit handlers."""
    _AT_ABORT.append(fn)


def library_version() -> str:
    """The MPI library's own version string (e.g. 'Open MPI v5.0.11, ...')."""
    return MPI.Get_library_version().strip()


def hostname() -> str:
    """This rank's host name."""
    return MPI.Get_processor_name() or socket.gethostname()


def abort_job(message: str, code: int = 1) -> NoReturn:
    """Print ``snake-mpi: rank R of N: message`` to stderr and MPI-Abort the whole job."""
    rank, size = world_rank_size()
    message = message.removeprefix(f"rank {rank}: ")  # errors that name the rank already
    sys.stderr.write(f"snake-mpi: rank {rank} of {size}: {message}\n")
    sys.stderr.flush()
    sys.stdout.flush()
    while _AT_ABORT:
        with contextlib.suppress(Exception):
            _AT_ABORT.pop()()
    MPI.COMM_WORLD.Abort(code)
    os._exit(code)  # pragma: no cover - Abort does not return


TRACEBACK_ENV = "SNAKE_MPI_TRACEBACK"
"""Set (to anything but empty or 0), the job's own clear errors (a peer's deadline, a message
not the one expected) are printed with their traceback too."""
CLEAR_ERRORS = (PeerTimeout, ProtocolError, StorageFull, DataMismatch)
"""Errors whose message says all a user needs (which peer, which message, which deadline; which
file had no room, and what was kept)."""


def _error_text(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None, where: str
) -> str:
    """The abort's words: a clear error's own line (its traceback only with ``TRACEBACK_ENV``),
    anything else as an unhandled exception with its traceback."""
    wanted = os.environ.get(TRACEBACK_ENV, "") not in ("", "0")
    if issubclass(exc_type, CLEAR_ERRORS) and not wanted:
        return f"{exc}{where} (set {TRACEBACK_ENV}=1 for the traceback)"
    if is_no_space(exc) and not wanted:  # a write no check foresaw (HDF5's own, say)
        first = str(exc).splitlines()[0] if str(exc) else exc_type.__name__
        return (
            f"no space left on a file system{where}: {first} (free space, then run again "
            f"with --resume; set {TRACEBACK_ENV}=1 for the traceback)"
        )
    text = "".join(traceback.format_exception(exc_type, exc, tb))
    return f"unhandled {exc_type.__name__}{where}: {exc}\n{text}"


def install_abort_on_error() -> None:
    """Make an uncaught exception in any thread end the whole job, naming the rank.

    MPI has no such default: one rank's exception while the others wait in a receive
    would hang the job forever. ``python -m mpi4py`` does this; a console script must too.
    """

    def _hook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
        abort_job(_error_text(exc_type, exc, tb, ""), 1)

    def _thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread else "?"
        exc = args.exc_value if args.exc_value is not None else args.exc_type()
        abort_job(_error_text(args.exc_type, exc, args.exc_traceback, f" in thread {name}"))

    sys.excepthook = _hook
    threading.excepthook = _thread_hook
