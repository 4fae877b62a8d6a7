"""Small measurement backends, each able to say whether it works here.

``memory`` samples this process's RSS and CPU in a thread (and, through its ``extra`` hook,
whatever another probe samples at the same ticks), ``storage`` counts bytes written to disk,
``gpu`` reads a GPU rank's memory, power, utilisation and energy (torch and NVML), ``rapl`` the
host's CPU-package energy. None of them needs MPI: ``run.py`` starts them on every rank and
``record.py`` reads them at round boundaries.

Every probe meets ``Probe`` (available/start/sample/stop, and ``reason``); those with
per-round figures also meet ``RoundProbe`` (begin_round/end_round), whose keys are
``record.ROUND_FIELDS`` names.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


@runtime_checkable
class Probe(Protocol):
    """One sensor: whether it works here, and a start/sample/stop life cycle."""

    reason: str
    """Why the probe measures nothing (or only part) here; "" when it fully works."""

    def available(self) -> bool:
        """True if the sensor can be read on this machine (for this rank)."""
        ...

    def start(self) -> None:
        """Begin measuring (idempotent where it matters)."""
        ...

    def sample(self) -> dict[str, float]:
        """One reading now, by figure name (may be empty: a probe with no per-tick figure)."""
        ...

    def stop(self) -> None:
        """Stop measuring and release what it holds; safe to call more than once."""
        ...


@runtime_checkable
class RoundProbe(Probe, Protocol):
    """A probe with per-round figures (``record.Recorder`` calls these at round boundaries)."""

    def begin_round(self) -> None:
        """Start a round's window."""
        ...

    def end_round(self) -> dict[str, float]:
        """The round's figures (``record.ROUND_FIELDS`` names) since ``begin_round``."""
        ...
