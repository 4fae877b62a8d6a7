"""An in-process communicator with ``mpi.comm.Comm``'s interface: N ranks as threads of one process.

Lets a scheme run in a unit test without mpirun, and lets a test compare the same run both
ways bit for bit. Messages are copied (as MPI would), counted exactly as ``Comm`` counts
them (same header layout, same accounting), and every wait has the same deadline.
"""

from __future__ import annotations

import queue
import socket
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

import numpy as np

from snake_mpi.transport.protocol import RingPositions
from snake_mpi.transport.wire import (
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
    pack_header,
    parse_header,
    segments,
    transfer_from,
)

if TYPE_CHECKING:
    from snake_mpi.transport.protocol import Communicator


class ThreadWorld:
    """Shared mailboxes and a barrier for ``size`` thread-ranks."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._boxes: dict[tuple[int, int], queue.Queue[tuple[np.ndarray, Payload]]] = {
            (s, d): queue.Queue() for s in range(size) for d in range(size)
        }
        self._barrier = threading.Barrier(size)
        self._slots: list[Any] = [None] * size
        self._shared: Any = None
        self._failed = threading.Event()
        """Set when a rank's body raised: the others stop waiting (MPI would abort them)."""

    def comm(
        self, rank: int, *, deadline_s: float = 600.0, link: LinkModel | None = None
    ) -> LocalComm:
        """The communicator of ``rank``."""
        return LocalComm(self, rank, deadline_s=deadline_s, link=link)

    def run(
        self,
        body: Callable[[LocalComm], Any],
        *,
        deadline_s: float = 600.0,
        link: LinkModel | None = None,
    ) -> list[Any]:
        """Run ``body(comm)`` on every rank in its own thread; re-raise the first failure."""
        results: list[Any] = [None] * self.size
        errors: list[BaseException] = []

        def target(rank: int) -> None:
            try:
                results[rank] = body(self.comm(rank, deadline_s=deadline_s, link=link))
            except BaseException as e:  # noqa: BLE001 - reported to the caller below
                errors.append(e)
                self._failed.set()
                self._barrier.abort()

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results


