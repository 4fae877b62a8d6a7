"""Hop plans (``Hops``, ``mpi.hop_plan.HopPlan``): the ring's hops with header words and
persistent MPI requests made once over the block buffers. When ``Hops`` makes a plan, keeps
it, makes it anew, posts and receives by it (no MPI: a stand-in communicator), and under MPI
that planned hops move and count exactly what the general path does, interoperate with it,
and refuse a wrong header naming the rank."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from conftest import REPO, run_mpi
from snake_mpi.blocks import BlockModel, block_buffer, drop_blocks, flat_storage, release_blocks
from snake_mpi.device import PATH_HOST, PATH_STAGED
from snake_mpi.transport.hops import Hops
from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.payloads import HopBuffers
from snake_mpi.transport.wire import header_nbytes

PROGRAM = str(REPO / "tests" / "mpi_programs" / "hop_plans.py")


class FakePlan:
    """Posts and receives nothing; a receive brings versions 3."""

    def __init__(self, peer, ids, bufs):
        self.peer, self.ids, self.bufs = peer, list(ids), list(bufs)
        self.sizes = [b.nbytes for b in self.bufs]
        self.active = False
        self.freed = False
        self.posted = None
        self.cancelled = 0

    def post(self, kind, round_, hop):
        self.posted = (kind, round_, hop)

    def receive(self, kind, round_, hop):
        assert self.posted == (kind, round_, hop)
        self.posted = None
        return [3] * len(self.ids)

    def cancel(self):
        self.posted = None
        self.cancelled += 1

    def free(self):
        self.freed = True


class FakeComm:
    """Makes a FakePlan for every ``hop_plan`` call and keeps them all; keeps what the general
    path would post."""

    rank = 0

    def __init__(self):
        self.made: list[FakePlan] = []
        self.general_posts = []
        self.cancelled = 0

    def hop_plan(self, peer, ids, bufs):
        self.made.append(FakePlan(peer, ids, bufs))
        return self.made[-1]

    def post(self, source, spec):
        self.general_posts.append((source, spec))

    def cancel(self):
        self.cancelled += 1


def flat_model() -> BlockModel:
    torch.manual_seed(0)
    m = BlockModel(
        [
            ("stem", nn.Linear(2, 3)),
            ("a", nn.Linear(3, 5)),
            ("b", nn.Linear(5, 4)),
            ("head", nn.Linear(4, 2)),
        ]
    )
    flat_storage(m)
    return m


def hops_of(comm, path: str = PATH_HOST) -> Hops:
    return Hops(comm, HopBuffers(path))


def test_a_plan_is_made_once_and_made_anew_when_the_block_buffers_change():
    model, comm = flat_model(), FakeComm()
    hops = hops_of(comm)
    p = hops._plan(model, 1, [1, 2])
    assert p is comm.made[0]
    assert [b.ctypes.data for b in p.bufs] == [block_buffer(model, b).data_ptr() for b in (1, 2)]
    assert hops._plan(model, 1, [1, 2]) is p  # kept
    assert hops._plan(model, 0, [1, 2]) is not p  # another peer: another plan
    assert len(comm.made) == 2
    release_blocks(model, [1])  # snake.keep = "own": block 1's bytes are gone
    with pytest.raises(ValueError, match="released"):
        hops._plan(model, 1, [1, 2])  # a send of a freed block is an error
    q = hops._plan(model, 1, [1, 2], receive=True)  # a receive gives it bytes back
    assert q is not p and p.freed and comm.made[0].freed and comm.made[1].freed  # stale: freed
    assert q.bufs[0].ctypes.data == block_buffer(model, 1).data_ptr()
    assert hops._plan(model, 1, [1, 2]) is q
    hops.free()
    assert q.freed


def test_a_posted_plan_is_never_handed_out_again_nor_freed():
    model, comm = flat_model(), FakeComm()
    hops = hops_of(comm)
    p = hops._plan(model, 1, [1])
    p.active = True  # its receive is posted
    assert hops._plan(model, 1, [1]) is None  # the general path serves meanwhile
    flat_storage(model)  # idempotent, but the layout generation moves
    assert hops._plan(model, 1, [1]) is None and not p.freed
    p.active = False
    assert hops._plan(model, 1, [1]) is not p and p.freed


def test_a_plan_over_one_models_buffers_is_never_handed_out_for_another():
    model, comm = flat_model(), FakeComm()
    hops = hops_of(comm)
    twin = copy.deepcopy(model)  # the same layout generation, other buffers
    p = hops._plan(model, 1, [1])
    q = hops._plan(twin, 1, [1])
    assert q is not p
    assert q.bufs[0].ctypes.data == block_buffer(twin, 1).data_ptr() != p.bufs[0].ctypes.data
    other = flat_model()
    assert other.layout_gen != model.layout_gen  # one counter for every model


def test_hops_post_by_a_plan_and_receive_by_the_plan_that_posted():
    """``post`` into the model goes by the plan, ``receive`` completes that plan (the
    blocks are in their buffers: nothing to copy); ``cancel`` cancels a posted one."""
    model, comm = flat_model(), FakeComm()
    hops = hops_of(comm)
    hops.post(model, 1, 1, 0, 0, [1, 2])
    (p,) = comm.made
    assert p.posted == (1, 0, 0) and comm.general_posts == []
    model.versions[:] = 0
    ids, unpack_s = hops.receive(model, 1, 1, 0, 0)
    assert (ids, unpack_s, model.versions[[1, 2]].tolist()) == ([1, 2], 0.0, [3, 3])
    hops.post(model, 1, 1, 0, 1, [1, 2])
    hops.cancel()
    assert p.posted is None and p.cancelled == 1 and comm.cancelled == 1
    hops.post(model, 1, 1, 0, 2, [1, 2], into_model=False)  # not into the model: no plan
    assert len(comm.general_posts) == 1 and comm.general_posts[0][1].into is None


def test_a_hop_that_brings_older_versions_is_refused():
    model, comm = flat_model(), FakeComm()
    hops = hops_of(comm)
    hops.post(model, 1, 1, 0, 0, [1, 2])
    model.versions[[1, 2]] = 9
    with pytest.raises(ValueError, match=r"older versions of blocks \[1, 2\]"):
        hops.receive(model, 1, 1, 0, 0)


@pytest.mark.parametrize(
    "change",
    ["flat_storage", "release", "drop", "dtype"],
)
def test_every_change_of_the_block_buffers_moves_the_layout_generation(change):
    model = flat_model()
    gen = model.layout_gen
    if change == "flat_storage":
        flat_storage(model)
    elif change == "release":
        release_blocks(model, [2])
        gen2 = model.layout_gen
        block_buffer(model, 2, allocate=True)  # received again: a new buffer
        assert model.layout_gen > gen2
    elif change == "drop":
        drop_blocks(model, [2])
    else:
        model.to(torch.float64)
    assert model.layout_gen > gen


def test_no_plan_where_hops_are_not_in_place_on_the_host_or_plans_are_off():
    comm = FakeComm()
    model = flat_model()
    assert hops_of(comm, PATH_STAGED)._plan(model, 1, [1]) is None  # a GPU path
    off = Hops(comm, HopBuffers(PATH_HOST), plans=False)
    assert off._plan(model, 1, [1]) is None
    torch.manual_seed(0)
    packed = BlockModel([("s", nn.Linear(2, 2)), ("a", nn.Linear(2, 2)), ("h", nn.Linear(2, 2))])
    assert hops_of(comm)._plan(packed, 1, [1]) is None  # not flat: copied
    assert comm.made == []
    local = ThreadWorld(2).comm(0)
    assert hops_of(local)._plan(model, 1, [1]) is None  # threads copy anyway


@pytest.mark.mpi
@pytest.mark.parametrize("pipelined", [0, 16_000])
def test_planned_hops_move_and_count_what_the_general_path_does_and_interoperate(pipelined):
    """Also with block a (24,960 bytes), not b (12,672), above ``comm.pipelined_min_bytes``:
    its messages go as swapped halves on both paths; a path that sent or received it plainly
    would land its halves swapped, and the bytes are compared after every hop."""
    args = ["--pipelined", str(pipelined)] if pipelined else []
    job = run_mpi(2, [sys.executable, PROGRAM, *args], timeout_s=90)
    assert job.returncode == 0, job.output
    if pipelined:  # off while one rank's hops are not host memory; then on, for block a only
        # (rank 1 only receives: its plan has one datatype, block a's receive)
        assert "pipelined,False,True,1,1" in job.stdout.split(), job.output
    rows = [line.split(",") for line in job.stdout.split() if line.startswith("ok,")]
    cases = [r[1] for r in rows]
    assert cases == [
        "plan",
        "reused",
        "receive_transfer",
        "general-to-plan",
        "plan-to-general",
        "released",
        "after-cancel",
    ], job.output
    # blocks a (Linear 64->96: 6,240 floats) and b (Linear 96->32 + LayerNorm 32: 3,168
    # floats): 37,632 bytes, and one header of 2 blocks
    for _, case, nbytes, messages, _ in rows:
        assert int(nbytes) == 4 * (6240 + 3168) + header_nbytes(2), case
        assert int(messages) == 1, case
    detail = {r[1]: r[4] for r in rows}
    assert detail["reused"] == "True"  # the receiver's plan was kept
    assert detail["receive_transfer"] == "True"  # a planned receive, into its block buffers
    assert detail["released"] == "True"  # and made anew over the re-allocated buffers


@pytest.mark.mpi
def test_a_planned_receive_refuses_a_header_of_another_round_naming_the_rank():
    job = run_mpi(2, [sys.executable, PROGRAM, "--wrong-round"], timeout_s=90)
    assert job.returncode != 0
    assert "rank 1 of 2" in job.stderr
    assert "expected the model transfer of round 6 hop 0 from rank 0, got kind 1 round 7" in (
        job.stderr
    )
