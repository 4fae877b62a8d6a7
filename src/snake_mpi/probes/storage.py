"""Storage probe: bytes this process wrote to storage, and the size of files on disk."""

from __future__ import annotations

import os
from pathlib import Path

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency; degrade rather than crash
    psutil = None


def _read_counter() -> tuple[str, int] | None:
    """(field, value) of this process's write counter, or None where there is none."""
    if psutil is None:
        return None
    try:
        io = psutil.Process().io_counters()
    except (AttributeError, NotImplementedError, OSError, psutil.Error):
        return None
    for field in ("write_bytes", "write_chars"):
        value = getattr(io, field, None)
        if value is not None:
            return field, int(value)
    return None


class DiskWriteCounter:
    """Bytes this process wrote to storage (psutil io_counters write_bytes; falls back to
    write_chars, or 0 with available()=False).

    On Linux ``write_bytes`` counts what the process caused to be sent to the storage layer
    (page-cache writes are charged when dirtied), for all its threads. It misses file systems
    that do no block accounting (tmpfs, some network file systems). ``write_chars`` counts
    every ``write()`` call, including pipes and sockets, so it is an upper bound.

    A ``probes.RoundProbe``: counting starts at construction (``start`` restarts it);
    ``end_round`` gives the round's ``disk_write_bytes``.
    """

    def __init__(self) -> None:
        reading = _read_counter()
        self.field = reading[0] if reading else ""
        self.reason = "" if reading else "no per-process write counter here (psutil io_counters)"
        self._start_bytes = reading[1] if reading else 0
        self._last_bytes = self._start_bytes

    @staticmethod
    def available() -> bool:
        """True if this platform reports a per-process write counter."""
        return _read_counter() is not None

    def start(self) -> None:
        """Count from now: ``total_bytes`` and the round window start again."""
        self._start_bytes = self._last_bytes = self._now()

    def sample(self) -> dict[str, float]:
        """``{"disk_write_bytes": ...}``: bytes written since start (``total_bytes``)."""
        return {"disk_write_bytes": self.total_bytes()}

    def stop(self) -> None:
        """Nothing to release."""

    def begin_round(self) -> None:
        """Nothing: round windows tile the run (each starts where the last ``end_round`` was)."""

    def end_round(self) -> dict[str, float]:
        """``{"disk_write_bytes": ...}``: bytes written in the round (``take_round``)."""
        return {"disk_write_bytes": self.take_round()}

    def _now(self) -> int:
        reading = _read_counter()
        if reading is None or reading[0] != self.field:
            return self._last_bytes
        return reading[1]

    def total_bytes(self) -> int:
        """Bytes written since construction."""
        return self._now() - self._start_bytes

    def take_round(self) -> int:
        """Bytes written since the previous call (or construction)."""
        now = self._now()
        delta, self._last_bytes = now - self._last_bytes, now
        return delta


def nbytes_on_disk(path: str | os.PathLike) -> int:
    """Bytes a file or directory tree occupies (``st_blocks * 512`` where available, else
    ``st_size``); symlinks are not followed."""
    p = Path(path)
    st = p.lstat()
    total = _allocated(st)
    if p.is_dir() and not p.is_symlink():
        for root, dirs, files in os.walk(p):
            for name in dirs + files:
                total += _allocated(os.lstat(os.path.join(root, name)))
    return total


def _allocated(st: os.stat_result) -> int:
    blocks = getattr(st, "st_blocks", None)
    return int(blocks) * 512 if blocks is not None else int(st.st_size)
