"""VGG-11 with batch norm for 32x32 inputs (the classic CIFAR variant: 9.2 M parameters at
width 1), split into blocks: the stem is the first conv stage, each further conv stage is a
middle block, the head is the classifier. ``width`` scales every stage's channels
(``model.width = 64`` is the published network; 8 or 16 give small variants for tests)."""

from __future__ import annotations

from torch import nn

from snake_mpi.blocks import BlockModel
from snake_mpi.config import ModelConfig

STAGES = [[1, "M"], [2, "M"], [4, 4, "M"], [8, 8, "M"], [8, 8, "M"]]
"""VGG-11 ("A") as stages of conv widths, in units of ``width`` (64 in the paper's network)."""
FULL_WIDTH = 64


def _stage(c_in: int, spec: list, width: int) -> tuple[nn.Sequential, int]:
    layers: list[nn.Module] = []
    for item in spec:
        if item == "M":
            layers.append(nn.MaxPool2d(2))
        else:
            c_out = item * width
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]
            c_in = c_out
    return nn.Sequential(*layers), c_in


def build(cfg: ModelConfig, *, sample_shape: tuple[int, ...], n_classes: int) -> BlockModel:
    """VGG-11-BN: 5 conv stages (stem + 4 middle blocks), then a linear classifier head.

    ``model.middle_blocks`` must be 4 (the network has 4 stages after the stem).
    """
    channels, height, width_px = sample_shape
    if cfg.middle_blocks != len(STAGES) - 1:
        raise ValueError(
            f"vgg11 has {len(STAGES) - 1} middle blocks (conv stages after the stem); "
            f"set model.middle_blocks = {len(STAGES) - 1}, got {cfg.middle_blocks}"
        )
    if height % 32 or width_px % 32:
        raise ValueError(f"vgg11 needs inputs whose sides are multiples of 32, got {sample_shape}")
    blocks: list[tuple[str, nn.Module]] = []
    c = channels
    for i, spec in enumerate(STAGES):
        stage, c = _stage(c, spec, cfg.width)
        blocks.append(("stem" if i == 0 else f"stage{i + 1}", stage))
    side = (height // 32) * (width_px // 32)
    blocks.append(("head", nn.Sequential(nn.Flatten(), nn.Linear(c * side, n_classes))))
    return BlockModel(blocks)
