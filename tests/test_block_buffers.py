"""Block buffers (``blocks.flat_storage``, ``comm.hop_buffers = "views"``): each block's state
lives in one contiguous buffer that its tensors view, so a hop sends it and a receive lands in
it. Checked by ``data_ptr`` ranges after build, a received hop, ``drop_blocks``,
``release_blocks`` and a dtype move; a hop moves exactly the analytic bytes with no copy; the
training math and the final model are bit-identical to packed hops (``"copy"``)."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO, run_variants
from snake_mpi.blocks import (
    HUGE_MIN_BYTES,
    HUGE_PAGE,
    BlockModel,
    block_buffer,
    block_nbytes,
    block_tensors,
    drop_blocks,
    flat_storage,
    flatten,
    model_hash,
    release_blocks,
    released_blocks,
    wire_tensors,
)
from snake_mpi.config import ModelConfig, TrainConfig
from snake_mpi.models import build_model
from snake_mpi.schemes.common import post_blocks, receive_blocks, send_blocks
from snake_mpi.train import Teacher, train_local
from snake_mpi.transport.hops import Hops
from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.payloads import HopBuffers
from snake_mpi.transport.wire import KIND_MODEL, header_nbytes

TINY = REPO / "tests" / "configs" / "tiny.toml"


def cnn(seed: int = 0) -> BlockModel:
    cfg = ModelConfig(family="vgg11", width=4)  # batch norm: fp32 and int64 in a block
    return build_model(cfg, sample_shape=(3, 32, 32), n_classes=4, seed=seed)


def assert_views(model: BlockModel) -> None:
    """Every block's tensors lie back to back inside its block buffer, in wire order."""
    for b in range(model.n_blocks):
        buf = block_buffer(model, b)
        ts = wire_tensors(model, b)
        if not ts:
            assert buf is None
            continue
        assert (
            buf is not None and buf.dtype == torch.uint8 and buf.numel() == block_nbytes(model, b)
        )
        start = buf.data_ptr()
        at = start
        for t in ts:
            assert t.data_ptr() == at, (b, t.shape)
            at += t.numel() * t.element_size()
        assert at == start + buf.numel()


def test_build_makes_every_block_tensor_a_view_and_keeps_the_values():
    model = cnn()
    before, payload = model_hash(model), flatten(model, range(model.n_blocks))[0]
    params = [id(p) for p in model.parameters()]
    flat_storage(model)
    assert_views(model)
    assert model_hash(model) == before  # same values, same order of hashing
    assert [id(p) for p in model.parameters()] == params  # the same Parameter objects
    # a packed payload and the block buffers hold the same bytes (the wire does not change)
    bufs = [block_buffer(model, b).numpy() for b in range(model.n_blocks)]
    np.testing.assert_array_equal(np.concatenate(bufs), payload)
    assert any(  # batch norm: its int64 counter goes first
        [id(t) for t in block_tensors(model, b)] != [id(t) for t in wire_tensors(model, b)]
        for b in range(model.n_blocks)
    )


def test_a_dtype_move_and_drop_blocks_keep_the_views():
    model = cnn()
    flat_storage(model)
    model.double()
    assert_views(model)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert block_buffer(model, 1).numel() == block_nbytes(model, 1)
    drop_blocks(model, [2])
    assert block_buffer(model, 2) is None and block_nbytes(model, 2) == 0
    assert_views(model)


def test_release_frees_the_block_buffer_and_a_numpy_export_does_not_stop_it():
    model = cnn()
    flat_storage(model)
    model_hash(model)  # makes numpy arrays of the tensors: their storage is then not resizable
    release_blocks(model, [1])
    assert released_blocks(model) == [1]
    assert block_buffer(model, 1).untyped_storage().nbytes() == 0
    assert_views(model)  # the tensors view the (empty) buffer; it comes back with a receive


