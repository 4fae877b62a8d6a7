"""Train-time augmentation for images: random crop with zero padding and horizontal flip,
drawn from the rank's own generator (so a run is reproducible)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def crop_flip(x: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """A batch ``(N, C, H, W)``, each image shifted by up to ``pad`` pixels (zero fill) and
    mirrored left-right with probability 1/2."""
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=generator)
    flip = torch.rand(n, generator=generator) < 0.5
    rows = dy[:, None] + torch.arange(h)[None, :]
    ahead = torch.arange(w)[None, :]
    cols = dx[:, None] + torch.where(flip[:, None], w - 1 - ahead, ahead)
    return padded[
        torch.arange(n)[:, None, None, None],
        torch.arange(c)[None, :, None, None],
        rows[:, None, :, None],
        cols[:, None, None, :],
    ]
