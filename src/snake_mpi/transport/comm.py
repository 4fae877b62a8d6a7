"""Point-to-point transport of model blocks between ranks: the only module that imports mpi4py.

A transfer is a small int64 header (what is in the payload, see ``wire.py``), then one message
per block straight from and into the block's bytes (``message_sizes``), all with uppercase
(buffer) calls, never pickled. Every byte
moved is counted here (through ``wire.account_send`` / ``account_receive``), per rank, per
round; every wait has a deadline, after which the job aborts naming the peer and the message
awaited.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from mpi4py import MPI

from snake_mpi.durable import StorageFull, is_no_space
from snake_mpi.numerics import DataMismatch
from snake_mpi.transport.protocol import RingPositions
from snake_mpi.transport.wire import (
    HEADER_FIXED,
    HEADER_MAX_BLOCKS,
    MAGIC,
    CommStats,
    LinkModel,
    Payload,
    PeerTimeout,
    ProtocolError,
    Transfer,
    TransferSpec,
    account_receive,
    account_send,
    check_landing,
    check_posted,
    is_byte_buffer,
    pack_header,
    parse_header,
    payload_nbytes,
    segments,
    transfer_from,
)

if TYPE_CHECKING:
    from snake_mpi.transport.protocol import Communicator

TAG_HEADER = 11
TAG_PAYLOAD = 12
TAG_GATHER = 13
TAG_SHARE = 14

MAX_MESSAGE_BYTES = 1 << 30
"""A block larger than this travels as consecutive messages of at most this size (same tag,
so MPI's ordering rule keeps them in order): MPI counts are C ints, and one message of a
2.4 GB OPT-1.3B segment fails with MPI_ERR_ARG. Still one transfer in the byte counts."""
_SPIN_IDLE_S = 0.002  # waiting for a peer to start: busy-poll briefly, then sleep between polls
_SPIN_FLOW_S = 0.5  # data in flight: keep polling, large transfers progress only while polled
_MAX_SLEEP_S = 0.001  # longest sleep between polls: idle ranks must not steal cores


def halves_swapped(part: Any) -> MPI.Datatype:
    """A committed datatype over the host buffer ``part`` (by its address, sent from
    ``MPI.BOTTOM``): its second half, then its first. The same bytes, but not contiguous, so
    Open MPI's shared-memory transport moves it by its copy-in/copy-out pipeline (the sender
    copies into shared fragments while the receiver copies out: two cores) instead of one copy
    by the receiver's core (CMA): 8-24 % faster from 64 MiB here, 16 % slower at 4-16 MiB
    (``bench/one_message.py --blocks 1``). Both ends of a message must use it: the bytes land
    in the type's order; sender and receiver derive it from the same size."""
    n = int(part.nbytes)
    address = part.data_ptr() if hasattr(part, "data_ptr") else part.ctypes.data
    half = n // 2
    return MPI.BYTE.Create_hindexed([n - half, half], [address + half, address]).Commit()


@dataclass(slots=True)
class _Posted:
    """Receives posted ahead by ``Comm.expect``: buffers and requests of header and payload,
    and the blocks (ids, bytes) the header must announce."""

    header: np.ndarray
    payload: Any
    hreq: MPI.Request
    preqs: list[MPI.Request]
    ids: list[int]
    nbytes: list[int]


def message_sizes(block_nbytes: Sequence[int] | np.ndarray) -> list[int]:
    """The messages that carry a payload of blocks of these sizes: each block in messages of
    at most ``MAX_MESSAGE_BYTES`` (one empty message for an empty block), one empty message for
    a transfer of no blocks. Sender and receiver both derive them from the header's sizes."""
    sizes: list[int] = []
    for n in block_nbytes:
        n = int(n)
        sizes += [min(MAX_MESSAGE_BYTES, n - i) for i in range(0, max(n, 1), MAX_MESSAGE_BYTES)]
    return sizes or [0]


