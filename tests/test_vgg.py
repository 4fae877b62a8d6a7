"""VGG-11-BN as blocks: the published size, the stage split, and bit-exact transfer of every
tensor (batch-norm statistics and counters included)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from snake_mpi.blocks import block_params, flatten, model_hash, unflatten
from snake_mpi.config import ConfigError, ModelConfig, from_dict
from snake_mpi.models import build_model


def vgg(width: int, seed: int = 0):
    cfg = ModelConfig(family="vgg11", width=width, middle_blocks=4)
    return build_model(cfg, sample_shape=(3, 32, 32), n_classes=10, seed=seed)


def test_full_width_vgg11_has_the_published_cifar_size():
    model = vgg(64)
    # the CIFAR VGG-11-BN (conv stages 64-M-128-M-256-256-M-512-512-M-512-512-M, linear 512->10)
    assert sum(p.numel() for p in model.parameters()) == 9_231_114
    assert model.names == ["stem", "stage2", "stage3", "stage4", "stage5", "head"]
    assert block_params(model, 5) == 512 * 10 + 10


def test_narrow_vgg_trains_and_its_blocks_round_trip_bit_exactly():
    model = vgg(8)
    x, y = torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model.train()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()  # batch-norm statistics and num_batches_tracked (int64) now differ from init
    payload, sizes = flatten(model, range(model.n_blocks))
    other = vgg(8, seed=1)
    assert model_hash(other) != model_hash(model)
    unflatten(other, list(range(model.n_blocks)), payload, sizes)
    assert model_hash(other) == model_hash(model)
    bn = other.blocks[0][1]
    assert bn.num_batches_tracked.dtype == torch.int64 and int(bn.num_batches_tracked) == 1
    np.testing.assert_array_equal(bn.running_mean.numpy(), model.blocks[0][1].running_mean.numpy())


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        ({"model": {"family": "vgg11", "middle_blocks": 3}}, "has 4 middle blocks"),
        ({"model": {"family": "vgg11"}, "data": {"sample_shape": [3, 28, 28]}}, "multiples of 32"),
        ({"model": {"family": "vgg11"}, "data": {"sample_shape": [64]}}, "image-shaped"),
    ],
)
def test_config_rejects_what_vgg11_cannot_be(sets, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(sets)
