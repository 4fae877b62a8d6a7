"""What a hop's Python costs per call, with and without hop plans: one process, no peer.

A rank's hop is three calls of the schemes' own functions: post the next receive
(``common.post_blocks``, as Snake does), ``send_blocks`` and ``receive_blocks``. Timed here on
one MPI process sending to itself (``MPI.COMM_SELF``: the transfer is a local copy, so the
figures are the calls' own Python and MPI-call cost, warm), per call, mean over ``--hops``
hops after a warm-up:

- ``plans``: the default (``Hops``' hop plans: header words and persistent requests made once);
- ``general``: hop plans off (``comm.hop_plans = false``): every hop builds its transfer;
- ``lean``: the least a hop needs, the same messages as bare persistent requests with no
  checks or counts (start, test until done, read the header): the floor.

The sender and the receiver use separate ``Hops`` (as two ranks would), so the send is not
refused a plan whose receive is posted. The model: a tiny stem and head and one middle
``nn.Linear`` of ``--kib`` KiB.

    python -m bench.hop_calls [--kib 64] [--hops 20000] [--csv calls.csv]

Prints one row per mode: microseconds per post, send and receive call, and their sum.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
from mpi4py import MPI

from bench.transfer import e2e_ctx, post_hop
from snake_mpi.blocks import block_buffer
from snake_mpi.device import PATH_HOST
from snake_mpi.schemes.common import receive_blocks, send_blocks
from snake_mpi.transport.hops import Hops
from snake_mpi.transport.mpi.comm import Comm
from snake_mpi.transport.payloads import HopBuffers, host_view
from snake_mpi.transport.wire import HEADER_FIXED, HEADER_MAX_BLOCKS, KIND_MODEL

MODES = ("plans", "general", "lean")


def scheme_calls(nbytes: int, hops: int, *, plans: bool) -> dict[str, float]:
    """Mean seconds per post, send and receive call of the schemes' hop functions."""
    comm = Comm(MPI.COMM_SELF, deadline_s=60)
    recv_hops = Hops(comm, HopBuffers(PATH_HOST), plans=plans)
    send_hops = Hops(comm, HopBuffers(PATH_HOST), plans=plans)
    ctx = e2e_ctx(comm, recv_hops, nbytes, 1, flat=True)
    sender = SimpleNamespace(**vars(ctx))
    sender.hops = send_hops
    ids = ctx.model.middle_ids
    pc = time.perf_counter
    acc = dict.fromkeys(("post", "send", "receive"), 0.0)
    warm = min(200, hops)
    for r in range(warm + hops):
        a = pc()
        post_hop(ctx, 0, r, 0, ids)
        b = pc()
        ctx.model.versions[ids] = r
        send_blocks(sender, 0, KIND_MODEL, r, 0, ids)
        c = pc()
        got = receive_blocks(ctx, 0, KIND_MODEL, r, 0)
        d = pc()
        if got != ids:
            raise AssertionError(f"received blocks {got}, sent {ids}")
        if r >= warm:
            acc["post"] += b - a
            acc["send"] += c - b
            acc["receive"] += d - c
    counted = comm.stats.take()
    if counted["messages_received"] != warm + hops:
        raise AssertionError(f"counted {counted['messages_received']} transfers")
    recv_hops.free()
    send_hops.free()
    return {k: v / hops for k, v in acc.items()}


def lean_calls(nbytes: int, hops: int) -> dict[str, float]:
    """The floor: the same two messages by bare persistent requests, no checks, no counts."""
    comm = Comm(MPI.COMM_SELF)
    ctx = e2e_ctx(comm, Hops(comm, HopBuffers(PATH_HOST)), nbytes, 1, flat=True)
    view = host_view(block_buffer(ctx.model, ctx.model.middle_ids[0]))
    c = MPI.COMM_SELF
    header = np.zeros(HEADER_FIXED + 3, np.int64)
    header_in = np.zeros(HEADER_FIXED + 3 * HEADER_MAX_BLOCKS, np.int64)
    sends = [c.Send_init([header, MPI.INT64_T], 0, 1), c.Send_init([view, MPI.BYTE], 0, 2)]
    recvs = [c.Recv_init([header_in, MPI.INT64_T], 0, 1), c.Recv_init([view, MPI.BYTE], 0, 2)]
    statuses = [MPI.Status(), MPI.Status()]
    pc = time.perf_counter
    acc = dict.fromkeys(("post", "send", "receive"), 0.0)
    warm = min(200, hops)
    for r in range(warm + hops):
        a = pc()
        MPI.Prequest.Startall(recvs)
        b = pc()
        header[2] = r
        MPI.Prequest.Startall(sends)
        while not MPI.Request.Testall(sends):
            pass
        d0 = pc()
        while not MPI.Request.Testall(recvs, statuses):
            pass
        header_in[: HEADER_FIXED + 3].tolist()
        d = pc()
        if r >= warm:
            acc["post"] += b - a
            acc["send"] += d0 - b
            acc["receive"] += d - d0
    for req in sends + recvs:
        req.Free()
    return {k: v / hops for k, v in acc.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kib", type=int, default=64, help="the middle block's size in KiB")
    p.add_argument("--hops", type=int, default=20000, help="timed hops per mode")
    p.add_argument("--csv", help="write the rows here too")
    args = p.parse_args()
    nbytes = args.kib << 10
    rows = ["mode,post_us,send_us,receive_us,total_us"]
    print(f"# one process, COMM_SELF, one {args.kib} KiB block, {args.hops} hops; us per call")
    print(f"{'mode':>8} {'post':>8} {'send':>8} {'receive':>8} {'total':>8}")
    for mode in MODES:
        if mode == "lean":
            t = lean_calls(nbytes, args.hops)
        else:
            t = scheme_calls(nbytes, args.hops, plans=mode == "plans")
        us = [1e6 * t[k] for k in ("post", "send", "receive")]
        print(f"{mode:>8} " + " ".join(f"{u:8.2f}" for u in us) + f" {sum(us):8.2f}", flush=True)
        rows.append(f"{mode}," + ",".join(f"{u:.3f}" for u in us) + f",{sum(us):.3f}")
    if args.csv:
        Path(args.csv).write_text("\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
