"""Durable renames: fsync a file before it takes its final name, and the directory after, so
that a crash leaves the old name or the new one with all its bytes (PostgreSQL's
``durable_rename``). Used by the result file and the checkpoints."""

from __future__ import annotations

import os
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
