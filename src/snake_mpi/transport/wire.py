"""The wire format of a block transfer and its accounting types (no MPI here, so analysis,
tests and the in-process communicator share them).

A transfer is an int64 header, then the blocks' bytes, block after block:

    [MAGIC, kind, round, hop, n_blocks, payload_bytes, (block_id, version, nbytes) * n_blocks]

The payload is one contiguous uint8 buffer, or one buffer per block (a model's block buffers,
``blocks.flat_storage``), back to back in the header's order: the same bytes either way.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np

MAGIC = 0x534E414B  # "SNAK"
TAG_HEADER = 11
"""The MPI tag of a transfer's header message."""
TAG_PAYLOAD = 12
"""The MPI tag of a transfer's payload messages."""
HEADER_FIXED = 6
HEADER_MAX_BLOCKS = 4096
KIND_MODEL = 1
"""Model blocks on their way to a node or client (a hop, or the server's broadcast)."""
KIND_SYNC = 2
"""The final sync after the last round."""
KIND_UPDATE = 3
"""Blocks a node or client trained, on their way back to the server or controller."""
KIND_ACTIVATION = 4
"""Split learning: cut-layer activations and labels, client to server."""
KIND_GRADIENT = 5
"""Split learning: the gradient of the loss at the cut, server to client."""
KIND_NAMES = {
    KIND_MODEL: "model",
    KIND_SYNC: "final-sync",
    KIND_UPDATE: "update",
    KIND_ACTIVATION: "activation",
    KIND_GRADIENT: "gradient",
}


@dataclass(frozen=True, slots=True)
class LinkModel:
    """Emulated links: a transfer of B bytes from ``src`` to ``dst`` takes at least
    ``latency_s + 8 B / bandwidth_bps`` (bandwidth 0: no limit), per edge or by default."""

    bandwidth_bps: float = 0.0
    latency_s: float = 0.0
    edges: tuple[tuple[int, int, float, float], ...] = ()
    """(src, dst, bandwidth_bps, latency_s) overrides."""
    limit_s: float = math.inf
    """Longest emulated hop (the run's ``comm.deadline_s``): a longer one is an error, not a
    sleep that outlasts every deadline."""

    @property
    def active(self) -> bool:
        """True if any link is slower than the machine."""
        return bool(self.bandwidth_bps or self.latency_s or self.edges)

    def hop_s(self, src: int, dst: int, nbytes: int) -> float:
        """The least wall time of a transfer of ``nbytes`` from ``src`` to ``dst``."""
        bps, lat = self.bandwidth_bps, self.latency_s
        for s_, d_, b_, l_ in self.edges:
            if (s_, d_) == (src, dst):
                bps, lat = b_, l_
        return lat + (8.0 * nbytes / bps if bps > 0 else 0.0)


def header_nbytes(n_blocks: int) -> int:
    """Bytes of the header that precedes a payload of ``n_blocks`` blocks."""
    return 8 * (HEADER_FIXED + 3 * n_blocks)


class PeerTimeout(RuntimeError):
    """A peer's message did not arrive (or was not taken) within the deadline."""


class ProtocolError(RuntimeError):
    """A message arrived that is not the one expected (wrong kind, round, hop or sizes)."""


Payload: TypeAlias = Any
"""A payload buffer: a contiguous uint8 numpy array, or a contiguous 1-D uint8 torch tensor
(a pinned or device buffer, ``payloads.py``); ``is_byte_buffer`` tells. No torch import here."""


@dataclass(frozen=True, slots=True)
class TransferSpec:
    """Which transfer a receive awaits, and where its payload lands: the one argument of
    ``post`` and ``recv_blocks`` (the same spec may serve both).

    ``(kind, round, hop)`` name the transfer; the header that arrives must carry them.
    """

    kind: int
    round: int
    hop: int
    payload_bytes: int | None = None
    """The payload's size, known ahead: what ``post`` posts a receive of (without
    ``blocks``)."""
    alloc: Callable[[int], Payload | None] | None = None
    """``alloc(nbytes)``: the buffer the payload lands in (pinned or device,
    ``payloads.HopBuffers.alloc``); ``None`` from it, or no ``alloc``: a new host array."""
    into: Callable[[list[int], list[int]], list[Payload] | None] | None = None
    """``into(block_ids, nbytes)``: one buffer per block, where each block's bytes land (the
    model's own block buffers, ``payloads.HopBuffers.into``): no copy after the receive.
    ``None`` from it: as without ``into``. Takes precedence over ``alloc``."""
    blocks: tuple[tuple[int, int], ...] = ()
    """``(block id, bytes)`` of every block, known ahead: what ``post`` posts receives for;
    the header that arrives must name exactly these blocks and sizes. Without it, ``post``
    takes ``payload_bytes`` as one block."""

    def posted_bytes(self) -> int:
        """The payload size a receive posted ahead (``post``) must know: the ``blocks``'
        bytes, else ``payload_bytes``."""
        if self.blocks:
            return sum(n for _, n in self.blocks)
        if self.payload_bytes is None:
            raise ValueError(f"post needs the payload size: {self} has no payload_bytes")
        return self.payload_bytes

    def posted_blocks(self) -> tuple[list[int], list[int]]:
        """Block ids and bytes a receive posted ahead expects (one block of ``payload_bytes``
        when ``blocks`` is not given; its id is then not checked: -1)."""
        if self.blocks:
            return [b for b, _ in self.blocks], [n for _, n in self.blocks]
        return [-1], [self.posted_bytes()]

    def describe(self, source: int) -> str:
        """Human words for this transfer from ``source``, used in every error and timeout."""
        name = KIND_NAMES.get(self.kind, self.kind)
        return f"{name} transfer of round {self.round} hop {self.hop} from rank {source}"


