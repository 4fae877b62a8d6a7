"""Durable renames: fsync a file before it takes its final name, and the directory after, so
that a crash leaves the old name or the new one with all its bytes (PostgreSQL's
``durable_rename``). Used by the result file and the checkpoints; and a file system out of
room as one clear error (``StorageFull``)."""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush a file's bytes to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(directory: Path) -> None:
    """Make a rename in ``directory`` durable; not every platform can open a directory
    (Windows), and some file systems refuse to sync one: best effort there."""
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


class StorageFull(OSError):
    """A write the file system has no room for: names the file, what it needed and what is
    free, and what was kept. Raised before the write where the need is known (so the file
    keeps its last good state), or in place of the ``ENOSPC`` error of one that failed."""

    def __init__(
        self, path: Path, needed_bytes: int | None, free_bytes: int, *, what: str, kept: str
    ) -> None:
        need = f"{_size(needed_bytes)} more" if needed_bytes is not None else "more room"
        text = (
            f"no space left for {path} ({what}): it needs {need}, {_size(free_bytes)} is free "
            f"on its file system; {kept}"
        )
        super().__init__(errno.ENOSPC, text)
        self.path, self.needed_bytes, self.free_bytes = path, needed_bytes, free_bytes

    def __str__(self) -> str:
        return str(self.strerror)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit} ({n:,} bytes)"
    return f"{n:,} bytes"


def free_bytes(path: Path) -> int:
    """Bytes free to this user on the file system that holds ``path`` (or its folder)."""
    where = path if path.is_dir() else path.parent
    try:
        st = os.statvfs(where)
    except OSError:
        return 0
    return st.f_bavail * st.f_frsize


def ensure_room(path: Path, needed_bytes: int, *, what: str, kept: str) -> None:
    """``StorageFull`` now, before anything is written, where ``needed_bytes`` do not fit."""
    free = free_bytes(path)
    if needed_bytes > free:
        raise StorageFull(path, needed_bytes, free, what=what, kept=kept)


_WRITE_SIZE = re.compile(r"total write size = (\d+)")


def is_no_space(exc: BaseException) -> bool:
    """Whether ``exc`` is a file system out of room: ``ENOSPC``/``EDQUOT``, also as HDF5
    reports it through h5py ("errno = 28" in the message of a ``RuntimeError``)."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(exc)
    return f"errno = {errno.ENOSPC}," in text or "No space left on device" in text


def as_storage_full(exc: BaseException, path: Path, *, what: str, kept: str) -> StorageFull:
    """A failed write's ``ENOSPC`` as ``StorageFull`` (the size HDF5 tried, where it says)."""
    if isinstance(exc, StorageFull):
        return exc
    m = _WRITE_SIZE.search(str(exc))
    return StorageFull(path, int(m.group(1)) if m else None, free_bytes(path), what=what, kept=kept)