def messages(payload: Payload, block_nbytes: Sequence[int] | np.ndarray) -> list[Any]:
    """The payload cut into its messages (``message_sizes``): slices of one contiguous buffer,
    or of each block's own buffer. Numpy arrays, or 1-D uint8 tensors (CUDA tensors go to
    mpi4py by DLPack where the MPI library is CUDA-aware, ``payloads.py``)."""
    segs = segments(payload)
    if not segs:  # a transfer of no blocks: one empty message
        return [np.empty(0, dtype=np.uint8)]
    if len(segs) == len(block_nbytes) and all(
        0 < seg.nbytes <= MAX_MESSAGE_BYTES for seg in segs
    ):  # one buffer per block (or one block), each one message: as they are
        return segs
    if len(segs) == 1:
        buf, offset, out = segs[0], 0, []
        for n in message_sizes(block_nbytes):
            out.append(buf[offset : offset + n])
            offset += n
        return out
    out = []
    for seg, n in zip(segs, block_nbytes, strict=True):
        out += [seg[i : i + MAX_MESSAGE_BYTES] for i in range(0, max(int(n), 1), MAX_MESSAGE_BYTES)]
    return out


class Comm(RingPositions):
    """A ring of ranks over an MPI communicator (passed in, never reached for)."""

    def __init__(
        self, mpi_comm: MPI.Comm, *, deadline_s: float = 600.0, link: LinkModel | None = None
    ) -> None:
        self._comm = mpi_comm
        self.link = link if link is not None and link.active else None
        self.rank: int = mpi_comm.Get_rank()
        self.size: int = mpi_comm.Get_size()
        self.deadline_s = float(deadline_s)
        self.stats = CommStats()
        self._header_buf = np.empty(HEADER_FIXED + 3 * HEADER_MAX_BLOCKS, dtype=np.int64)
        self._expected: dict[tuple[int, int, int, int], _Posted | HopPlan] = {}
        self.pipelined_min_bytes = 0
        """Payload messages of at least this many bytes to or from ``_same_host`` ranks go as
        ``halves_swapped`` (0: none); set by ``use_pipelined_copy``."""
        self._same_host: frozenset[int] = frozenset()

    @classmethod
    def world(cls, *, deadline_s: float = 600.0, link: LinkModel | None = None) -> Comm:
        """The job's ranks (a duplicate of COMM_WORLD, so our tags never meet a library's)."""
        return cls(MPI.COMM_WORLD.Dup(), deadline_s=deadline_s, link=link)

    # ---------------------------------------------------------------- transfers

    def send_blocks(self, dest: int, transfer: Transfer) -> None:
        """Send ``transfer``'s header, then its payload block by block, to ``dest``; counts
        bytes and time. The payload: numpy arrays, or device tensors whose stream has been
        synchronised; one contiguous buffer or one per block (sent as they are, no copy)."""
        header = pack_header(transfer)
        payload = transfer.payload
        nbytes = payload_nbytes(payload)
        t0 = time.perf_counter()
        reqs = [self._comm.Isend([header, MPI.INT64_T], dest, TAG_HEADER)]
        reqs += [  # sent even when empty
            self._post(self._comm.Isend, part, dest)
            for part in messages(payload, transfer.block_nbytes)
        ]
        spec = transfer.spec

        def waited_for() -> str:  # words for a timeout only: not built per hop
            return f"rank {dest} to take the {spec.describe(self.rank)} ({nbytes} bytes)"

        self._wait_all(reqs, waited_for, spin_s=_SPIN_FLOW_S)
        account_send(self.stats, self.link, self.rank, dest, header.nbytes + nbytes, t0)

    def expect(self, source: int, spec: TransferSpec) -> None:
        """Post the receives of transfer ``spec`` now, to be completed by a later
        ``recv_blocks(source, spec)``; ``spec.blocks`` (or ``spec.payload_bytes``, as one
        block) says what will come, ``spec.into`` (else ``spec.alloc``) where it lands.

        So a hop's bytes can land while this rank still works (where the order of transfers
        is known ahead: the ring's). And a rank that enters a collective before its next
        receive must post that receive first: a large send is taken only once the receive is
        posted, so a sender waiting on it would never join the collective (node N-1's hop to
        node 0 across a round end).
        """
        ids, nbytes = spec.posted_blocks()
        header = np.empty(HEADER_FIXED + 3 * HEADER_MAX_BLOCKS, dtype=np.int64)
        payload = self._landing(spec, ids, nbytes, spec.describe(source))
        self._expected[_key(source, spec)] = _Posted(
            header=header,
            payload=payload,
            hreq=self._comm.Irecv([header, MPI.INT64_T], source, TAG_HEADER),
            preqs=self._irecv_payload(payload, nbytes, source),
            ids=ids,
            nbytes=nbytes,
        )

    def forget_expected(self) -> None:
        """Cancel the receives ``expect`` posted and no ``recv_blocks`` completed: their
        transfers will not come (the run stops at a checkpoint)."""
        while self._expected:
            _, posted = self._expected.popitem()
            if isinstance(posted, HopPlan):
                posted.cancel()
                continue
            for req in [posted.hreq, *posted.preqs]:
                req.Cancel()
                req.Wait()

    def take_plan(self, source: int, kind: int, round_: int, hop: int) -> HopPlan | None:
        """The ``HopPlan`` whose ``expect`` posted transfer ``(kind, round_, hop)`` from
        ``source``, handed over to complete it (``HopPlan.receive``); None where no plan did
        (a receive ``expect`` posted stays for ``recv_blocks``)."""
        key = (source, kind, round_, hop)
        posted = self._expected.get(key)
        if isinstance(posted, HopPlan):
            del self._expected[key]
            return posted
        return None

    def hop_plan(self, peer: int, block_ids: Sequence[int], bufs: Sequence[Any]) -> HopPlan | None:
        """A ``HopPlan`` for hops of blocks ``block_ids`` between this rank and ``peer`` in
        the host buffers ``bufs`` (one per block, the model's block buffers); None where a
        hop of them needs the general path (an empty block, one above ``MAX_MESSAGE_BYTES``,
        more than ``HEADER_MAX_BLOCKS`` blocks, or a buffer that is not host bytes)."""
        if not 0 < len(bufs) == len(block_ids) <= HEADER_MAX_BLOCKS:
            return None
        for buf in bufs:
            if not isinstance(buf, np.ndarray) or not is_byte_buffer(buf):
                return None
            if not 0 < buf.nbytes <= MAX_MESSAGE_BYTES:
                return None
        return HopPlan(self, peer, block_ids, bufs)

    def _landing(self, spec: TransferSpec, ids: list[int], nbytes: list[int], what: str) -> Any:
        """Where the payload of blocks ``ids`` lands: ``spec.into``'s buffers (one per block),
        else one buffer (``spec.alloc``'s or new)."""
        if spec.into is not None:
            bufs = spec.into(ids, nbytes)
            if bufs is not None:
                check_landing(bufs, nbytes, rank=self.rank, what=what)
                return bufs
        return _new_payload(sum(nbytes), spec.alloc)

    def _irecv_payload(
        self, buf: Payload, block_nbytes: Sequence[int], source: int, skip: int = 0
    ) -> list[MPI.Request]:
        parts = messages(buf, block_nbytes)[skip:]
        return [self._post(self._comm.Irecv, part, source) for part in parts]

    # ---------------------------------------------------------------- large same-host messages

    def use_pipelined_copy(self, min_bytes: int, *, host: bool) -> bool:
        """From now on, send payload messages of at least ``min_bytes`` (0: none) between
        ranks on the same host as ``halves_swapped``: MPI's two-core copy pipeline instead of
        its single copy. Collective (every rank calls it with the same ``min_bytes``, before
        any hop; 0 agrees on nothing); ``host`` says whether this rank's hops move host
        memory: on only where every rank's do, since both ends of a message must agree on its
        layout. Returns whether it is on."""
        if min_bytes <= 0:  # off (the default): no agreement to make
            self.pipelined_min_bytes = 0
            return False
        table = self.allgather_row(np.array([1.0 if host else 0.0]), "the ranks' transfer paths")
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        mine, world = local.Get_group(), self._comm.Get_group()
        try:
            ranks = MPI.Group.Translate_ranks(mine, list(range(local.Get_size())), world)
        finally:
            mine.Free()
            world.Free()
            local.Free()
        on = bool(table.min() > 0)
        self.pipelined_min_bytes = int(min_bytes) if on else 0
        self._same_host = frozenset(int(r) for r in ranks) - {self.rank}
        return on

    def message(self, part: Any, peer: int) -> tuple[list[Any], MPI.Datatype | None]:
        """The mpi4py message of payload part ``part`` to or from ``peer``, and its derived
        datatype if it has one (``halves_swapped``: the caller frees it)."""
        n = self.pipelined_min_bytes
        if n and part.nbytes >= n and peer in self._same_host:
            dtype = halves_swapped(part)
            return [MPI.BOTTOM, 1, dtype], dtype
        return [part, MPI.BYTE], None

    def _post(self, start: Callable[..., MPI.Request], part: Any, peer: int) -> MPI.Request:
        """``Isend``/``Irecv`` of one payload message (a derived datatype is freed once the
        request holds it, as MPI allows)."""
        msg, dtype = self.message(part, peer)
        req = start(msg, peer, TAG_PAYLOAD)
        if dtype is not None:
            dtype.Free()
        return req

    def recv_blocks(self, source: int, spec: TransferSpec) -> Transfer:
        """Receive the transfer ``spec`` names from ``source``; checks it is that one.

        Where the payload lands: with ``spec.into(ids, nbytes)``, in the buffers it returns
        for the blocks the header announces (the model's own block buffers: no copy after);
        with ``spec.out`` (a contiguous uint8 buffer, reused across hops), in
        ``out[:payload_bytes]``, its first message's receive posted together with the
        header's; with ``spec.alloc(nbytes)``, in the buffer it returns once the header has
        said how large the payload is (a pinned or device buffer, ``payloads.HopBuffers``);
        else in a new array. A transfer announced with ``expect`` completes the receives
        posted then, after checking the header names the blocks expected.
        """
        posted = self._expected.pop(_key(source, spec), None)
        if isinstance(posted, HopPlan):
            return posted.complete(spec)
        what = spec.describe(source)
        status = MPI.Status()
        t0 = time.perf_counter()
        out: Payload | None = None
        preqs: list[MPI.Request] = []
        if posted is not None:
            header_buf, req = posted.header, posted.hreq
            out, preqs = posted.payload, posted.preqs
        else:
            header_buf = self._header_buf
            req = self._comm.Irecv([header_buf, MPI.INT64_T], source, TAG_HEADER)
            # the first message can flow at once, before we have read the header (not where
            # it may be swapped halves: their layout needs the message's size, not the buffer's)
            if (
                spec.into is None
                and spec.out is not None
                and is_byte_buffer(spec.out)
                and not (self.pipelined_min_bytes and source in self._same_host)
            ):
                out = spec.out
                first = out[: min(out.nbytes, MAX_MESSAGE_BYTES)]
                preqs = [self._comm.Irecv([first, MPI.BYTE], source, TAG_PAYLOAD)]
        self._wait_all([req], f"the header of the {what}", statuses=[status])
        t1 = time.perf_counter()
        self.stats.wait_s += t1 - t0
        header = header_buf[: status.Get_count(MPI.INT64_T)].copy()
        body, payload_bytes = parse_header(header, spec, rank=self.rank, what=what)
        ids, nbytes = body[:, 0].tolist(), body[:, 2].tolist()

        def payload_what() -> str:  # words for an error or timeout only
            return f"the payload ({payload_bytes} bytes) of the {what}"

        if posted is not None:
            check_posted((posted.ids, posted.nbytes), ids, nbytes, rank=self.rank, what=what)
            payload = out
        elif out is not None:  # its first message's receive was posted before the header came
            if payload_bytes > out.nbytes:
                raise ProtocolError(
                    f"rank {self.rank}: {payload_what()} exceeds the {out.nbytes}-byte buffer"
                )
            payload = out[:payload_bytes]
            preqs += self._irecv_payload(payload, nbytes, source, skip=1)
        else:
            payload = self._landing(spec, ids, nbytes, what)
            preqs = self._irecv_payload(payload, nbytes, source)
        statuses = [MPI.Status() for _ in preqs]
        self._wait_all(preqs, payload_what, statuses=statuses, spin_s=_SPIN_FLOW_S)
        got = sum(st.Get_count(MPI.BYTE) for st in statuses)
        if got != payload_bytes:
            raise ProtocolError(f"rank {self.rank}: got {got} bytes for {payload_what()}")
        total = header.nbytes + payload_bytes
        account_receive(self.stats, self.link, source, self.rank, total, t1)
        return transfer_from(header, body, payload)

    def _wait_all(
        self,
        reqs: Sequence[MPI.Request],
        what: str | Callable[[], str],
        *,
        statuses: list[MPI.Status] | None = None,
        spin_s: float = _SPIN_IDLE_S,
    ) -> None:
        """Poll requests until done: spin briefly, then short sleeps; raise at the deadline
        naming ``what`` (words, or a function that makes them: only a timeout needs them)."""
        t0 = time.perf_counter()
        deadline = t0 + self.deadline_s
        sleep_s = 0.0
        while True:
            if statuses is not None:
                done = MPI.Request.Testall(reqs, statuses)
            elif len(reqs) == 1:
                done = reqs[0].Test()
            else:
                done = MPI.Request.Testall(reqs)
            if done:
                return
            now = time.perf_counter()
            if now > deadline:  # no Cancel: the caller aborts the job, which frees all
                if callable(what):
                    what = what()
                raise PeerTimeout(
                    f"rank {self.rank}: waited {now - t0:.1f} s for {what}; "
                    f"deadline comm.deadline_s = {self.deadline_s:g} s"
                )
            if now - t0 > spin_s:
                sleep_s = min(_MAX_SLEEP_S, max(2 * sleep_s, 1e-5))
                time.sleep(sleep_s)

    # ---------------------------------------------------------------- metrics to rank 0

    def _gather_rows(self, row: np.ndarray, rows: list[np.ndarray] | None, what: str) -> None:
        """Point-to-point gather to rank 0 (``rows[k]`` receives rank k's ``row``), polled
        under the deadline; a timeout names the ranks that have not sent."""
        mpitype = MPI.DOUBLE if row.dtype == np.float64 else MPI.BYTE
        if self.rank != 0:
            req = self._comm.Isend([row, mpitype], 0, TAG_GATHER)
            self._wait_all([req], f"rank 0 to take {what}")
            return
        assert rows is not None
        rows[0][...] = row
        peers = list(range(1, self.size))
        reqs = [self._comm.Irecv([rows[k], mpitype], k, TAG_GATHER) for k in peers]
        try:
            self._wait_all(reqs, f"{what} from every rank")
        except PeerTimeout as e:
            missing = [k for k, r in zip(peers, reqs, strict=True) if not r.Test()]
            raise PeerTimeout(f"{e}; still missing: rank(s) {missing}") from None

    def gather_row(self, row: np.ndarray, what: str = "the round's figures") -> np.ndarray | None:
        """Gather one float64 row per rank to rank 0 -> (size, len) there, None elsewhere."""
        row = np.ascontiguousarray(row, dtype=np.float64)
        out = np.empty((self.size, row.size), dtype=np.float64) if self.rank == 0 else None
        self._gather_rows(row, list(out) if out is not None else None, what)
        if self.rank != 0:
            self.stats.control_bytes_sent += row.nbytes
        return out

    def allgather_row(self, row: np.ndarray, what: str = "a shared row") -> np.ndarray:
        """Every rank's float64 row, as (size, len), on every rank (gather, then rank 0 sends
        the table to each rank; point-to-point, deadline-bound)."""
        table = self.gather_row(row, what)
        if table is not None:  # rank 0
            reqs = [
                self._comm.Isend([table, MPI.DOUBLE], k, TAG_SHARE) for k in range(1, self.size)
            ]
            self._wait_all(reqs, f"every rank to take {what}")
            self.stats.control_bytes_sent += table.nbytes * (self.size - 1)
            return table
        table = np.empty((self.size, np.asarray(row).size), dtype=np.float64)
        self._wait_all([self._comm.Irecv([table, MPI.DOUBLE], 0, TAG_SHARE)], f"{what} from rank 0")
        return table

    def gatherv(self, arr: np.ndarray, what: str = "a series") -> list[np.ndarray] | None:
        """Gather a 1-D float64 array of any length per rank to rank 0 (list by rank there)."""
        arr = np.ascontiguousarray(arr, dtype=np.float64).ravel()
        counts = self.gather_row(np.array([arr.size], dtype=np.float64), f"the length of {what}")
        out = None if counts is None else [np.empty(int(c), np.float64) for c in counts[:, 0]]
        self._gather_rows(arr, out, what)
        if self.rank != 0:
            self.stats.control_bytes_sent += arr.nbytes
        return out

    def gather_str(self, text: str, max_bytes: int = 256) -> list[str] | None:
        """Gather a short string per rank to rank 0 (as fixed-size bytes, not pickled)."""
        raw = text.encode()[:max_bytes]
        buf = np.zeros(max_bytes, dtype=np.uint8)
        buf[: len(raw)] = np.frombuffer(raw, dtype=np.uint8)
        out = np.empty((self.size, max_bytes), dtype=np.uint8) if self.rank == 0 else None
        self._gather_rows(buf, list(out) if out is not None else None, "strings")
        if out is None:
            self.stats.control_bytes_sent += buf.nbytes
            return None
        return [bytes(r).rstrip(b"\0").decode(errors="replace") for r in out]

    def hostname(self) -> str:
        """This rank's host name."""
        return hostname()

    def library_version(self) -> str:
        """The MPI library's version string."""
        return library_version()

    def barrier(self) -> None:
        """Synchronise all ranks (used only outside the round loop), under the deadline."""
        self._wait_all([self._comm.Ibarrier()], "all ranks to reach the barrier")

    def ranks_on_host(self) -> int:
        """How many ranks of this job share this rank's host (for torch thread counts)."""
        local = self._comm.Split_type(MPI.COMM_TYPE_SHARED)
        try:
            return local.Get_size()
        finally:
            local.Free()

    # ---------------------------------------------------------------- failure

    def abort(self, message: str, code: int = 1) -> NoReturn:
        """Print the message naming this rank and end the whole job (never returns)."""
        abort_job(message, code)