@dataclass(frozen=True, slots=True)
class Transfer:
    """A set of blocks on the wire: what ``send_blocks`` takes and ``recv_blocks`` returns.

    ``(kind, round, hop)`` name it; then the ids, versions and byte sizes of its blocks, and
    the payload that holds their bytes back to back.
    """

    kind: int
    round: int
    hop: int
    block_ids: np.ndarray
    versions: np.ndarray
    block_nbytes: np.ndarray
    payload: Payload

    @property
    def spec(self) -> TransferSpec:
        """The spec that receives this transfer (into a new buffer)."""
        return TransferSpec(self.kind, self.round, self.hop)


@dataclass(slots=True)
class CommStats:
    """Counters of one rank since the last ``take``: bytes, messages and seconds.

    ``control_bytes_sent`` (metric gathers to rank 0, not model transfers) is cumulative.
    """

    bytes_sent: int = 0
    bytes_received: int = 0
    messages_sent: int = 0
    messages_received: int = 0
    send_s: float = 0.0
    wait_s: float = 0.0
    recv_s: float = 0.0
    link_emulated_s: float = 0.0
    """Time added by sleeping so that transfers take as long as the emulated links say."""
    control_bytes_sent: int = 0

    def take(self) -> dict[str, float]:
        """Return the counters as a dict and reset them (one call per round)."""
        out = {
            "bytes_sent": self.bytes_sent,
            "bytes_received": self.bytes_received,
            "messages_sent": self.messages_sent,
            "messages_received": self.messages_received,
            "send_s": self.send_s,
            "wait_s": self.wait_s,
            "recv_s": self.recv_s,
            "link_emulated_s": self.link_emulated_s,
        }
        self.bytes_sent = self.bytes_received = 0
        self.messages_sent = self.messages_received = 0
        self.send_s = self.wait_s = self.recv_s = self.link_emulated_s = 0.0
        return out


def pack_header(transfer: Transfer) -> np.ndarray:
    """The int64 header of a transfer; checks the payload is contiguous bytes of those sizes."""
    t = transfer
    n = len(t.block_ids)
    if n > HEADER_MAX_BLOCKS:
        raise ValueError(f"{n} blocks exceed the header limit of {HEADER_MAX_BLOCKS}")
    segs = segments(t.payload)
    if not all(is_byte_buffer(seg) for seg in segs):
        raise TypeError(
            "payload must be a contiguous uint8 array (or uint8 tensor), or a list of them"
        )
    sizes = np.asarray(t.block_nbytes).tolist()  # Python ints: a hop's header costs ~1 us
    seg_sizes = [seg.nbytes for seg in segs]
    total = sum(seg_sizes)
    if sum(sizes) != total:
        raise ValueError(f"payload has {total} bytes; the blocks add up to {sum(sizes)}")
    if len(segs) > 1 and seg_sizes != sizes:
        raise ValueError("a payload of several buffers must have one buffer per block")
    words = [MAGIC, t.kind, t.round, t.hop, n, total]
    for row in zip(np.asarray(t.block_ids).tolist(), np.asarray(t.versions).tolist(), sizes):
        words += row
    return np.array(words, dtype=np.int64)


def parse_header(
    header: np.ndarray, spec: TransferSpec, *, rank: int, what: str
) -> tuple[np.ndarray, int]:
    """Check a received header is the transfer ``spec`` names; returns (rows of
    id/version/nbytes, payload bytes). Raises ProtocolError naming the rank and ``what``."""
    count = len(header)
    if count < HEADER_FIXED or header[0] != MAGIC:
        raise ProtocolError(f"rank {rank}: malformed header ({count} words) in the {what}")
    _magic, h_kind, h_round, h_hop, n, payload_bytes = header[:HEADER_FIXED].tolist()
    named = (h_kind, h_round, h_hop) == (spec.kind, spec.round, spec.hop)
    if not named or count != HEADER_FIXED + 3 * n:
        raise ProtocolError(
            f"rank {rank}: expected the {what}, got kind {h_kind} round {h_round} "
            f"hop {h_hop} with {n} blocks"
        )
    body = header[HEADER_FIXED:].reshape(n, 3)
    if sum(header[HEADER_FIXED + 2 :: 3].tolist()) != payload_bytes:
        raise ProtocolError(f"rank {rank}: block sizes do not add up in the {what}")
    return body, payload_bytes


