"""Two ranks: hops through ``Hops``' plans (persistent requests: the path Snake's ring takes)
move the blocks' bytes and versions, count exactly what the general path counts, speak the
same wire as the general path both ways, are made once and reused, are made anew when the
block buffers change (``release_blocks``), and are cancelled by ``Hops.cancel``. Prints
``ok,<case>,<bytes received>,<messages received>,<detail>`` lines from rank 1.

``--wrong-round``: rank 0 sends round 7 where rank 1 posted round 6 (must end the job,
naming rank 1). ``--pipelined N``: payload messages of N bytes and more go as swapped halves
(``Comm.use_pipelined_copy``; one rank saying its hops are not host memory turns it off for
all first: ``pipelined,<off>,<on>,<same-host peers>,<swapped messages in rank 1's plan>``)."""

import sys
from collections import defaultdict
from types import SimpleNamespace

import numpy as np
import torch
from torch import nn

from snake_mpi.blocks import BlockModel, block_buffer, flat_storage, release_blocks
from snake_mpi.device import PATH_HOST
from snake_mpi.schemes.common import post_blocks, receive_blocks, receive_transfer, send_blocks
from snake_mpi.transport.hops import Hops
from snake_mpi.transport.mpi.comm import Comm
from snake_mpi.transport.mpi.world import install_abort_on_error
from snake_mpi.transport.payloads import HopBuffers, host_view
from snake_mpi.transport.wire import KIND_MODEL, header_nbytes

install_abort_on_error()
comm = Comm.world(deadline_s=30)
peer = 1 - comm.rank
IDS = [1, 2]


class Record:
    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)

    def add(self, name: str, value: float) -> None:
        self.sums[name] += value


def model() -> BlockModel:
    torch.manual_seed(0)
    m = BlockModel(
        [
            ("stem", nn.Linear(3, 4)),
            ("a", nn.Linear(64, 96)),  # 24,960 bytes
            ("b", nn.Sequential(nn.Linear(96, 32), nn.LayerNorm(32))),  # 12,672 bytes
            ("head", nn.Linear(32, 2)),
        ]
    )
    flat_storage(m)
    return m


PIPELINED = int(sys.argv[sys.argv.index("--pipelined") + 1]) if "--pipelined" in sys.argv else 0
if PIPELINED:
    off = comm.use_pipelined_copy(PIPELINED, host=comm.rank == 0)  # rank 1: a GPU path
    on = comm.use_pipelined_copy(PIPELINED, host=True)
    pipelined = f"pipelined,{off},{on},{len(comm.same_host)}"

ctx = SimpleNamespace(
    model=model(), comm=comm, hops=Hops(comm, HopBuffers(PATH_HOST)), record=Record()
)
TOTAL = sum(block_buffer(ctx.model, b).numel() for b in IDS)
HOP_BYTES = header_nbytes(len(IDS)) + TOTAL


def blocks_bytes() -> np.ndarray:
    return np.concatenate([host_view(block_buffer(ctx.model, b)) for b in IDS])


def pattern(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, TOTAL, dtype=np.uint8)


def plan_of(peer_: int):
    kept = ctx.hops._plans.get((id(ctx.model), peer_, tuple(IDS)))
    return None if kept is None else kept[1]


def views_inside() -> bool:
    """Every tensor of blocks IDS views its block buffer (data_ptr ranges)."""
    for b in IDS:
        buf = block_buffer(ctx.model, b)
        lo, hi = buf.data_ptr(), buf.data_ptr() + buf.numel()
        for t in ctx.model.blocks[b].state_dict(keep_vars=True).values():
            end = t.data_ptr() + t.numel() * t.element_size()
            if not lo <= t.data_ptr() < end <= hi:
                return False
    return True


def post_planned(round_: int) -> None:
    """Rank 1 posts the receive of round ``round_``'s hop; a plan must post it."""
    post_blocks(ctx, 0, KIND_MODEL, round_, 0, IDS)
    assert (0, KIND_MODEL, round_, 0) in ctx.hops._posted, "no plan posted"


