"""The interface every communicator meets: ``mpi.comm.Comm`` (MPI ranks) and ``localcomm.LocalComm``
(ranks as threads of one process). Schemes, ``run`` and ``record`` type their communicator as
``Communicator`` and never learn which one they hold; mypy checks that both classes conform.

A model transfer names itself in one argument: a ``wire.Transfer`` to send (its kind, round,
hop, blocks and payload), a ``wire.TransferSpec`` to receive (the transfer awaited and the
buffer it lands in). No MPI here.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NoReturn, Protocol, runtime_checkable

import numpy as np

from snake_mpi.transport.wire import CommStats, LinkModel, Transfer, TransferSpec


class HopPlan(Protocol):
    """A hop that repeats, made once over the blocks' buffers (``mpi.hop_plan.HopPlan``): the
    same wire and counts as ``send_blocks``/``post``/``recv_blocks``, less Python per hop.
    Only ``hops.Hops`` holds one."""

    ids: list[int]
    """The blocks it moves, in wire order."""
    sizes: list[int]
    """Their bytes."""
    bufs: list[Any]
    """Their buffers (the model's block buffers), where a receive lands."""

    @property
    def active(self) -> bool:
        """Whether a receive of this plan is posted and not yet completed."""
        ...

    def send(self, kind: int, round_: int, hop: int, versions: Sequence[int]) -> None:
        """Send the blocks with these versions as transfer ``(kind, round_, hop)``."""
        ...

    def post(self, kind: int, round_: int, hop: int) -> None:
        """Post the receive of transfer ``(kind, round_, hop)``; ``receive`` completes it."""
        ...

    def receive(self, kind: int, round_: int, hop: int) -> list[int]:
        """Complete the posted receive: the blocks' versions (their bytes are in ``bufs``)."""
        ...

    def cancel(self) -> None:
        """Cancel a posted receive that will not be completed."""
        ...

    def free(self) -> None:
        """Release what the plan holds (a posted receive is cancelled)."""
        ...


@runtime_checkable
class Communicator(Protocol):
    """A ring of ``size`` ranks seen from rank ``rank``: block transfers between two ranks,
    counted in ``stats``, and the few collectives a run needs to gather its figures to rank 0.
    Every wait is bounded by ``deadline_s``."""

    @property
    def rank(self) -> int:
        """This rank, 0 .. size-1."""
        ...

    @property
    def size(self) -> int:
        """How many ranks the job has."""
        ...

    @property
    def deadline_s(self) -> float:
        """The longest wait for a peer before the job is aborted."""
        ...

    @property
    def stats(self) -> CommStats:
        """This rank's counters of bytes, messages and seconds (``take`` resets them)."""
        ...

    link: LinkModel | None
    """The emulated links, or None where transfers run at the machine's speed (``run.execute``
    sets it from ``[emulate]``)."""

    @property
    def succ(self) -> int:
        """Next rank on the ring."""
        ...

    @property
    def pred(self) -> int:
        """Previous rank on the ring."""
        ...

    def send_blocks(self, dest: int, transfer: Transfer) -> None:
        """Send ``transfer`` (header, then its payload) to ``dest``; counts bytes and time."""
        ...

    def post(self, source: int, spec: TransferSpec) -> None:
        """Post the receive of ``spec`` (its blocks or ``payload_bytes`` required) ahead of
        the ``recv_blocks`` that completes it, e.g. before a collective (see ``Comm.post``)."""
        ...

    def cancel(self) -> None:
        """Cancel the receives ``post`` posted that will not be completed."""
        ...

    def recv_blocks(self, source: int, spec: TransferSpec) -> Transfer:
        """Receive the transfer ``spec`` names from ``source``; a different one is an error."""
        ...

    def hop_plan(self, peer: int, block_ids: Sequence[int], bufs: Sequence[Any]) -> HopPlan | None:
        """A ``HopPlan`` for hops of these blocks in these buffers with ``peer``, or None
        where this communicator has none for them (then the general path serves)."""
        ...

    def use_pipelined_copy(self, min_bytes: int, *, host: bool) -> bool:
        """Collective, before any hop: large same-host messages by the transport's two-core
        copy pipeline (``comm.pipelined_min_bytes``); returns whether it is on."""
        ...

    def gather_row(self, row: np.ndarray, what: str = ...) -> np.ndarray | None:
        """One float64 row per rank to rank 0 -> (size, len) there, None elsewhere."""
        ...

    def allgather_row(self, row: np.ndarray, what: str = ...) -> np.ndarray:
        """Every rank's float64 row, as (size, len), on every rank."""
        ...

    def gatherv(self, arr: np.ndarray, what: str = ...) -> list[np.ndarray] | None:
        """A 1-D float64 array of any length per rank to rank 0 (a list by rank there)."""
        ...

    def gather_str(self, text: str, max_bytes: int = ...) -> list[str] | None:
        """A short string per rank to rank 0 (a list by rank there)."""
        ...

    def barrier(self) -> None:
        """Synchronise all ranks (outside the round loop only)."""
        ...

    def ranks_on_host(self) -> int:
        """How many ranks of this job share this rank's host."""
        ...

    def hostname(self) -> str:
        """This rank's host name."""
        ...

    def library_version(self) -> str:
        """The transport's version string (the MPI library's, for ``Comm``)."""
        ...

    def abort(self, message: str, code: int = ...) -> NoReturn:
        """End the whole job with ``message`` naming this rank; never returns."""
        ...


class RingPositions:
    """``succ`` and ``pred`` from ``rank`` and ``size``: the ring positions ``Comm`` and
    ``LocalComm`` share (both set ``rank`` and ``size`` in their constructors)."""

    rank: int
    size: int

    @property
    def succ(self) -> int:
        """Next rank on the ring."""
        return (self.rank + 1) % self.size

    @property
    def pred(self) -> int:
        """Previous rank on the ring."""
        return (self.rank - 1) % self.size
