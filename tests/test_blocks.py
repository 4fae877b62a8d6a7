"""Blocks: bit-exact flatten/unflatten, freezing, training-state accounting from real tensors."""

import numpy as np
import pytest
import torch

from snake_mpi.blocks import (
    block_nbytes,
    block_params,
    flatten,
    model_bytes_held,
    model_hash,
    training_state_bytes,
    unflatten,
)
from snake_mpi.config import ModelConfig, TrainConfig
from snake_mpi.models import build_model
from snake_mpi.train import evaluate, make_optimizer, train_local


def cnn(seed=0, **kw):
    cfg = ModelConfig(family="cnn", width=8, middle_blocks=4, **kw)
    return build_model(cfg, sample_shape=(3, 16, 16), n_classes=10, seed=seed)


def mlp(seed=0, width=32, middle=3):
    cfg = ModelConfig(family="mlp", width=width, middle_blocks=middle)
    return build_model(cfg, sample_shape=(20,), n_classes=5, seed=seed)


def test_same_seed_same_model_different_seed_different():
    assert model_hash(cnn(1)) == model_hash(cnn(1))
    assert model_hash(cnn(1)) != model_hash(cnn(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_flatten_unflatten_round_trip_is_bit_exact(dtype):
    a, b = cnn(1).to(dtype), cnn(2).to(dtype)
    ids = [0, 2, 5]
    payload, sizes = flatten(a, ids)
    assert payload.dtype == np.uint8 and payload.flags.c_contiguous
    assert payload.nbytes == sum(block_nbytes(a, i) for i in ids) == int(sizes.sum())
    unflatten(b, ids, payload.copy(), sizes)
    for i in range(a.n_blocks):
        same = all(
            torch.equal(x, y)
            for x, y in zip(a.blocks[i].state_dict().values(), b.blocks[i].state_dict().values())
        )
        assert same == (i in ids)
    unflatten(b, range(b.n_blocks), *flatten(a, range(a.n_blocks)))
    assert model_hash(a) == model_hash(b)


def test_unflatten_rejects_wrong_sizes():
    a = cnn()
    payload, sizes = flatten(a, [1])
    with pytest.raises(ValueError, match="bytes"):
        unflatten(a, [2], payload, sizes)


def test_byte_sizes_are_parameter_counts_times_four():
    m = mlp()
    for b in range(m.n_blocks):
        assert block_nbytes(m, b) == 4 * block_params(m, b)
    # stem Linear(20, 32): 20*32 + 32 weights; a middle Linear(32, 32): 32*32 + 32
    assert block_params(m, 0) == 20 * 32 + 32 and block_params(m, 1) == 32 * 32 + 32
    assert model_bytes_held(m) == 4 * sum(p.numel() for p in m.parameters())


@pytest.mark.parametrize(("optimizer", "moments"), [("adam", 2), ("sgd", 1)])
def test_training_state_counts_weights_grads_and_optimizer_of_trainable_blocks(optimizer, moments):
    torch.manual_seed(0)
    m = mlp()
    x, y = torch.randn(64, 20), torch.randint(0, 5, (64,))
    cfg = TrainConfig(optimizer=optimizer, local_steps=2, batch_size=16, lr=0.01)
    res = train_local(m, [2], x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))
    p_all = sum(p.numel() for p in m.parameters())
    p_train = block_params(m, 2)
    assert res.trainable_params == p_train
    # Adam also keeps a float32 step counter per parameter tensor (weight and bias here)
    step_counters = 4 * 2 if optimizer == "adam" else 0
    assert res.train_state_bytes == 4 * p_all + 4 * p_train * (1 + moments) + step_counters
    assert res.steps == 2 and res.samples == 32
    # after the turn: no gradients, no optimiser, everything frozen
    assert all(p.grad is None and not p.requires_grad for p in m.parameters())
    assert training_state_bytes(m, None)["total"] == 4 * p_all


def test_local_training_changes_only_trainable_blocks_and_keeps_no_grads_below():
    m = mlp()
    before = [flatten(m, [b])[0].copy() for b in range(m.n_blocks)]
    x, y = torch.randn(128, 20), torch.randint(0, 5, (128,))
    cfg = TrainConfig(local_epochs=1, batch_size=32, lr=0.1)
    train_local(m, [2, 4], x, y, cfg=cfg, generator=torch.Generator().manual_seed(1))
    after = [flatten(m, [b])[0] for b in range(m.n_blocks)]
    changed = [b for b in range(m.n_blocks) if not np.array_equal(before[b], after[b])]
    assert changed == [2, 4]


def test_frozen_prefix_runs_without_autograd():
    m = mlp()
    seen = []
    m.blocks[0].register_forward_hook(lambda mod, i, o: seen.append(o.requires_grad))
    m.blocks[2].register_forward_hook(lambda mod, i, o: seen.append(o.requires_grad))
    opt = make_optimizer(list(m.blocks[2].parameters()), TrainConfig())
    from snake_mpi.blocks import set_trainable

    set_trainable(m, [2])
    m(torch.randn(4, 20), no_grad_below=2)
    assert seen == [False, True]
    del opt


def test_training_lowers_loss_and_evaluate_counts_accuracy():
    torch.manual_seed(0)
    m = mlp(width=64, middle=1)
    w = torch.randn(20, 5)
    x = torch.randn(512, 20)
    y = (x @ w).argmax(1)
    loss0, acc0 = evaluate(m, x, y)
    cfg = TrainConfig(local_epochs=20, batch_size=64, lr=0.05, optimizer="adam")
    train_local(m, range(m.n_blocks), x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))
    loss1, acc1 = evaluate(m, x, y)
    assert loss1 < 0.5 * loss0 and acc1 > 0.9 > acc0