def hop(round_: int, seed: int, *, planned_recv: bool = True, case: str, detail=str) -> None:
    """Rank 0 sends blocks IDS (versions = round_ + 1) in round ``round_``; rank 1 posts the
    receive ahead by a plan (``planned_recv``) or not, receives and checks bytes, versions,
    and the counts (printed)."""
    if comm.rank == 1 and planned_recv:
        post_planned(round_)
    comm.barrier()
    if comm.rank == 0:
        off = 0
        for b in IDS:
            view = host_view(block_buffer(ctx.model, b))
            view[:] = pattern(seed)[off : off + view.nbytes]
            off += view.nbytes
        ctx.model.versions[IDS] = round_ + 1
        send_blocks(ctx, 1, KIND_MODEL, round_, 0, IDS)
    else:
        comm.stats.take()
        got_ids = receive_blocks(ctx, 0, KIND_MODEL, round_, 0)
        st = comm.stats.take()
        assert got_ids == IDS, got_ids
        assert ctx.model.versions[IDS].tolist() == [round_ + 1] * len(IDS), ctx.model.versions
        assert np.array_equal(blocks_bytes(), pattern(seed)), case
        assert views_inside(), case
        print(f"ok,{case},{st['bytes_received']},{st['messages_received']},{detail()}", flush=True)
    comm.barrier()


if "--wrong-round" in sys.argv:
    if comm.rank == 1:
        post_planned(6)
        receive_blocks(ctx, 0, KIND_MODEL, 6, 0)
    else:
        send_blocks(ctx, 1, KIND_MODEL, 7, 0, IDS)
    comm.barrier()
    sys.exit(0)

# 1. a plan on both sides; then the same plans again (made once)
hop(0, 10, case="plan")
first = plan_of(peer)
hop(1, 11, case="reused", detail=lambda: str(plan_of(0) is first and first is not None))
assert first is not None and plan_of(peer) is first, f"rank {comm.rank}: the plan was not kept"
if PIPELINED and comm.rank == 1:
    print(f"{pipelined},{len(first._dtypes)}", flush=True)

# 1b. a planned receive completed by receive_transfer (as an update to average is received)
if comm.rank == 1:
    post_planned(50)
comm.barrier()
if comm.rank == 0:
    ctx.model.versions[IDS] = 51
    send_blocks(ctx, 1, KIND_MODEL, 50, 0, IDS)
else:
    comm.stats.take()
    t = receive_transfer(ctx, 0, KIND_MODEL, 50, 0)
    st = comm.stats.take()
    landed = all(a is b for a, b in zip(t.payload, plan_of(0).bufs, strict=True))
    ok = t.block_ids.tolist() == IDS and t.versions.tolist() == [51, 51] and landed
    print(f"ok,receive_transfer,{st['bytes_received']},{st['messages_received']},{ok}", flush=True)
comm.barrier()

# 2. the general path on one side, a plan on the other: the same wire
ctx.hops.plans = comm.rank == 1  # rank 0 sends by the general path
hop(2, 12, case="general-to-plan")
ctx.hops.plans = comm.rank == 0  # rank 1 receives by the general path (no receive ahead)
hop(3, 13, planned_recv=False, case="plan-to-general")
ctx.hops.plans = True

# 3. the receiver frees the blocks (snake.keep = "own"): a new plan over new buffers
before = plan_of(peer)
if comm.rank == 1:
    release_blocks(ctx.model, IDS)
hop(4, 14, case="released", detail=lambda: str(plan_of(0) is not before))

# 4. a posted plan cancelled (a checkpoint stop): the next hop is not taken by it
if comm.rank == 1:
    post_planned(99)
    ctx.hops.cancel()
    assert not plan_of(0).active
hop(5, 15, case="after-cancel")
ctx.hops.free()
comm.barrier()
