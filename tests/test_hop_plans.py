"""Hop plans (``HopBuffers.plan``, ``comm.HopPlan``): the ring's hops with header words and
persistent MPI requests made once over the block buffers. When a plan is made, kept and made
anew (no MPI: a stand-in communicator), and under MPI that planned hops move and count exactly
what the general path does, interoperate with it, and refuse a wrong header naming the rank."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn

from conftest import REPO, run_mpi
from snake_mpi.blocks import BlockModel, block_buffer, drop_blocks, flat_storage, release_blocks
from snake_mpi.device import PATH_HOST, PATH_STAGED
from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.payloads import HopBuffers
from snake_mpi.transport.wire import header_nbytes

PROGRAM = str(REPO / "tests" / "mpi_programs" / "hop_plans.py")


class FakePlan:
    def __init__(self, peer, ids, bufs):
        self.peer, self.ids, self.bufs = peer, list(ids), list(bufs)
        self.active = False
        self.freed = False

    def free(self):
        self.freed = True


class FakeComm:
    """Makes a FakePlan for every ``hop_plan`` call and keeps them all."""

    def __init__(self):
        self.made: list[FakePlan] = []

    def hop_plan(self, peer, ids, bufs):
        self.made.append(FakePlan(peer, ids, bufs))
        return self.made[-1]


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


def test_a_plan_is_made_once_and_made_anew_when_the_block_buffers_change():
    model, comm, hop = flat_model(), FakeComm(), HopBuffers(PATH_HOST)
    p = hop.plan(comm, model, 1, [1, 2])
    assert p is comm.made[0]
    assert [b.ctypes.data for b in p.bufs] == [block_buffer(model, b).data_ptr() for b in (1, 2)]
    assert hop.plan(comm, model, 1, [1, 2]) is p  # kept
    assert hop.plan(comm, model, 0, [1, 2]) is not p  # another peer: another plan
    assert len(comm.made) == 2
    release_blocks(model, [1])  # snake.keep = "own": block 1's bytes are gone
    with pytest.raises(ValueError, match="released"):
        hop.plan(comm, model, 1, [1, 2])  # a send of a freed block is an error
    q = hop.plan(comm, model, 1, [1, 2], receive=True)  # a receive gives it bytes back
    assert q is not p and p.freed and comm.made[0].freed and comm.made[1].freed  # stale: freed
    assert q.bufs[0].ctypes.data == block_buffer(model, 1).data_ptr()
    assert hop.plan(comm, model, 1, [1, 2]) is q


def test_a_posted_plan_is_never_handed_out_again_nor_freed():
    model, comm, hop = flat_model(), FakeComm(), HopBuffers(PATH_HOST)
    p = hop.plan(comm, model, 1, [1])
    p.active = True  # its receive is posted
    assert hop.plan(comm, model, 1, [1]) is None  # the general path serves meanwhile
    flat_storage(model)  # idempotent, but the layout generation moves
    assert hop.plan(comm, model, 1, [1]) is None and not p.freed
    p.active = False
    assert hop.plan(comm, model, 1, [1]) is not p and p.freed


def test_a_plan_over_one_models_buffers_is_never_handed_out_for_another():
    model, comm, hop = flat_model(), FakeComm(), HopBuffers(PATH_HOST)
    twin = copy.deepcopy(model)  # the same layout generation, other buffers
    p = hop.plan(comm, model, 1, [1])
    q = hop.plan(comm, twin, 1, [1])
    assert q is not p
    assert q.bufs[0].ctypes.data == block_buffer(twin, 1).data_ptr() != p.bufs[0].ctypes.data
    other = flat_model()
    assert other.layout_gen != model.layout_gen  # one counter for every model


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
    assert HopBuffers(PATH_STAGED).plan(comm, model, 1, [1]) is None  # a GPU path
    off = HopBuffers(PATH_HOST)
    off.plans = False
    assert off.plan(comm, model, 1, [1]) is None
    torch.manual_seed(0)
    packed = BlockModel([("s", nn.Linear(2, 2)), ("a", nn.Linear(2, 2)), ("h", nn.Linear(2, 2))])
    assert HopBuffers(PATH_HOST).plan(comm, packed, 1, [1]) is None  # not flat: copied
    assert comm.made == []
    local = ThreadWorld(2).comm(0)
    assert HopBuffers(PATH_HOST).plan(local, model, 1, [1]) is None  # threads copy anyway


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
        "recv_blocks",
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
    assert detail["recv_blocks"] == "True"  # Comm.recv_blocks completes a planned receive
    assert detail["released"] == "True"  # and made anew over the re-allocated buffers


@pytest.mark.mpi
def test_a_planned_receive_refuses_a_header_of_another_round_naming_the_rank():
    job = run_mpi(2, [sys.executable, PROGRAM, "--wrong-round"], timeout_s=90)
    assert job.returncode != 0
    assert "rank 1 of 2" in job.stderr
    assert "expected the model transfer of round 6 hop 0 from rank 0, got kind 1 round 7" in (
        job.stderr
    )
