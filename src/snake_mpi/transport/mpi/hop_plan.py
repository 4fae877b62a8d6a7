"""A hop that repeats (the ring's), by persistent MPI requests made once over the blocks' own
buffers. Made by ``Comm.hop_plan`` and owned by ``transport.hops.Hops``, which chooses it or
the general path for each hop; nothing else starts one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, Protocol

import numpy as np
from mpi4py import MPI

from snake_mpi.transport.wire import (
    HEADER_FIXED,
    HEADER_MAX_BLOCKS,
    MAGIC,
    TAG_HEADER,
    TAG_PAYLOAD,
    CommStats,
    LinkModel,
    ProtocolError,
    TransferSpec,
    account_receive,
    account_send,
    check_posted,
    parse_header,
)


class Ring(Protocol):
    """What a plan uses of its ``Comm``: its MPI communicator, message layout, polling and
    counters (the public members ``Comm`` has)."""

    rank: int
    stats: CommStats
    link: LinkModel | None

    @property
    def mpi_comm(self) -> MPI.Comm: ...

    def message(self, part: Any, peer: int) -> tuple[list[Any], MPI.Datatype | None]: ...

    def wait_all(
        self,
        reqs: Sequence[MPI.Request],
        what: str | Callable[[], str],
        *,
        statuses: list[MPI.Status] | None = None,
        flowing: bool = False,
    ) -> None: ...


class HopPlan:
    """Blocks ``ids`` of a model, between this rank and ``peer``, straight from and into their
    block buffers ``bufs``, made once and started per hop.

    The same wire, checks and counts as ``Comm.send_blocks``/``post``/``recv_blocks`` (a
    plan's transfer is received by either path, and either path's by a plan), with the
    per-hop Python taken out: the header is written in place (kind, round, hop, versions: the
    rest is fixed), the messages are persistent MPI requests (``Send_init``/``Recv_init``) on
    the header and the block buffers, and a received header is compared word by word with the
    one posted. Valid while the buffers are: ``Hops`` makes a new one when the model's
    ``layout_gen`` moves, and never starts a stale one.
    """

    __slots__ = (
        "_ring",
        "peer",
        "ids",
        "sizes",
        "bufs",
        "total_bytes",
        "_out",
        "_in",
        "_sends",
        "_recvs",
        "_head_st",
        "_body_st",
        "_head",
        "_body",
        "_posted",
        "_dtypes",
    )

    def __init__(self, ring: Ring, peer: int, ids: Sequence[int], bufs: Sequence[Any]) -> None:
        self._ring = ring
        self.peer = int(peer)
        self.ids = [int(b) for b in ids]
        self.bufs = list(bufs)
        self.sizes = [int(b.nbytes) for b in self.bufs]
        self.total_bytes = sum(self.sizes)
        n = len(self.ids)
        words = [MAGIC, 0, 0, 0, n, self.total_bytes]
        for b, size in zip(self.ids, self.sizes, strict=True):
            words += [b, 0, size]
        self._out = np.array(words, dtype=np.int64)
        self._in: np.ndarray | None = None
        self._sends: list[MPI.Prequest] | None = None
        self._recvs: list[MPI.Prequest] | None = None
        self._head_st = [MPI.Status()]
        self._body_st = [MPI.Status() for _ in range(n)]
        self._head: list[MPI.Prequest] = []
        self._body: list[MPI.Prequest] = []
        self._posted: tuple[int, int, int] | None = None
        self._dtypes: list[MPI.Datatype] = []  # of swapped-halves messages, freed with the plan

    def _message(self, buf: Any) -> list[Any]:
        msg, dtype = self._ring.message(buf, self.peer)
        if dtype is not None:
            self._dtypes.append(dtype)
        return msg

    @property
    def active(self) -> bool:
        """Whether a receive of this plan is posted and not yet completed."""
        return self._posted is not None

    def send(self, kind: int, round_: int, hop: int, versions: Sequence[int]) -> None:
        """Send the blocks (as ``Comm.send_blocks`` would) with these versions; counted."""
        ring = self._ring
        h = self._out
        h[1], h[2], h[3] = kind, round_, hop
        h[7::3] = versions
        if self._sends is None:
            c, p = ring.mpi_comm, self.peer
            self._sends = [c.Send_init([h, MPI.INT64_T], p, TAG_HEADER)]
            self._sends += [c.Send_init(self._message(b), p, TAG_PAYLOAD) for b in self.bufs]
        t0 = time.perf_counter()
        MPI.Prequest.Startall(self._sends)
        ring.wait_all(self._sends, self._send_what, flowing=True)
        account_send(ring.stats, ring.link, ring.rank, self.peer, h.nbytes + self.total_bytes, t0)

    def _send_what(self) -> str:
        kind, round_, hop = self._out[1:4].tolist()
        spec = TransferSpec(kind, round_, hop)
        return f"rank {self.peer} to take the {spec.describe(self._ring.rank)}"

    def post(self, kind: int, round_: int, hop: int) -> None:
        """Post the receives of transfer ``(kind, round_, hop)`` now (as ``Comm.post``): the
        next ``receive`` of that transfer completes them."""
        if self._posted is not None:
            raise RuntimeError(f"rank {self._ring.rank}: a hop plan posted twice")
        if self._recvs is None:
            c, p = self._ring.mpi_comm, self.peer
            self._in = np.empty(HEADER_FIXED + 3 * HEADER_MAX_BLOCKS, dtype=np.int64)
            self._recvs = [c.Recv_init([self._in, MPI.INT64_T], p, TAG_HEADER)]
            self._recvs += [c.Recv_init(self._message(b), p, TAG_PAYLOAD) for b in self.bufs]
            self._head, self._body = self._recvs[:1], self._recvs[1:]
        MPI.Prequest.Startall(self._recvs)
        self._posted = (kind, round_, hop)

    def receive(self, kind: int, round_: int, hop: int) -> list[int]:
        """Complete the posted receive of transfer ``(kind, round_, hop)``: the header must
        name that transfer and the blocks posted (else ``ProtocolError``, worded as the
        general path words it); returns the blocks' versions, their bytes are in their
        buffers. Counted as ``Comm.recv_blocks`` counts."""
        ring, source = self._ring, self.peer
        if self._posted != (kind, round_, hop):
            raise ProtocolError(
                f"rank {ring.rank}: no receive posted for the {self._describe(kind, round_, hop)}"
            )
        assert self._in is not None
        t0 = time.perf_counter()
        ring.wait_all(self._head, self._header_what, statuses=self._head_st)
        t1 = time.perf_counter()
        ring.stats.wait_s += t1 - t0
        count = self._head_st[0].Get_count(MPI.INT64_T)
        got = self._in[:count].tolist()
        total = self.total_bytes
        if (
            got[:6] != [MAGIC, kind, round_, hop, len(self.ids), total]
            or got[6::3] != self.ids
            or got[8::3] != self.sizes
        ):
            self._refuse(got, TransferSpec(kind, round_, hop))
        ring.wait_all(self._body, self._payload_what, statuses=self._body_st, flowing=True)
        for status, size in zip(self._body_st, self.sizes, strict=True):
            if status.Get_count(MPI.BYTE) != size:
                raise ProtocolError(
                    f"rank {ring.rank}: got {status.Get_count(MPI.BYTE)} bytes of a "
                    f"{size}-byte block in the {self._describe(kind, round_, hop)}"
                )
        self._posted = None
        account_receive(ring.stats, ring.link, source, ring.rank, 8 * count + total, t1)
        return got[7::3]

    def _describe(self, kind: int, round_: int, hop: int) -> str:
        return TransferSpec(kind, round_, hop).describe(self.peer)

    def _header_what(self) -> str:  # words for a timeout only
        return f"the header of the {self._describe(*(self._posted or (0, 0, 0)))}"

    def _payload_what(self) -> str:
        what = self._describe(*(self._posted or (0, 0, 0)))
        return f"the payload ({self.total_bytes} bytes) of the {what}"

    def _refuse(self, got: list[int], spec: TransferSpec) -> NoReturn:
        """A header that is not the one posted: the general path's checks word the error."""
        rank, what = self._ring.rank, spec.describe(self.peer)
        header = np.array(got, dtype=np.int64)
        body, _ = parse_header(header, spec, rank=rank, what=what)
        ids, nbytes = body[:, 0].tolist(), body[:, 2].tolist()
        check_posted((self.ids, self.sizes), ids, nbytes, rank=rank, what=what)
        raise ProtocolError(f"rank {rank}: unexpected header {got} in the {what}")

    def cancel(self) -> None:
        """Cancel a posted receive that will not be completed (the run stops)."""
        if self._posted is None or self._recvs is None:
            return
        self._posted = None
        for req in self._recvs:
            req.Cancel()
            req.Wait()

    def free(self) -> None:
        """Free the persistent requests (the plan is stale); a posted receive is cancelled."""
        self.cancel()
        for req in (self._sends or []) + (self._recvs or []):
            req.Free()
        for dtype in self._dtypes:
            dtype.Free()
        self._sends = self._recvs = None
        self._dtypes = []
