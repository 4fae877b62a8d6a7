"""Host energy probe: CPU-package energy from Linux powercap RAPL (``/sys/class/powercap``).

The package domain covers the cores, caches and uncore of each socket, not DRAM (a separate
subzone) and not the rest of the machine. The counter is per host, not per process: the caller
lets the lowest rank on each host read it and records NaN on the others. Reading ``energy_uj``
often needs root (users get PermissionError on kernels with the PLATYPUS mitigations); then
the probe is unavailable and every figure is NaN.
"""

from __future__ import annotations

import math
import re
import threading
from pathlib import Path

_ZONE = re.compile(r"^[a-z]+-rapl:\d+$")
"""Top-level zones only (``intel-rapl:0``, ``amd-rapl:0``): not subzones ``intel-rapl:0:1``, not
``intel-rapl-mmio:0``, which repeats package 0's energy through another interface."""


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


class _Package:
    def __init__(self, zone: Path) -> None:
        self.energy_path = zone / "energy_uj"
        self.max_range_uj = _read_int(zone / "max_energy_range_uj")
        self.last_uj = _read_int(self.energy_path)


class RaplCounter:
    """Joules used by this host's CPU packages between calls, summed over the packages.

    ``take_j`` handles one wrap of each counter per interval (``max_energy_range_uj``, often
    about 262 kJ: some 20 minutes at 200 W); for longer rounds call ``poll()`` now and then
    (e.g. from a sampler thread) so that no wrap is missed.

    A ``probes.RoundProbe``: ``sample`` polls (it has no per-tick series), ``begin_round`` /
    ``end_round`` give the round's ``host_cpu_energy_j``.
    """

    def __init__(self, root: str | Path = "/sys/class/powercap") -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._packages: list[_Package] = []
        self._acc_uj = 0
        self._valid = True
        seen: set[str] = set()
        try:
            zones = sorted(p for p in self.root.iterdir() if _ZONE.match(p.name))
        except OSError:
            zones = []
        unreadable = 0
        for zone in zones:
            try:
                name = (zone / "name").read_text().strip()
            except OSError:
                continue
            if not name.startswith("package") or name in seen:
                continue
            package = _Package(zone)
            if package.last_uj is not None:
                seen.add(name)
                self._packages.append(package)
            else:
                unreadable += 1
        self.package_count = len(self._packages)
        self.reason = ""
        if not self._packages:
            self.reason = (
                f"RAPL package energy_uj under {self.root} is not readable (often root only)"
                if unreadable
                else f"no RAPL package zones under {self.root}"
            )

    def available(self) -> bool:
        """True if at least one CPU package's energy counter can be read."""
        return bool(self._packages)

    def start(self) -> None:
        """Start an interval (``begin``)."""
        self.begin()

    def sample(self) -> dict[str, float]:
        """Fold the counters (``poll``, catches wraps); no per-tick figure, so ``{}``."""
        self.poll()
        return {}

    def stop(self) -> None:
        """Nothing to release."""

    def begin_round(self) -> None:
        """Start the round's interval (``begin``)."""
        self.begin()

    def end_round(self) -> dict[str, float]:
        """``{"host_cpu_energy_j": ...}``: joules in the round (``take_j``; NaN if unknown)."""
        return {"host_cpu_energy_j": self.take_j()}

    def _fold(self) -> bool:
        """Add each package's energy since its last reading to the interval (lock held); False
        when a counter could not be read or went backwards with no known range."""
        ok = True
        for package in self._packages:
            now = _read_int(package.energy_path)
            last, package.last_uj = package.last_uj, now
            if now is None or last is None:
                ok = False
                continue
            delta = now - last
            if delta < 0:  # wrapped (once, at most, if polled often enough)
                if package.max_range_uj is None:
                    ok = False
                    continue
                delta += package.max_range_uj
            self._acc_uj += delta
        return ok

    def begin(self) -> None:
        """Read all counters and start a new interval."""
        with self._lock:
            for package in self._packages:
                package.last_uj = _read_int(package.energy_path)
            self._acc_uj = 0
            self._valid = True

    def poll(self) -> None:
        """Fold the energy since the last reading into the current interval (catches wraps)."""
        if not self._packages:
            return
        with self._lock:
            self._valid = self._fold() and self._valid

    def take_j(self) -> float:
        """Joules since the last ``begin``/``take_j`` (construction if neither), summed over
        packages; starts the next interval. NaN when unavailable or a counter failed."""
        if not self._packages:
            return math.nan
        with self._lock:
            valid = self._fold() and self._valid
            energy_j = self._acc_uj / 1e6 if valid else math.nan
            self._acc_uj = 0
            self._valid = True
        return energy_j