def test_large_block_buffers_start_on_a_huge_page_also_after_release_and_a_hop():
    """Blocks of HUGE_MIN_BYTES and more get a 2 MiB-aligned buffer (huge pages for MPI's
    copies); a block released and received again gets an aligned one back, and its
    tensors view it. Smaller blocks keep torch's own allocation."""
    big = HUGE_MIN_BYTES // 4 + 256  # floats: a buffer just over 4 MiB, not a multiple of 2 MiB
    model = BlockModel(
        [("stem", nn.Linear(4, 4)), ("big", nn.Linear(big // 256, 256)), ("head", nn.Linear(4, 2))]
    )
    before = model_hash(model)
    flat_storage(model)
    assert model_hash(model) == before
    assert_views(model)
    buf = block_buffer(model, 1)
    assert buf.numel() >= HUGE_MIN_BYTES and buf.data_ptr() % HUGE_PAGE == 0
    assert buf.untyped_storage().nbytes() >= buf.storage_offset() + buf.numel()
    assert block_buffer(model, 0).storage_offset() == 0  # small: as torch allocates it
    flat_storage(model)  # idempotent: the aligned buffer (non-zero storage offset) is kept
    assert block_buffer(model, 1) is buf

    def body(comm):
        m = BlockModel(
            [
                ("stem", nn.Linear(4, 4)),
                ("big", nn.Linear(big // 256, 256)),
                ("head", nn.Linear(4, 2)),
            ]
        )
        if comm.rank == 0:
            with torch.no_grad():
                m.blocks[1].weight.fill_(3.0)
        flat_storage(m)
        ctx = hop_ctx(comm, m, HopBuffers())
        if comm.rank == 0:
            m.versions[[1]] = 5
            send_blocks(ctx, 1, KIND_MODEL, 0, 0, [1])
            return None
        release_blocks(m, [1])
        assert block_buffer(m, 1).untyped_storage().nbytes() == 0
        assert receive_blocks(ctx, 0, KIND_MODEL, 0, 0) == [1]
        return m

    _, got = ThreadWorld(2).run(body, deadline_s=30)
    assert_views(got)
    assert block_buffer(got, 1).data_ptr() % HUGE_PAGE == 0
    assert torch.all(got.blocks[1].weight == 3.0) and released_blocks(got) == []


def hop_ctx(comm, model, hop):
    rec = types.SimpleNamespace(pack_s=0.0)
    rec.add = lambda name, v: setattr(rec, name, getattr(rec, name) + v)
    return types.SimpleNamespace(comm=comm, model=model, hop=hop, hops=Hops(comm, hop), record=rec)


@pytest.mark.parametrize("posted", [False, True])
def test_a_hop_lands_in_the_block_buffers_with_exactly_the_analytic_bytes(posted):
    """Rank 0 sends blocks 1 and 3 (trained: different values); rank 1 receives them straight
    into its own block buffers (same addresses before and after), also a released block."""
    ids = [1, 3]

    def body(comm):
        model = cnn(seed=comm.rank)  # different weights on each rank
        flat_storage(model)
        ctx = hop_ctx(comm, model, HopBuffers())
        if comm.rank == 0:
            model.versions[ids] = 7
            send_blocks(ctx, 1, KIND_MODEL, 0, 0, ids)
            return model_hash(model), comm.stats.take(), ctx.record.pack_s
        release_blocks(model, [3])
        addresses = [block_buffer(model, b).data_ptr() for b in ids[:1]]
        if posted:
            post_blocks(ctx, 0, KIND_MODEL, 0, 0, ids)
        got = receive_blocks(ctx, 0, KIND_MODEL, 0, 0)
        assert got == ids and model.versions[ids].tolist() == [7, 7]
        assert [block_buffer(model, b).data_ptr() for b in ids[:1]] == addresses
        assert released_blocks(model) == []
        assert_views(model)
        return model, comm.stats.take(), ctx.record.pack_s

    (h0, sent, _), (model1, received, _) = ThreadWorld(2).run(body, deadline_s=30)
    sender = cnn(seed=0)
    expect = sum(block_nbytes(sender, b) for b in ids)
    assert sent["bytes_sent"] == received["bytes_received"] == header_nbytes(2) + expect
    assert sent["messages_sent"] == received["messages_received"] == 1
    for b in ids:  # the received blocks are the sender's, byte for byte
        np.testing.assert_array_equal(
            block_buffer(model1, b).numpy(), flatten(sender, [b])[0], err_msg=str(b)
        )
    np.testing.assert_array_equal(  # the others are still rank 1's own
        block_buffer(model1, 0).numpy(), flatten(cnn(seed=1), [0])[0]
    )


def test_a_header_that_differs_from_the_blocks_posted_is_a_protocol_error():
    from snake_mpi.transport.wire import ProtocolError

    def body(comm):
        model = cnn()
        flat_storage(model)
        ctx = hop_ctx(comm, model, HopBuffers())
        if comm.rank == 0:
            send_blocks(ctx, 1, KIND_MODEL, 0, 0, [1, 2])
            return None
        post_blocks(ctx, 0, KIND_MODEL, 0, 0, [1])
        receive_blocks(ctx, 0, KIND_MODEL, 0, 0)

    with pytest.raises(ProtocolError, match=r"expected blocks \[1\]"):
        ThreadWorld(2).run(body, deadline_s=30)


def test_training_on_block_buffers_is_bit_identical_and_updates_only_trainable_blocks():
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    y = torch.randint(0, 4, (64,), generator=torch.Generator().manual_seed(2))
    cfg = TrainConfig(local_epochs=1, batch_size=16, optimizer="adam", lr=0.01)
    out = {}
    for flat in (False, True):
        model = cnn()
        if flat:
            flat_storage(model)
        before = [flatten(model, [b])[0] for b in range(model.n_blocks)]
        train_local(model, [1], x, y, cfg=cfg, generator=torch.Generator().manual_seed(3))
        after = [flatten(model, [b])[0] for b in range(model.n_blocks)]
        changed = [b for b in range(model.n_blocks) if not np.array_equal(before[b], after[b])]
        assert changed == [1]
        if flat:
            assert_views(model)
        out[flat] = model_hash(model)
    assert out[True] == out[False]


def test_the_kd_teacher_copies_the_tensors_not_the_block_buffers():
    model = cnn()
    flat_storage(model)
    teacher = Teacher(model, [1])
    copied = {
        t.untyped_storage().data_ptr(): t
        for m in teacher.copies.values()
        for t in m.state_dict().values()
    }
    held = sum(t.untyped_storage().nbytes() for t in copied.values())
    assert held == teacher.nbytes() == block_nbytes(model, 1)


class Tied(nn.Module):
    def __init__(self, emb: nn.Embedding) -> None:
        super().__init__()
        self.emb = emb

    def forward(self, x):
        return x @ self.emb.weight.T


def test_a_tied_tensor_views_the_buffer_of_the_block_that_owns_it():
    emb = nn.Embedding(10, 4)
    model = BlockModel([("stem", emb), ("mid", nn.Linear(4, 4)), ("head", Tied(emb))])
    flat_storage(model)
    assert_views(model)
    assert block_nbytes(model, 2) == 0 and block_buffer(model, 2) is None
    start = block_buffer(model, 0).data_ptr()
    assert model.blocks[2].emb.weight.data_ptr() == start  # the head sees the stem's bytes


@pytest.mark.parametrize(
    "sets",
    [
        ['scheme="snake"', 'snake.mode="p2p"', 'snake.keep="all"'],
        [
            'model.family="vgg11"',
            "model.width=4",
            "data.sample_shape=[3, 32, 32]",
            "snake.kd.weight=1",
        ],
        ['scheme="snake"', 'snake.mode="p2p"', 'snake.keep="own"', "checkpoint.every=1"],
        ['scheme="snake"', 'snake.mode="cs"', 'snake.transfer="full"'],
        ['scheme="fedavg"'],
        ['scheme="splitfed"'],
    ],
    ids=["p2p", "p2p-vgg-kd", "p2p-own-ckpt", "cs-full", "fedavg", "splitfed"],
)
def test_a_run_gives_the_same_model_and_bytes_with_views_as_with_packed_hops(tmp_path, sets):
    modes = {m: [f'comm.hop_buffers="{m}"'] for m in ("copy", "views")}
    res = run_variants(TINY, 3, tmp_path, modes, *sets)
    c, v = res["copy"], res["views"]
    assert list(c.tables["ranks"]["model_sha256"]) == list(v.tables["ranks"]["model_sha256"])
    np.testing.assert_array_equal(c.rounds["loss"], v.rounds["loss"])
    for k in ("bytes_sent", "bytes_received", "messages_sent", "model_at_rest_bytes"):
        np.testing.assert_array_equal(c.rounds[k], v.rounds[k], err_msg=k)
    assert (v.rounds["pack_s"] >= 0).all()


def test_the_staged_path_copies_the_block_buffers_once_each_way():
    """A GPU rank without CUDA-aware MPI (exercised on the CPU): the block buffers are copied
    into the pinned send buffer and from the pinned receive buffer into the blocks; the
    receiving model's block buffers keep their addresses."""
    from snake_mpi.device import PATH_STAGED

    ids = [0, 2]

    def body(comm):
        model = cnn(seed=comm.rank)
        flat_storage(model)
        ctx = hop_ctx(comm, model, HopBuffers(PATH_STAGED))
        assert not ctx.hop.in_place(model) and ctx.hop.into(model) is None
        if comm.rank == 0:
            send_blocks(ctx, 1, KIND_MODEL, 0, 0, ids)
            return ctx.hop.buffer_bytes()
        addresses = [block_buffer(model, b).data_ptr() for b in ids]
        receive_blocks(ctx, 0, KIND_MODEL, 0, 0)
        assert [block_buffer(model, b).data_ptr() for b in ids] == addresses
        assert_views(model)
        return model

    staged_bytes, model1 = ThreadWorld(2).run(body, deadline_s=30)
    sender = cnn(seed=0)
    assert staged_bytes == sum(block_nbytes(sender, b) for b in ids)  # the send buffer only
    for b in ids:
        np.testing.assert_array_equal(block_buffer(model1, b).numpy(), flatten(sender, [b])[0])