def segments(payload: Payload) -> list[Payload]:
    """A payload's buffers in order: itself, or the buffers of a list (one per block)."""
    return list(payload) if isinstance(payload, list | tuple) else [payload]


def payload_nbytes(payload: Payload) -> int:
    """Bytes of a payload (one buffer, or a list of them)."""
    return sum(seg.nbytes for seg in segments(payload))


def check_landing(bufs: Sequence[Payload], nbytes: Sequence[int], *, rank: int, what: str) -> None:
    """Check that ``into``'s buffers take the blocks the header announced, one each."""
    sizes = [int(n) for n in nbytes]
    if len(bufs) != len(sizes) or any(
        not is_byte_buffer(b) or b.nbytes != n for b, n in zip(bufs, sizes, strict=False)
    ):
        have = [getattr(b, "nbytes", None) for b in bufs]
        raise ProtocolError(
            f"rank {rank}: the {what} brings blocks of {sizes} bytes; their buffers hold {have}"
        )


def check_posted(
    posted: tuple[list[int], list[int]],
    ids: list[int],
    nbytes: list[int],
    *,
    rank: int,
    what: str,
) -> None:
    """Check that a header names the blocks a receive posted ahead expects (``posted``: ids
    and bytes from ``TransferSpec.posted_blocks``; id -1: one block, not checked)."""
    p_ids, p_nbytes = posted
    if nbytes != p_nbytes or (p_ids != [-1] and ids != p_ids):
        raise ProtocolError(
            f"rank {rank}: expected blocks {p_ids} of {p_nbytes} bytes in the {what}, "
            f"it brings {ids} of {nbytes} bytes"
        )


def is_byte_buffer(buf: object) -> bool:
    """A contiguous uint8 numpy array, or a contiguous 1-D uint8 torch tensor (a staged or
    direct GPU payload, ``payloads.py``); no torch import here."""
    if isinstance(buf, np.ndarray):
        return buf.dtype == np.uint8 and buf.flags.c_contiguous
    return (
        str(getattr(buf, "dtype", "")) == "torch.uint8"
        and getattr(buf, "dim", lambda: 0)() == 1
        and bool(getattr(buf, "is_contiguous", lambda: False)())
    )


def transfer_from(header: np.ndarray, body: np.ndarray, payload: Payload) -> Transfer:
    """A Transfer from a checked header and its payload."""
    return Transfer(
        kind=int(header[1]),
        round=int(header[2]),
        hop=int(header[3]),
        block_ids=body[:, 0].copy(),
        versions=body[:, 1].copy(),
        block_nbytes=body[:, 2].copy(),
        payload=payload,
    )


def stretch(
    link: LinkModel | None, stats: CommStats, src: int, dst: int, nbytes: int, since: float
) -> None:
    """Emulated link: sleep until ``since`` + the hop time of ``nbytes`` from ``src`` to
    ``dst``; the sleep is counted in ``stats.link_emulated_s``, apart from measured times."""
    if link is None:
        return
    hop_s = link.hop_s(src, dst, nbytes)
    if hop_s > link.limit_s:
        raise PeerTimeout(
            f"the emulated link {src}->{dst} would take {hop_s:.4g} s for {nbytes} bytes, longer "
            f"than comm.deadline_s = {link.limit_s:g} s (raise emulate.bandwidth_bps)"
        )
    left = since + hop_s - time.perf_counter()
    if left > 0:
        time.sleep(left)
        stats.link_emulated_s += left


def account_send(
    stats: CommStats, link: LinkModel | None, src: int, dst: int, nbytes: int, since: float
) -> None:
    """Close a send that began at ``since``: its time, the emulated link, its bytes (header +
    payload) and the message; the one place a communicator counts what it sent."""
    stats.send_s += time.perf_counter() - since
    stretch(link, stats, src, dst, nbytes, since)
    stats.bytes_sent += nbytes
    stats.messages_sent += 1


def account_receive(
    stats: CommStats, link: LinkModel | None, src: int, dst: int, nbytes: int, since: float
) -> None:
    """Close a receive whose payload began at ``since`` (the header's arrival): its time, the
    emulated link, its bytes and the message; the receiving side of ``account_send``."""
    stats.recv_s += time.perf_counter() - since
    stretch(link, stats, src, dst, nbytes, since)
    stats.bytes_received += nbytes
    stats.messages_received += 1
