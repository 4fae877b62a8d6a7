"""A ring of ranks over an MPI communicator: block transfers between two ranks, and the gathers
of per-rank figures to rank 0.

A transfer is a small int64 header (what is in the payload, see ``wire.py``), then one message
per block straight from and into the block's bytes (``message_sizes``), all with uppercase
(buffer) calls, never pickled. Every byte moved is counted here (through
``wire.account_send`` / ``account_receive``), per rank, per round; every wait has a deadline,
after which the job aborts naming the peer and the message awaited. A hop that repeats goes
by a ``hop_plan.HopPlan`` (``Comm.hop_plan``), on the same wire.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np
from mpi4py import MPI

from snake_mpi.transport.mpi.hop_plan import HopPlan
from snake_mpi.transport.mpi.world import abort_job, hostname, library_version
from snake_mpi.transport.protocol import RingPositions
from snake_mpi.transport.wire import (
    HEADER_FIXED,
    HEADER_MAX_BLOCKS,
    TAG_HEADER,
    TAG_PAYLOAD,
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
    """Receives posted ahead by ``Comm.post``: buffers and requests of header and payload,
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
        self._posted: dict[tuple[int, int, int, int], _Posted] = {}
        self.pipelined_min_bytes = 0
        """Payload messages of at least this many bytes to or from ``_same_host`` ranks go as
        ``halves_swapped`` (0: none); set by ``use_pipelined_copy``."""
        self._same_host: frozenset[int] = frozenset()

    @classmethod
    def world(cls, *, deadline_s: float = 600.0, link: LinkModel | None = None) -> Comm:
        """The job's ranks (a duplicate of COMM_WORLD, so our tags never meet a library's)."""
        return cls(MPI.COMM_WORLD.Dup(), deadline_s=deadline_s, link=link)

    @property
    def mpi_comm(self) -> MPI.Comm:
        """The MPI communicator the ring runs over (a ``HopPlan`` makes its requests on it)."""
        return self._comm

    @property
    def same_host(self) -> frozenset[int]:
        """The other ranks on this rank's host (known once ``use_pipelined_copy`` is on)."""
        return self._same_host

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
            self._start(self._comm.Isend, part, dest)
            for part in messages(payload, transfer.block_nbytes)
        ]
        spec = transfer.spec

        def waited_for() -> str:  # words for a timeout only: not built per hop
            return f"rank {dest} to take the {spec.describe(self.rank)} ({nbytes} bytes)"

        self.wait_all(reqs, waited_for, flowing=True)
        account_send(self.stats, self.link, self.rank, dest, header.nbytes + nbytes, t0)

    def post(self, source: int, spec: TransferSpec) -> None:
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
        self._posted[_key(source, spec)] = _Posted(
            header=header,
            payload=payload,
            hreq=self._comm.Irecv([header, MPI.INT64_T], source, TAG_HEADER),
            preqs=self._irecv_payload(payload, nbytes, source),
            ids=ids,
            nbytes=nbytes,
        )

    def cancel(self) -> None:
        """Cancel the receives ``post`` posted and no ``recv_blocks`` completed: their
        transfers will not come (the run stops at a checkpoint)."""
        while self._posted:
            _, posted = self._posted.popitem()
            for req in [posted.hreq, *posted.preqs]:
                req.Cancel()
                req.Wait()

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
        self, buf: Payload, block_nbytes: Sequence[int], source: int
    ) -> list[MPI.Request]:
        return [self._start(self._comm.Irecv, part, source) for part in messages(buf, block_nbytes)]

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

    def _start(self, start: Callable[..., MPI.Request], part: Any, peer: int) -> MPI.Request:
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
        else with ``spec.alloc(nbytes)``, in the buffer it returns once the header has said
        how large the payload is (a pinned or device buffer, ``payloads.HopBuffers``); else in
        a new array. A transfer posted with ``post`` completes the receives posted then, after
        checking the header names the blocks posted.
        """
        posted = self._posted.pop(_key(source, spec), None)
        what = spec.describe(source)
        status = MPI.Status()
        t0 = time.perf_counter()
        if posted is not None:
            header_buf, req = posted.header, posted.hreq
        else:
            header_buf = self._header_buf
            req = self._comm.Irecv([header_buf, MPI.INT64_T], source, TAG_HEADER)
        self.wait_all([req], f"the header of the {what}", statuses=[status])
        t1 = time.perf_counter()
        self.stats.wait_s += t1 - t0
        header = header_buf[: status.Get_count(MPI.INT64_T)].copy()
        body, payload_bytes = parse_header(header, spec, rank=self.rank, what=what)
        ids, nbytes = body[:, 0].tolist(), body[:, 2].tolist()

        def payload_what() -> str:  # words for an error or timeout only
            return f"the payload ({payload_bytes} bytes) of the {what}"

        if posted is not None:
            check_posted((posted.ids, posted.nbytes), ids, nbytes, rank=self.rank, what=what)
            payload, preqs = posted.payload, posted.preqs
        else:
            payload = self._landing(spec, ids, nbytes, what)
            preqs = self._irecv_payload(payload, nbytes, source)
        statuses = [MPI.Status() for _ in preqs]
        self.wait_all(preqs, payload_what, statuses=statuses, flowing=True)
        got = sum(st.Get_count(MPI.BYTE) for st in statuses)
        if got != payload_bytes:
            raise ProtocolError(f"rank {self.rank}: got {got} bytes for {payload_what()}")
        total = header.nbytes + payload_bytes
        account_receive(self.stats, self.link, source, self.rank, total, t1)
        return transfer_from(header, body, payload)

    def wait_all(
        self,
        reqs: Sequence[MPI.Request],
        what: str | Callable[[], str],
        *,
        statuses: list[MPI.Status] | None = None,
        flowing: bool = False,
    ) -> None:
        """Poll requests until done: spin briefly (``flowing``, data in flight: longer), then
        short sleeps; raise ``PeerTimeout`` at the deadline naming ``what`` (words, or a
        function that makes them: only a timeout needs them)."""
        spin_s = _SPIN_FLOW_S if flowing else _SPIN_IDLE_S
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
            self.wait_all([req], f"rank 0 to take {what}")
            return
        assert rows is not None
        rows[0][...] = row
        peers = list(range(1, self.size))
        reqs = [self._comm.Irecv([rows[k], mpitype], k, TAG_GATHER) for k in peers]
        try:
            self.wait_all(reqs, f"{what} from every rank")
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
            self.wait_all(reqs, f"every rank to take {what}")
            self.stats.control_bytes_sent += table.nbytes * (self.size - 1)
            return table
        table = np.empty((self.size, np.asarray(row).size), dtype=np.float64)
        self.wait_all([self._comm.Irecv([table, MPI.DOUBLE], 0, TAG_SHARE)], f"{what} from rank 0")
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
        self.wait_all([self._comm.Ibarrier()], "all ranks to reach the barrier")

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


if TYPE_CHECKING:  # mypy checks that Comm meets the Communicator protocol
    _conforms: type[Communicator] = Comm


def _key(source: int, spec: TransferSpec) -> tuple[int, int, int, int]:
    """The key of a receive posted by ``post``: the source and the transfer's name."""
    return (source, spec.kind, spec.round, spec.hop)


def _new_payload(nbytes: int, alloc: Callable[[int], Payload | None] | None) -> Payload:
    """The buffer a payload of ``nbytes`` lands in: ``alloc``'s, else a new host array."""
    buf = alloc(nbytes) if alloc is not None else None
    if buf is None:
        return np.empty(nbytes, dtype=np.uint8)
    if buf.nbytes != nbytes or not is_byte_buffer(buf):
        raise ProtocolError(f"receive buffer of {buf.nbytes} bytes for a {nbytes}-byte payload")
    return buf
