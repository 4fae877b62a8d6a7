"""A small CNN for image-shaped input: conv stem, conv middle blocks, pooled linear head."""

from __future__ import annotations

from torch import nn

from snake_mpi.blocks import BlockModel
from snake_mpi.config import ModelConfig


def build(cfg: ModelConfig, *, sample_shape: tuple[int, ...], n_classes: int) -> BlockModel:
    """Stem conv(3x3)+ReLU+pool; ``middle_blocks`` conv(3x3)+ReLU blocks (width doubles and the
    map halves every second block while it is larger than 4x4); avg-pool + linear head."""
    channels, height, width = sample_shape
    w = cfg.width
    blocks: list[tuple[str, nn.Module]] = [
        ("stem", nn.Sequential(nn.Conv2d(channels, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)))
    ]
    side = min(height, width) // 2
    c_in = w
    for i in range(cfg.middle_blocks):
        downsample = i % 2 == 1 and side > 4
        c_out = c_in * 2 if downsample else c_in
        layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
        if downsample:
            layers.append(nn.MaxPool2d(2))
            side //= 2
        blocks.append((f"conv{i + 1}", nn.Sequential(*layers)))
        c_in = c_out
    blocks.append(
        ("head", nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c_in, n_classes)))
    )
    return BlockModel(blocks)