class LocalComm(RingPositions):
    """One thread-rank of a ThreadWorld; same methods and counters as ``Comm``."""

    def __init__(
        self, world: ThreadWorld, rank: int, *, deadline_s: float, link: LinkModel | None = None
    ) -> None:
        self._world = world
        self.link = link if link is not None and link.active else None
        self.rank = rank
        self.size = world.size
        self.deadline_s = float(deadline_s)
        self.stats = CommStats()
        self._posted: dict[tuple[int, int, int, int], tuple[list[int], list[int]]] = {}

    def send_blocks(self, dest: int, transfer: Transfer) -> None:
        """Put a copy of ``transfer``'s header and payload in ``dest``'s mailbox; counted."""
        header = pack_header(transfer)
        segs = segments(transfer.payload)
        t0 = time.perf_counter()
        sent: Any
        if all(isinstance(seg, np.ndarray) for seg in segs):  # one copy, as a send makes
            sent = np.concatenate(segs) if segs else np.empty(0, dtype=np.uint8)
        else:
            import torch

            sent = torch.cat([torch.as_tensor(seg) for seg in segs])
        self._world._boxes[(self.rank, dest)].put((header, sent))
        account_send(self.stats, self.link, self.rank, dest, header.nbytes + sent.nbytes, t0)

    def post(self, source: int, spec: TransferSpec) -> None:
        """Nothing to post ahead: sends here never wait for the receiver. Keeps the blocks
        posted, which the header must name, as ``Comm.post`` does."""
        self._posted[(source, spec.kind, spec.round, spec.hop)] = spec.posted_blocks()

    def hop_plan(self, peer: int, block_ids: Sequence[int], bufs: Sequence[Any]) -> None:
        """None: a send here copies anyway, there is no per-hop set-up to save."""
        return None

    def use_pipelined_copy(self, min_bytes: int, *, host: bool) -> bool:
        """False: threads hand over blocks by one copy in memory, there is no MPI transport."""
        return False

    def cancel(self) -> None:
        """Drop the transfers ``post`` announced (as ``Comm.cancel``)."""
        self._posted.clear()

    def recv_blocks(self, source: int, spec: TransferSpec) -> Transfer:
        """Take the next message from ``source``; it must be the transfer ``spec`` names. Lands
        in ``spec.into``'s or ``spec.alloc``'s buffers where given (copied, as MPI would)."""
        what = spec.describe(source)
        t0 = time.perf_counter()
        header, payload = self._take(source, what, t0)
        t1 = time.perf_counter()
        self.stats.wait_s += t1 - t0
        body, payload_bytes = parse_header(header, spec, rank=self.rank, what=what)
        posted = self._posted.pop((source, spec.kind, spec.round, spec.hop), None)
        ids, nbytes = body[:, 0].tolist(), body[:, 2].tolist()
        if posted is not None:
            check_posted(posted, ids, nbytes, rank=self.rank, what=what)
        if payload.nbytes != payload_bytes:
            raise ProtocolError(f"rank {self.rank}: payload size mismatch in the {what}")
        bufs = spec.into(ids, nbytes) if spec.into is not None else None
        out = spec.alloc(payload_bytes) if bufs is None and spec.alloc is not None else None
        if bufs is not None:  # block by block into the given buffers (the model's own)
            check_landing(bufs, nbytes, rank=self.rank, what=what)
            offset = 0
            for buf, n in zip(bufs, nbytes, strict=True):
                _copy_bytes(buf, payload[offset : offset + n])
                offset += n
            payload = bufs
        elif out is not None:
            _copy_bytes(out[:payload_bytes], payload)
            payload = out[:payload_bytes]
        nbytes = header.nbytes + payload_bytes
        account_receive(self.stats, self.link, source, self.rank, nbytes, t1)
        return transfer_from(header, body, payload)

    def _take(self, source: int, what: str, t0: float) -> tuple[Any, Any]:
        """The next message from ``source``, waiting at most the deadline; gives up at once
        when another rank has failed (as MPI_Abort would end this one)."""
        box = self._world._boxes[(source, self.rank)]
        while True:
            try:
                return box.get(timeout=0.05)
            except queue.Empty:
                if self._world._failed.is_set():
                    raise RuntimeError(
                        f"rank {self.rank}: another rank failed while waiting for the {what}"
                    ) from None
                if time.perf_counter() - t0 > self.deadline_s:
                    raise PeerTimeout(
                        f"rank {self.rank}: waited {self.deadline_s:g} s for the header of the "
                        f"{what}; deadline comm.deadline_s = {self.deadline_s:g} s"
                    ) from None

    # ------------------------------------------------------------ collectives to rank 0

    def _gather(self, item: Any) -> list[Any] | None:
        w = self._world
        w._slots[self.rank] = item
        w._barrier.wait(timeout=self.deadline_s)
        out = list(w._slots) if self.rank == 0 else None
        w._barrier.wait(timeout=self.deadline_s)
        return out

    def gather_row(self, row: np.ndarray, what: str = "") -> np.ndarray | None:
        row = np.array(row, dtype=np.float64)
        if self.rank != 0:  # as Comm: rank 0 keeps its own row, sends nothing
            self.stats.control_bytes_sent += row.nbytes
        rows = self._gather(row)
        return None if rows is None else np.stack(rows)

    def allgather_row(self, row: np.ndarray, what: str = "") -> np.ndarray:
        table = self.gather_row(row, what)
        w = self._world
        if table is not None:  # rank 0, as Comm: sends the table to every other rank
            self.stats.control_bytes_sent += table.nbytes * (self.size - 1)
            w._shared = table
        w._barrier.wait(timeout=self.deadline_s)
        out = np.array(w._shared, dtype=np.float64)
        w._barrier.wait(timeout=self.deadline_s)
        return out

    def gatherv(self, arr: np.ndarray, what: str = "") -> list[np.ndarray] | None:
        arr = np.array(arr, dtype=np.float64).ravel()
        if self.rank != 0:
            self.stats.control_bytes_sent += 8 + arr.nbytes  # the count row, then the data
        return self._gather(arr)

    def gather_str(self, text: str, max_bytes: int = 256) -> list[str] | None:
        if self.rank != 0:
            self.stats.control_bytes_sent += max_bytes
        return self._gather(text.encode()[:max_bytes].decode(errors="replace"))

    def barrier(self) -> None:
        self._world._barrier.wait(timeout=self.deadline_s)

    def ranks_on_host(self) -> int:
        return self.size

    def hostname(self) -> str:
        return socket.gethostname()

    def library_version(self) -> str:
        return "in-process (threads)"

    def abort(self, message: str, code: int = 1) -> NoReturn:
        raise RuntimeError(f"rank {self.rank} of {self.size}: {message}")


if TYPE_CHECKING:  # mypy checks that LocalComm meets the Communicator protocol
    _conforms: type[Communicator] = LocalComm


def _copy_bytes(dst: Any, src: Any) -> None:
    """Copy a payload between numpy arrays and/or torch tensors (as MPI would)."""
    if isinstance(dst, np.ndarray) and isinstance(src, np.ndarray):
        dst[...] = src
        return
    import torch

    as_t = lambda a: a if torch.is_tensor(a) else torch.from_numpy(a)  # noqa: E731
    as_t(dst).copy_(as_t(src))
