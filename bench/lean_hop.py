"""How fast a hop can be in Python with snake_mpi's checks: the headroom of the hop path.

bench/transfer.py's end-to-end hops (the schemes' ``send_blocks``/``receive_blocks``) run at
0.3 of a bare mpi4py token at 64 KiB and 0.8 at 4 MiB. Is that Python itself, or our layers?
This script times, on 2 ranks, back and forth (one transfer in flight, as on the ring):

- ``bare``: mpi4py ``Send``/``Recv`` of the buffer, each rank forwarding what it received;
- ``lean``: the same bytes as snake_mpi's wire sends them (an int64 header of the transfer
  and its blocks, then the block's buffer), with what a hop must check, in as little Python
  as it takes: persistent requests made once (``Send_init``/``Recv_init``), the header
  written in place, the next receive started right after the own send (posted ahead), every
  received header compared with the transfer expected (magic, kind, round, hop, block id
  and size; a mismatch ends the job naming the rank), the block's version refused if older
  and then taken, the bytes counted, a deadline checked while polling.

Both move a block buffer as snake_mpi allocates it (``blocks.block_empty``). Before timing,
one round trip proves the bytes arrive (a pattern from each side). Modes interleaved per
trial, best of ``--trials``; GB/s = bytes per one-way hop / seconds (GB = 1e9 bytes).

    mpirun -n 2 python -m bench.lean_hop [--max-mib 16] [--trials 5] [--csv lean.csv]

Prints one row per size (64 KiB, 256 KiB, ... up to ``--max-mib``): bytes, bare GB/s,
lean GB/s, lean / bare. ``--wrong-round`` makes rank 0 announce a wrong round in the check
round trip (the receiver must refuse it: the test of the check).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from mpi4py import MPI

from bench.transfer import bare_token, host_buffer  # the same bare reference
from snake_mpi.transport.wire import HEADER_FIXED, KIND_MODEL, MAGIC, Transfer, pack_header

TAG_HEADER, TAG_PAYLOAD = 21, 22
DEADLINE_S = 60.0


class LeanHop:
    """One block of ``nbytes`` going back and forth between ranks 0 and 1 with persistent
    requests: the least Python a checked hop needs."""

    def __init__(self, world: MPI.Comm, nbytes: int) -> None:
        self.world, self.rank, self.peer, self.nbytes = world, world.rank, 1 - world.rank, nbytes
        self.buf = host_buffer(nbytes)  # allocated as a block buffer is, written once
        # snake_mpi's own header (wire.pack_header) of block 1: magic, kind, round, hop,
        # blocks, payload bytes, then (id, version, bytes); round, hop, version change per hop
        one = np.array([1], np.int64)
        first = Transfer(KIND_MODEL, 0, 0, one, np.zeros(1, np.int64), one * nbytes, self.buf)
        self.header = pack_header(first)
        self.header_in = np.zeros(HEADER_FIXED + 3 * 8, np.int64)
        self.version = 0
        self.bytes_counted = 0
        p = self.peer
        self.sends = [
            world.Send_init([self.header, MPI.INT64_T], p, TAG_HEADER),
            world.Send_init([self.buf, MPI.BYTE], p, TAG_PAYLOAD),
        ]
        self.recvs = [
            world.Recv_init([self.header_in, MPI.INT64_T], p, TAG_HEADER),
            world.Recv_init([self.buf, MPI.BYTE], p, TAG_PAYLOAD),
        ]
        self.statuses = [MPI.Status(), MPI.Status()]

    def _wait(self, reqs: list[MPI.Prequest], what: str) -> None:
        deadline = time.perf_counter() + DEADLINE_S
        while not MPI.Request.Testall(reqs, self.statuses):
            if time.perf_counter() > deadline:
                raise TimeoutError(f"rank {self.rank}: waited {DEADLINE_S} s for {what}")

    def post(self) -> None:
        """Start the next receive (posted ahead: the order of hops is known)."""
        MPI.Prequest.Startall(self.recvs)

    def send(self, round_: int, hop: int) -> None:
        h = self.header
        h[2], h[3], h[7] = round_, hop, self.version
        MPI.Prequest.Startall(self.sends)
        self._wait(self.sends, "the hop to be taken")
        self.bytes_counted += h.nbytes + self.nbytes

    def receive(self, round_: int, hop: int) -> None:
        """Complete the posted receive and check it is the transfer expected."""
        self._wait(self.recvs, "a hop")
        words = self.statuses[0].Get_count(MPI.INT64_T)
        h = self.header_in[:words].tolist()
        if h[:6] != [MAGIC, KIND_MODEL, round_, hop, 1, self.nbytes] or h[6::3] != [1]:
            raise RuntimeError(
                f"rank {self.rank}: expected round {round_} hop {hop} of block 1 "
                f"({self.nbytes} bytes), got header {h}"
            )
        if h[8] != self.nbytes or self.statuses[1].Get_count(MPI.BYTE) != self.nbytes:
            raise RuntimeError(f"rank {self.rank}: a block of {h[8]} bytes, {self.nbytes} expected")
        if h[7] < self.version:
            raise RuntimeError(f"rank {self.rank}: older version {h[7]} than {self.version}")
        self.version = h[7] + 1  # the receiver trains it: a newer version goes back
        self.bytes_counted += 8 * len(h) + self.nbytes

    def loop(self, reps: int, r0: int) -> float:
        """Seconds per one-way hop over ``reps`` round trips of rounds ``r0`` ..."""
        world = self.world
        if self.rank == 1:
            self.post()
        world.Barrier()
        t0 = MPI.Wtime()
        for r in range(r0, r0 + reps):
            if self.rank == 0:
                self.send(r, 0)
                self.post()
                self.receive(r, 1)
            else:
                self.receive(r, 0)
                self.send(r, 1)
                if r + 1 < r0 + reps:
                    self.post()
        return (MPI.Wtime() - t0) / (2 * reps)

    def free(self) -> None:
        for req in self.sends + self.recvs:
            req.Free()


def check(hop: LeanHop, *, wrong_round: bool) -> None:
    """One round trip (round 0) that proves the bytes: rank 0's pattern arrives at rank 1,
    rank 1's comes back; and the header bytes were counted."""
    there = np.resize(np.arange(251, dtype=np.uint8), hop.nbytes)
    back = np.resize(np.arange(241, 0, -1, dtype=np.uint8), hop.nbytes)
    ok = True
    if hop.rank == 1:
        hop.post()
    hop.world.Barrier()
    if hop.rank == 0:
        hop.buf[:] = there
        hop.send(1 if wrong_round else 0, 0)
        hop.post()
        hop.receive(0, 1)
        ok = np.array_equal(hop.buf, back)
    else:
        hop.receive(0, 0)
        ok = np.array_equal(hop.buf, there)
        hop.buf[:] = back
        hop.send(0, 1)
    ok &= hop.bytes_counted == 2 * (hop.header.nbytes + hop.nbytes)
    oks = np.zeros(2, dtype=np.uint8)
    hop.world.Allgather([np.array([ok], np.uint8), MPI.BYTE], [oks, MPI.BYTE])
    if not oks.all():
        raise AssertionError(f"rank {hop.rank}: the check round trip failed: ranks ok {oks}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mib", type=float, default=16, help="largest payload in MiB")
    p.add_argument("--trials", type=int, default=5, help="interleaved trials (best kept)")
    p.add_argument("--csv", help="write the rows here too")
    p.add_argument("--wrong-round", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    world = MPI.COMM_WORLD.Dup()
    if world.size != 2:
        raise SystemExit("run on 2 ranks: mpirun -n 2 python -m bench.lean_hop")
    rows = []
    nbytes = 64 << 10
    try:
        while nbytes <= args.max_mib * (1 << 20):
            hop = LeanHop(world, nbytes)
            check(hop, wrong_round=args.wrong_round)
            reps = max(4, min(500, (1 << 29) // nbytes))
            bare_token(world, hop.buf, 4)
            hop.loop(4, 1)
            bare, lean = [], []
            for t in range(args.trials):
                bare.append(bare_token(world, hop.buf, reps))
                lean.append(hop.loop(reps, 10 + t * reps))
            hop.free()
            b, g = nbytes / min(bare) / 1e9, nbytes / min(lean) / 1e9
            rows.append(f"{nbytes},{b:.4f},{g:.4f},{g / b:.4f}")
            if world.rank == 0:
                print(f"{nbytes:>10} bare {b:6.2f} GB/s  lean {g:6.2f} GB/s  lean/bare {g / b:.3f}")
            nbytes *= 4
    except Exception as exc:  # one rank's failure ends the job, naming it (no hang)
        print(f"lean_hop: {exc}", file=sys.stderr, flush=True)
        MPI.COMM_WORLD.Abort(1)
    if world.rank == 0 and args.csv:
        Path(args.csv).write_text(
            "bytes,bare_GBps,lean_GBps,lean_vs_bare\n" + "\n".join(rows) + "\n"
        )


if __name__ == "__main__":
    main()
