"""Memory probe: a psutil sampler thread for this process (RSS and CPU %), with peaks; it
also samples other sensors' series on the same ticks (``extra``, e.g. the GPU probe).

Peaks are *sampled*: a spike shorter than the interval can be missed, which is why every
peak query also takes a sample at the moment of the query. ``ru_maxrss_bytes`` gives the
kernel's exact high-water mark for the whole process lifetime as a cross-check.
"""

from __future__ import annotations

import math
import sys
import threading
import time
from collections.abc import Callable

import numpy as np

try:
    import psutil
except ImportError:  # pragma: no cover - psutil is a dependency; degrade rather than crash
    psutil = None

MAX_SAMPLES = 100_000
"""Cap on the stored series length; beyond it the series is halved (see ``MemorySampler``)."""

_BUILTIN_SERIES = frozenset({"t_s", "rss_bytes", "cpu_percent"})


class MemorySampler:
    """psutil sampler thread for this process: RSS and CPU %, with peaks.

    Each tick costs one ``memory_info()`` and one ``cpu_percent()`` call. The series is
    bounded: when it reaches ``max_samples`` every other sample is dropped and the recording
    stride doubles, so a long run keeps at most ``max_samples`` evenly spaced samples while
    the peaks still see every tick. ``cpu_percent`` is per process (may exceed 100 with
    several threads); the first value is 0 by psutil's definition.

    With ``enabled=False`` (or without psutil) no thread runs and the series stay empty, but
    ``sample_now``, ``peak_rss_bytes`` and ``take_round_peak`` still take one sample per call.

    ``extra`` (e.g. ``GpuProbe.sample``) is called on every tick of the thread, so other
    sensors share its clock; its values become further series, aligned with ``t_s``. A key
    missing from a tick, or a tick whose ``extra()`` raised, records NaN; keys that clash with
    the built-in series are ignored.

    A ``probes.RoundProbe``: ``end_round`` gives the round's ``peak_rss_bytes``.
    """

    def __init__(
        self,
        interval_s: float = 0.1,
        *,
        enabled: bool = True,
        max_samples: int = MAX_SAMPLES,
        extra: Callable[[], dict[str, float]] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be positive, got {interval_s}")
        if max_samples < 2:
            raise ValueError(f"max_samples must be at least 2, got {max_samples}")
        self.interval_s = float(interval_s)
        self.reason = _why_unavailable()
        self.enabled = enabled and not self.reason
        self.max_samples = max_samples
        self._proc = psutil.Process() if psutil is not None else None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._t0 = time.perf_counter()
        self._peak_rss_bytes = 0
        self._window_peak_bytes = 0
        self._t_s: list[float] = []
        self._rss_bytes: list[int] = []
        self._cpu_percent: list[float] = []
        self._extra = extra
        self._extra_series: dict[str, list[float]] = {}
        self._stride = 1
        self._ticks = 0

    @staticmethod
    def available() -> bool:
        """True if psutil can read this process's memory."""
        return not _why_unavailable()

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        """Start the daemon sampler thread (no-op if disabled or running); samples at once."""
        if not self.enabled or self._thread is not None:
            return
        self._t0 = time.perf_counter()
        self._stop.clear()
        self._tick()
        self._thread = threading.Thread(target=self._loop, name="snake-mpi-memory", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop and join the sampler thread; safe to call more than once."""
        thread, self._thread = self._thread, None
        if thread is None:
            return
        self._stop.set()
        thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._tick()

    def _tick(self) -> None:
        proc = self._proc
        if proc is None:  # psutil absent: the thread is never started
            return
        try:
            rss = proc.memory_info().rss
            cpu = proc.cpu_percent(None)
        except (psutil.Error, OSError):
            return
        t = time.perf_counter() - self._t0
        extra = self._call_extra()
        with self._lock:
            self._note(rss)
            if self._ticks % self._stride == 0:
                self._append_extra(extra)
                self._t_s.append(t)
                self._rss_bytes.append(rss)
                self._cpu_percent.append(cpu)
                if len(self._t_s) >= self.max_samples:
                    self._decimate()
            self._ticks += 1

    def _call_extra(self) -> dict[str, float]:
        """``extra()`` on every tick (also unrecorded ones: it may keep its own peaks)."""
        if self._extra is None:
            return {}
        try:
            return dict(self._extra())
        except Exception:  # a failing sensor must not end the sampler: NaN for this tick
            return {}

    def _append_extra(self, values: dict[str, float]) -> None:
        """One entry per extra series, before ``t_s`` grows (caller holds the lock)."""
        n = len(self._t_s)
        for key in values:
            if key not in self._extra_series and key not in _BUILTIN_SERIES:
                self._extra_series[key] = [math.nan] * n
        for key, column in self._extra_series.items():
            try:
                column.append(float(values.get(key, math.nan)))
            except (TypeError, ValueError):
                column.append(math.nan)

    def _decimate(self) -> None:
        """Keep every other sample and double the stride (caller holds the lock)."""
        del self._t_s[1::2], self._rss_bytes[1::2], self._cpu_percent[1::2]
        for column in self._extra_series.values():
            del column[1::2]
        self._stride *= 2

    def _note(self, rss_bytes: int) -> None:
        self._peak_rss_bytes = max(self._peak_rss_bytes, rss_bytes)
        self._window_peak_bytes = max(self._window_peak_bytes, rss_bytes)

    # ------------------------------------------------------------ queries

    def sample(self) -> dict[str, float]:
        """``{"rss_bytes": ...}``: one synchronous sample (``sample_now``)."""
        return {"rss_bytes": self.sample_now()}

    def begin_round(self) -> None:
        """Nothing: round windows tile the run (each starts where the last ``end_round`` was)."""

    def end_round(self) -> dict[str, float]:
        """``{"peak_rss_bytes": ...}``: the round's peak (``take_round_peak``)."""
        return {"peak_rss_bytes": self.take_round_peak()}

    def sample_now(self) -> int:
        """Take one RSS sample synchronously (also when disabled); returns it in bytes.

        Folds into the peaks but not into the series (only the thread's ticks are series).
        Returns 0 where psutil cannot read the process.
        """
        if self._proc is None:
            return 0
        try:
            rss = self._proc.memory_info().rss
        except (psutil.Error, OSError):
            return 0
        with self._lock:
            self._note(rss)
        return rss

    def peak_rss_bytes(self) -> int:
        """Largest sampled RSS since construction, including a sample taken now."""
        self.sample_now()
        with self._lock:
            return self._peak_rss_bytes

    def take_round_peak(self) -> int:
        """Largest RSS since the previous call (or start), sampling now; resets the window."""
        self.sample_now()
        with self._lock:
            peak, self._window_peak_bytes = self._window_peak_bytes, 0
        return peak

    def series(self) -> dict[str, np.ndarray]:
        """The sampled series: ``t_s`` (float64 s since start), ``rss_bytes``, ``cpu_percent``,
        and each key ``extra`` returned (float64, same length as ``t_s``)."""
        with self._lock:
            out = {
                "t_s": np.array(self._t_s, dtype=np.float64),
                "rss_bytes": np.array(self._rss_bytes, dtype=np.int64),
                "cpu_percent": np.array(self._cpu_percent, dtype=np.float64),
            }
            for key, column in self._extra_series.items():
                out[key] = np.array(column, dtype=np.float64)
            return out


def _why_unavailable() -> str:
    """Why psutil cannot read this process's memory; "" if it can."""
    if psutil is None:
        return "psutil is not installed"
    try:
        psutil.Process().memory_info()
    except (psutil.Error, OSError) as e:
        return f"psutil cannot read this process's memory: {e}"
    return ""


def ru_maxrss_bytes() -> int:
    """The kernel's maximum RSS of this process in bytes (``ru_maxrss``: kB on Linux, bytes on
    macOS); 0 where ``resource`` is missing (Windows)."""
    try:
        import resource
    except ImportError:
        return 0
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * 1024


def release_free_memory() -> bool:
    """Hand memory that the process has freed back to the OS (glibc ``malloc_trim(0)``).

    A node's optimiser state and gradients exist only during its turn; without this, glibc
    may keep the freed pages (tensors below its mmap threshold live on the heap), so the RSS
    of a waiting node would still show its last turn's state. Returns False where there is no
    glibc (nothing to do)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False


M_MMAP_THRESHOLD = -3
"""glibc's ``mallopt`` parameter number (malloc.h)."""


def set_mmap_threshold(threshold_bytes: int) -> bool:
    """Fix glibc's mmap threshold (``mallopt(M_MMAP_THRESHOLD, n)``; a fixed one no longer
    grows): allocations of at least ``threshold_bytes`` are mapped and unmapped on free, so a
    training step's large transients leave the RSS when freed. False where there is no glibc
    or it refused; 0 does nothing."""
    if threshold_bytes <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, ctypes.c_int(threshold_bytes)))
    except (OSError, AttributeError):
        return False
