"""A multilayer perceptron for any input shape (flattened): fast, for tests."""

from __future__ import annotations

import math

from torch import nn

from snake_mpi.blocks import BlockModel
from snake_mpi.config import ModelConfig


def build(cfg: ModelConfig, *, sample_shape: tuple[int, ...], n_classes: int) -> BlockModel:
    """Stem flatten+linear+ReLU, ``middle_blocks`` linear+ReLU blocks of ``width``, linear head."""
    n_in = math.prod(sample_shape)
    h = cfg.width
    blocks: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Flatten(), nn.Linear(n_in, h), nn.ReLU()))
    ]
    blocks += [
        (f"fc{i + 1}", nn.Sequential(nn.Linear(h, h), nn.ReLU())) for i in range(cfg.middle_blocks)
    ]
    blocks.append(("head", nn.Linear(h, n_classes)))
    return BlockModel(blocks)