class HopPlan:
    """A hop that repeats (the ring's): blocks ``ids`` of a model, between this rank and
    ``peer``, straight from and into their block buffers, made once and started per hop.

    The same wire, checks and counts as ``send_blocks``/``expect``/``recv_blocks`` (a plan's
    transfer is received by either path, and either path's by a plan), with the per-hop
    Python taken out: the header is written in place (kind, round, hop, versions: the rest is
    fixed), the messages are persistent MPI requests (``Send_init``/``Recv_init``) on the
    header and the block buffers, and a received header is compared word by word with the one
    expected. ``bench/lean_hop.py`` measured this shape at 0.93-1.0 of a bare mpi4py transfer
    where the general path ran at 0.3-0.86. Valid while the buffers are: ``HopBuffers.plan``
    builds a new one when the model's ``layout_gen`` moves, and never starts a stale one.
    """

    __slots__ = (
        "_comm",
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
        "_ids_arr",
        "_sizes_arr",
        "_dtypes",
    )

    def __init__(self, comm: Comm, peer: int, ids: Sequence[int], bufs: Sequence[Any]) -> None:
        self._comm = comm
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
        self._ids_arr = np.array(self.ids, dtype=np.int64)
        self._sizes_arr = np.array(self.sizes, dtype=np.int64)
        self._dtypes: list[MPI.Datatype] = []  # of swapped-halves messages, freed with the plan

    def _message(self, buf: Any) -> list[Any]:
        msg, dtype = self._comm.message(buf, self.peer)
        if dtype is not None:
            self._dtypes.append(dtype)
        return msg

    @property
    def active(self) -> bool:
        """Whether a receive of this plan is posted and not yet completed."""
        return self._posted is not None

    def send_blocks(self, kind: int, round_: int, hop: int, versions: Sequence[int]) -> None:
        """Send the blocks (as ``Comm.send_blocks`` would) with these versions; counted."""
        comm = self._comm
        h = self._out
        h[1], h[2], h[3] = kind, round_, hop
        h[7::3] = versions
        if self._sends is None:
            c, p = comm._comm, self.peer
            self._sends = [c.Send_init([h, MPI.INT64_T], p, TAG_HEADER)]
            self._sends += [c.Send_init(self._message(b), p, TAG_PAYLOAD) for b in self.bufs]
        t0 = time.perf_counter()
        MPI.Prequest.Startall(self._sends)
        comm._wait_all(self._sends, self._send_what, spin_s=_SPIN_FLOW_S)
        account_send(comm.stats, comm.link, comm.rank, self.peer, h.nbytes + self.total_bytes, t0)

    def _send_what(self) -> str:
        kind, round_, hop = self._out[1:4].tolist()
        spec = TransferSpec(kind, round_, hop)
        return f"rank {self.peer} to take the {spec.describe(self._comm.rank)}"

    def expect(self, kind: int, round_: int, hop: int) -> None:
        """Post the receives of transfer ``(kind, round_, hop)`` now (as ``Comm.expect``):
        the next ``recv_blocks(peer, spec)`` of that transfer completes them."""
        comm = self._comm
        if self._posted is not None:
            raise RuntimeError(f"rank {comm.rank}: a hop plan posted twice")
        if self._recvs is None:
            c, p = comm._comm, self.peer
            self._in = np.empty(HEADER_FIXED + 3 * HEADER_MAX_BLOCKS, dtype=np.int64)
            self._recvs = [c.Recv_init([self._in, MPI.INT64_T], p, TAG_HEADER)]
            self._recvs += [c.Recv_init(self._message(b), p, TAG_PAYLOAD) for b in self.bufs]
            self._head, self._body = self._recvs[:1], self._recvs[1:]
        MPI.Prequest.Startall(self._recvs)
        self._posted = (kind, round_, hop)
        comm._expected[(self.peer, kind, round_, hop)] = self

    def complete(self, spec: TransferSpec) -> Transfer:
        """Complete the posted receive as ``recv_blocks`` returns it (a ``Transfer`` whose
        payload is the block buffers); ``receive`` without the objects."""
        versions = self.receive(spec.kind, spec.round, spec.hop)
        return Transfer(
            spec.kind,
            spec.round,
            spec.hop,
            self._ids_arr,
            np.array(versions, dtype=np.int64),
            self._sizes_arr,
            self.bufs,
        )

    def receive(self, kind: int, round_: int, hop: int) -> list[int]:
        """Complete the posted receive of transfer ``(kind, round_, hop)`` (``Comm.take_plan``
        hands it over): the header must name that transfer and the blocks expected (else
        ``ProtocolError``, worded as the general path words it); returns the blocks'
        versions, their bytes are in their buffers. Counted as ``recv_blocks`` counts."""
        comm, source = self._comm, self.peer
        if self._posted != (kind, round_, hop):
            raise ProtocolError(
                f"rank {comm.rank}: no receive posted for the {self._describe(kind, round_, hop)}"
            )
        assert self._in is not None
        t0 = time.perf_counter()
        comm._wait_all(self._head, self._header_what, statuses=self._head_st)
        t1 = time.perf_counter()
        comm.stats.wait_s += t1 - t0
        count = self._head_st[0].Get_count(MPI.INT64_T)
        got = self._in[:count].tolist()
        total = self.total_bytes
        if (
            got[:6] != [MAGIC, kind, round_, hop, len(self.ids), total]
            or got[6::3] != self.ids
            or got[8::3] != self.sizes
        ):
            self._refuse(got, TransferSpec(kind, round_, hop))
        comm._wait_all(self._body, self._payload_what, statuses=self._body_st, spin_s=_SPIN_FLOW_S)
        for status, size in zip(self._body_st, self.sizes, strict=True):
            if status.Get_count(MPI.BYTE) != size:
                raise ProtocolError(
                    f"rank {comm.rank}: got {status.Get_count(MPI.BYTE)} bytes of a "
                    f"{size}-byte block in the {self._describe(kind, round_, hop)}"
                )
        self._posted = None
        account_receive(comm.stats, comm.link, source, comm.rank, 8 * count + total, t1)
        return got[7::3]

    def _describe(self, kind: int, round_: int, hop: int) -> str:
        return TransferSpec(kind, round_, hop).describe(self.peer)

    def _header_what(self) -> str:  # words for a timeout only
        return f"the header of the {self._describe(*(self._posted or (0, 0, 0)))}"

    def _payload_what(self) -> str:
        what = self._describe(*(self._posted or (0, 0, 0)))
        return f"the payload ({self.total_bytes} bytes) of the {what}"

    def _refuse(self, got: list[int], spec: TransferSpec) -> NoReturn:
        """A header that is not the one expected: the general path's checks word the error."""
        comm, what = self._comm, spec.describe(self.peer)
        header = np.array(got, dtype=np.int64)
        body, _ = parse_header(header, spec, rank=comm.rank, what=what)
        ids, nbytes = body[:, 0].tolist(), body[:, 2].tolist()
        check_posted((self.ids, self.sizes), ids, nbytes, rank=comm.rank, what=what)
        raise ProtocolError(f"rank {comm.rank}: unexpected header {got} in the {what}")

    def cancel(self) -> None:
        """Cancel a posted receive that will not be completed (``forget_expected``)."""
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


if TYPE_CHECKING:  # mypy checks that Comm meets the Communicator protocol
    _conforms: type[Communicator] = Comm


def _key(source: int, spec: TransferSpec) -> tuple[int, int, int, int]:
    """The key of a receive posted by ``expect``: the source and the transfer's name."""
    return (source, spec.kind, spec.round, spec.hop)


def _new_payload(nbytes: int, alloc: Callable[[int], Payload | None] | None) -> Payload:
    """The buffer a payload of ``nbytes`` lands in: ``alloc``'s, else a new host array."""
    buf = alloc(nbytes) if alloc is not None else None
    if buf is None:
        return np.empty(nbytes, dtype=np.uint8)
    if buf.nbytes != nbytes or not is_byte_buffer(buf):
        raise ProtocolError(f"receive buffer of {buf.nbytes} bytes for a {nbytes}-byte payload")
    return buf


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
