"""One run owns a result path at a time: ``OUT.lock``, created exclusively beside the output.

Two runs must never write the same ``--out`` at once (the second would delete the first's
``OUT.partial`` and the first rename the second's file into place, losing a result): rank 0
takes ``OUT.lock`` before it writes anything and keeps it for the run's lifetime.

The lock is a small JSON file (host, pid, the process's start time, Slurm job id and restart
count, a random token) written to a unique temporary name and then hard-linked to
``OUT.lock``: ``link`` fails if the name exists and is atomic on local file systems and on the
shared ones clusters use (NFSv3+, Lustre, GPFS), and the lock never exists half-written.

A lock left by a process that is gone is *stale* and is taken over with a message:
- same host: its pid no longer runs, or runs a different process (another start time);
- another host: it names this run's own Slurm job at an earlier restart (a requeued job that
  landed on another node).
Any other lock is refused (exit 2 in ``run.py``) naming its holder; a lock of a dead run on
another host must be removed by hand, as nothing here can tell whether that run still writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

LOCK_SUFFIX = ".lock"


class LockError(Exception):
    """The output is held by another run (or the lock cannot be created); says by whom."""


@dataclass(frozen=True, slots=True)
class Holder:
    """Who holds a lock."""

    host: str
    pid: int
    started: float
    """The holder process's start time (``psutil.Process.create_time``), to tell pid reuse."""
    slurm_job_id: str
    slurm_restart_count: int
    created: float
    token: str

    @classmethod
    def me(cls) -> Holder:
        return cls(
            host=socket.gethostname(),
            pid=os.getpid(),
            started=_start_time(os.getpid()) or 0.0,
            slurm_job_id=os.environ.get("SLURM_JOB_ID", ""),
            slurm_restart_count=int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0),
            created=time.time(),
            token=uuid.uuid4().hex,
        )

    def describe(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created))
        job = f", Slurm job {self.slurm_job_id}" if self.slurm_job_id else ""
        return f"host {self.host}, pid {self.pid}{job}, since {when}"


def lock_path(out: str | os.PathLike) -> Path:
    """The lock of a result path: ``OUT.lock``."""
    return Path(os.fspath(out) + LOCK_SUFFIX)


def _start_time(pid: int) -> float | None:
    """Start time of process ``pid``, None if no such process."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied, ValueError):
        return None


def read_holder(path: Path) -> Holder | None:
    """The holder written in a lock file; None if it is gone or unreadable (being written)."""
    try:
        raw = json.loads(path.read_text())
        return Holder(**raw)
    except (OSError, ValueError, TypeError):
        return None


def stale_reason(h: Holder, me: Holder) -> str | None:
    """Why the lock of ``h`` is stale from ``me``'s point of view; None if it may be live."""
    if h.host == me.host:
        started = _start_time(h.pid)
        if started is None:
            return f"its process {h.pid} is gone"
        if h.started and abs(started - h.started) > 1.0:
            return f"pid {h.pid} now belongs to another process"
        return None
    same_job = h.slurm_job_id and h.slurm_job_id == me.slurm_job_id
    if same_job and h.slurm_restart_count < me.slurm_restart_count:
        return f"it is an earlier attempt of this Slurm job ({h.slurm_job_id})"
    return None


class OutputLock:
    """``OUT.lock`` held by this process; ``release()`` (idempotent) removes it if still ours."""

    def __init__(self, out: str | os.PathLike, *, owner: str = "run") -> None:
        """``owner``: what holds such a lock, for the refusal ("another run", "another
        suite")."""
        self.path = lock_path(out)
        self.owner = owner
        self.holder = Holder.me()
        self.took_over: str = ""
        """Set when a stale lock was taken over: whose, and why (for a message)."""
        self._held = False

    def acquire(self) -> OutputLock:
        """Take the lock or raise ``LockError`` naming the holder (or why none can be made)."""
        for _ in range(3):
            if self._try_create():
                self._held = True
                return self
            holder = read_holder(self.path)
            if holder is None:  # vanished, or being written by its owner: look again
                time.sleep(0.05)
                holder = read_holder(self.path)
                if holder is None:
                    if self.path.exists():
                        raise LockError(
                            f"{self.path} exists but cannot be read as a snake-mpi lock; "
                            f"remove it if no run is writing {self.path.stem}"
                        )
                    continue
            why = stale_reason(holder, self.holder)
            if why is None:
                raise LockError(
                    f"{self.path.with_suffix('')} is being written by another {self.owner} "
                    f"({holder.describe()}); wait for it, or use another --out "
                    f"(if that run is dead, remove {self.path})"
                )
            again = read_holder(self.path)
            if again is not None and again.token == holder.token:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
                self.took_over = f"{holder.describe()}: {why}"
        raise LockError(f"could not take {self.path}: other runs keep taking it")

    def _try_create(self) -> bool:
        tmp = self.path.with_name(f"{self.path.name}.{self.holder.host}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w") as f:
                json.dump(asdict(self.holder), f)
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise LockError(
                f"cannot create files in {self.path.parent}: {e.strerror or e}"
            ) from None
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        except OSError:  # a file system without hard links: exclusive create instead
            return self._create_exclusive()
        finally:
            with contextlib.suppress(OSError):
                tmp.unlink()

    def _create_exclusive(self) -> bool:
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        except OSError as e:
            raise LockError(f"cannot create {self.path}: {e.strerror or e}") from None
        with os.fdopen(fd, "w") as f:
            json.dump(asdict(self.holder), f)
            f.flush()
            os.fsync(f.fileno())
        return True

    def still_held(self) -> bool:
        """Whether ``OUT.lock`` still names this process (nobody took it over meanwhile)."""
        h = read_holder(self.path)
        return self._held and h is not None and h.token == self.holder.token

    def release(self) -> None:
        """Remove the lock if it is still ours; safe to call twice, and from an abort path."""
        if self._held and self.still_held():
            with contextlib.suppress(OSError):
                self.path.unlink()
        self._held = False

    def __enter__(self) -> OutputLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
