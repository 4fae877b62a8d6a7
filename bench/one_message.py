"""How the blocks of a hop go to MPI: one message per block, one derived datatype over all
blocks, or one message per block with its halves swapped (``comm.pipelined_min_bytes``).

A segment's blocks live in separate block buffers (``blocks.block_empty``), so a hop of K
blocks is K payload messages. MPI can send them as one instead: an ``hindexed`` datatype whose
displacements are the buffers' addresses, sent from ``MPI.BOTTOM``. This script times both on
2 ranks, back and forth (one transfer in flight, as on the ring), with persistent requests and
no other Python, so the difference is MPI's alone:

- ``messages``: one ``Send_init``/``Recv_init`` per block buffer, started together (what
  snake_mpi sends below ``comm.pipelined_min_bytes``);
- ``datatype``: one ``Send_init``/``Recv_init`` of the derived datatype (the alternative issue
  15 names for several blocks);
- ``swapped``: one message per block as ``comm.halves_swapped`` (the same bytes, its second
  half first: not contiguous, so Open MPI's shared-memory transport moves it by its
  copy-in/copy-out pipeline, sender and receiver copying at once, instead of the receiver's
  single copy, CMA): what snake_mpi sends from ``comm.pipelined_min_bytes`` between ranks on
  one host. ``--blocks 1`` compares it with one plain message.

Before timing, one round trip per mode proves the bytes: every block carries its own pattern
from rank 0 to rank 1 and another one back (a wrong byte ends the job with exit 1, naming the
rank). Modes interleaved per trial, best of ``--trials``; GB/s = bytes of all K blocks per
one-way hop / seconds (GB = 1e9 bytes).

    mpirun -n 2 python -m bench.one_message [--blocks 4] [--max-mib 64] [--trials 5]
        [--csv one_message.csv]

Prints one row per hop size (64 KiB, 256 KiB, ... up to ``--max-mib``, split evenly over the
blocks): bytes, GB/s of each mode, datatype / messages and swapped / messages.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from bench.transfer import host_buffer  # buffers allocated as block buffers are
from snake_mpi.transport.mpi.comm import halves_swapped

TAG_MESSAGES, TAG_DATATYPE, TAG_SWAPPED = 31, 32, 33
DEADLINE_S = 60.0


class Hop:
    """K block buffers going back and forth between ranks 0 and 1, in both shapes."""

    def __init__(self, world: MPI.Comm, nbytes: int, blocks: int) -> None:
        self.world, self.rank, peer = world, world.rank, 1 - world.rank
        self.bufs = [host_buffer(nbytes // blocks) for _ in range(blocks)]
        self.nbytes = sum(b.nbytes for b in self.bufs)
        self.dtype = MPI.BYTE.Create_hindexed(
            [b.nbytes for b in self.bufs], [MPI.Get_address(b) for b in self.bufs]
        ).Commit()
        whole = [MPI.BOTTOM, 1, self.dtype]
        self.swapped = [halves_swapped(b) for b in self.bufs]
        halves = [[MPI.BOTTOM, 1, t] for t in self.swapped]
        self.reqs = {
            "messages": (
                [world.Send_init([b, MPI.BYTE], peer, TAG_MESSAGES) for b in self.bufs],
                [world.Recv_init([b, MPI.BYTE], peer, TAG_MESSAGES) for b in self.bufs],
            ),
            "datatype": (
                [world.Send_init(whole, peer, TAG_DATATYPE)],
                [world.Recv_init(whole, peer, TAG_DATATYPE)],
            ),
            "swapped": (
                [world.Send_init(h, peer, TAG_SWAPPED) for h in halves],
                [world.Recv_init(h, peer, TAG_SWAPPED) for h in halves],
            ),
        }

    def _go(self, reqs: list[MPI.Prequest], what: str) -> None:
        MPI.Prequest.Startall(reqs)
        deadline = time.perf_counter() + DEADLINE_S
        while not MPI.Request.Testall(reqs):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"rank {self.rank}: waited {DEADLINE_S} s for {what}")

    def loop(self, mode: str, reps: int) -> float:
        """Seconds per one-way hop over ``reps`` round trips."""
        sends, recvs = self.reqs[mode]
        self.world.Barrier()
        t0 = MPI.Wtime()
        for _ in range(reps):
            first, then = (sends, recvs) if self.rank == 0 else (recvs, sends)
            self._go(first, f"the {mode} hop")
            self._go(then, f"the {mode} hop")
        return (MPI.Wtime() - t0) / (2 * reps)

    def check(self, mode: str, *, wrong_byte: bool = False) -> None:
        """One round trip that proves every block's bytes arrive in its own buffer: a pattern
        of its own per block to rank 1, another back to rank 0 (``wrong_byte``: rank 0 spoils
        one byte of the last block before sending, the test of the check)."""
        there = [
            np.resize(np.arange(k, 251 + k, dtype=np.uint8), b.nbytes)
            for k, b in enumerate(self.bufs)
        ]
        back = [255 - t for t in there]
        sends, recvs = self.reqs[mode]
        self.world.Barrier()
        if self.rank == 0:
            for b, t in zip(self.bufs, there, strict=True):
                b[:] = t
            self.bufs[-1][-1] ^= 0xFF if wrong_byte else 0
            self._go(sends, "the check")
            self._go(recvs, "the check")
            got, want = self.bufs, back
        else:
            self._go(recvs, "the check")
            got, want = [b.copy() for b in self.bufs], there
            for b, t in zip(self.bufs, back, strict=True):
                b[:] = t
            self._go(sends, "the check")
        if not all(np.array_equal(g, w) for g, w in zip(got, want, strict=True)):
            raise AssertionError(f"rank {self.rank}: wrong bytes in the {mode} hop")

    def free(self) -> None:
        for sends, recvs in self.reqs.values():
            for req in sends + recvs:
                req.Free()
        for dtype in [self.dtype, *self.swapped]:
            dtype.Free()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--blocks", type=int, default=4, help="blocks per hop (K)")
    p.add_argument("--max-mib", type=float, default=64, help="largest hop in MiB")
    p.add_argument("--trials", type=int, default=5, help="interleaved trials (best kept)")
    p.add_argument("--csv", help="write the rows here too")
    p.add_argument("--wrong-byte", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    world = MPI.COMM_WORLD.Dup()
    if world.size != 2:
        raise SystemExit("run on 2 ranks: mpirun -n 2 python -m bench.one_message")
    rows = []
    nbytes = 64 << 10
    try:
        while nbytes <= args.max_mib * (1 << 20):
            hop = Hop(world, nbytes, args.blocks)
            for mode in hop.reqs:
                hop.check(mode, wrong_byte=args.wrong_byte)
                hop.loop(mode, 4)  # warm-up
            reps = max(4, min(1000, (1 << 29) // nbytes))
            best = {mode: float("inf") for mode in hop.reqs}
            for _ in range(args.trials):
                for mode in hop.reqs:
                    best[mode] = min(best[mode], hop.loop(mode, reps))
            hop.free()
            m, d, w = (hop.nbytes / best[k] / 1e9 for k in ("messages", "datatype", "swapped"))
            rows.append(
                f"{hop.nbytes},{args.blocks},{m:.4f},{d:.4f},{w:.4f},{d / m:.4f},{w / m:.4f}"
            )
            if world.rank == 0:
                print(
                    f"{hop.nbytes:>10} x{args.blocks}  GB/s messages {m:6.2f}  datatype {d:6.2f}"
                    f"  swapped {w:6.2f}   datatype/messages {d / m:.3f}  swapped/messages "
                    f"{w / m:.3f}",
                    flush=True,
                )
            nbytes *= 4
    except Exception as exc:  # one rank's failure ends the job, naming it (no hang)
        print(f"one_message: {exc}", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)
    if world.rank == 0 and args.csv:
        Path(args.csv).write_text(
            "bytes,blocks,messages_GBps,datatype_GBps,swapped_GBps,datatype_vs_messages,"
            "swapped_vs_messages\n" + "\n".join(rows) + "\n"
        )


if __name__ == "__main__":
    main()
