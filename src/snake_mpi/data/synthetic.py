"""A learnable synthetic classification dataset, generated identically on every rank from a seed.

Every class has a prototype in a small latent space; a sample is its class prototype plus latent
jitter, mapped to the sample shape by one fixed random linear map, plus isotropic pixel noise.
For image shapes the map's patterns are spatially smooth (upsampled coarse patterns), so that
convolutions help. Nothing is downloaded, and the test set does not depend on ``n_train``.

The tensors are the same bits on every machine: every random number comes from numpy's seeded
generators, and every sum is taken element-wise in a fixed order (no BLAS call, whose result
depends on its thread count and on the CPU's kernel: docs/reproducibility.md).
"""

from __future__ import annotations

import functools
import math
import operator
from dataclasses import dataclass

import numpy as np
import torch

from snake_mpi.config import MAX_NOISE

LATENT_DIM = 16
"""Dimension of the latent space that holds the class prototypes."""
COARSE_SIDE = 4
"""Side of the coarse random pattern that is upsampled to each image channel."""
JITTER = 1.25
"""Per-sample latent jitter (times ``noise``), relative to unit-variance prototypes."""
PIXEL_NOISE = 1.0
"""Per-element noise (times ``noise``), relative to the unit-variance clean signal."""
DEFAULT_NOISE = 1.0
"""The ``noise`` the tests calibrate: clearly learnable, clearly not trivial."""


@dataclass(frozen=True, slots=True)
class Dataset:
    """Train and test tensors of one classification task."""

    x_train: torch.Tensor
    """float32, shape ``(n_train, *sample_shape)``."""
    y_train: torch.Tensor
    """int64, shape ``(n_train,)``, values in ``[0, n_classes)``."""
    x_test: torch.Tensor
    """float32, shape ``(n_test, *sample_shape)``."""
    y_test: torch.Tensor
    """int64, shape ``(n_test,)``."""
    n_classes: int
    """Number of classes."""

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, e.g. ``(3, 32, 32)``."""
        return tuple(self.x_train.shape[1:])


def make_synthetic(
    *,
    n_train: int,
    n_test: int,
    n_classes: int,
    sample_shape: tuple[int, ...],
    noise: float,
    seed: int,
) -> Dataset:
    """A seeded, learnable dataset with balanced labels and features standardised by the
    training set's mean and standard deviation.

    ``noise`` scales both the latent jitter and the pixel noise. ``DEFAULT_NOISE = 1.0`` is the
    calibrated setting: with 10 classes (chance 10 %), softmax regression trained by plain SGD
    on 2048 samples for 5 epochs reaches about 85 % test accuracy for shape (3, 32, 32) and
    80 % for (64,) (tested: between 60 % and 97 %). ``noise = 0.5`` is nearly solved (> 95 %),
    ``noise = 2`` hard (about 40-50 %). Same arguments give bit-identical tensors.
    """
    _check(n_train, n_test, n_classes, sample_shape, noise, seed)
    root = np.random.default_rng(seed)
    maps_rng, train_rng, test_rng = root.spawn(3)
    prototypes = maps_rng.standard_normal((n_classes, LATENT_DIM))
    mapping = _mapping(maps_rng, sample_shape)
    x_train, y_train = _samples(train_rng, n_train, prototypes, mapping, noise)
    x_test, y_test = _samples(test_rng, n_test, prototypes, mapping, noise)
    mean, std = x_train.mean(dtype=np.float64), x_train.std(dtype=np.float64)
    for x in (x_train, x_test):
        x -= np.float32(mean)
        x *= np.float32(1.0 / std if std > 0 else 1.0)
    return Dataset(
        x_train=_tensor(x_train, sample_shape),
        y_train=torch.from_numpy(y_train),
        x_test=_tensor(x_test, sample_shape),
        y_test=torch.from_numpy(y_test),
        n_classes=n_classes,
    )


def _mapping(rng: np.random.Generator, sample_shape: tuple[int, ...]) -> np.ndarray:
    """Latent-to-sample linear map, shape ``(LATENT_DIM, prod(sample_shape))``, scaled so that a
    unit-variance latent gives a roughly unit-variance signal per element."""
    if len(sample_shape) >= 2:
        *lead, height, width = sample_shape
        channels = math.prod(lead)
        coarse_h, coarse_w = min(COARSE_SIDE, height), min(COARSE_SIDE, width)
        coarse = rng.standard_normal((LATENT_DIM, channels, coarse_h, coarse_w))
        up_h, up_w = _upsampler(height, coarse_h), _upsampler(width, coarse_w)
        # sums taken one term after another (float64), the same bits whatever the machine
        rows = functools.reduce(  # (l, c, h, q): sum over p of up_h[h, p] * coarse[l, c, p, q]
            operator.add,
            (up_h[None, None, :, p, None] * coarse[:, :, None, p, :] for p in range(coarse_h)),
        )
        patterns = functools.reduce(  # (l, c, h, w): sum over q of rows[..., q] * up_w[w, q]
            operator.add,
            (rows[:, :, :, q, None] * up_w[None, None, None, :, q] for q in range(coarse_w)),
        )
        patterns = patterns.reshape(LATENT_DIM, -1)
    else:
        patterns = rng.standard_normal((LATENT_DIM, math.prod(sample_shape)))
    rms = np.sqrt(np.mean(patterns**2, axis=1, keepdims=True))
    return (patterns / rms / math.sqrt(LATENT_DIM)).astype(np.float32)


def _upsampler(size: int, coarse: int) -> np.ndarray:
    """Linear-interpolation matrix ``(size, coarse)`` from ``coarse`` points to ``size`` points."""
    positions = np.linspace(0.0, coarse - 1.0, size)
    return np.maximum(0.0, 1.0 - np.abs(positions[:, None] - np.arange(coarse)[None, :]))


def _samples(
    rng: np.random.Generator,
    n: int,
    prototypes: np.ndarray,
    mapping: np.ndarray,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` flattened samples and their balanced, shuffled labels (int64). Float32 throughout,
    so that generating the data does not dominate a rank's peak memory."""
    n_classes = len(prototypes)
    labels = rng.permutation(np.arange(n, dtype=np.int64) % n_classes)
    jitter = rng.standard_normal((n, LATENT_DIM), dtype=np.float32)
    latent = (prototypes[labels] + np.float32(noise * JITTER) * jitter).astype(np.float32)
    x = _project(latent, mapping)
    pixel = rng.standard_normal(x.shape, dtype=np.float32)
    pixel *= np.float32(noise * PIXEL_NOISE)
    x += pixel
    return x, labels


def _project(latent: np.ndarray, mapping: np.ndarray, block_bytes: int = 1 << 20) -> np.ndarray:
    """``latent @ mapping`` in float32 without BLAS: for each output element the products
    ``latent[i, k] * mapping[k, j]`` added in the order of ``k``, each step rounded as IEEE
    float32 (numpy's element-wise ufuncs: no fused multiply-add, no threads). A BLAS ``sgemm``
    gave other bits with one thread than with two, and with each CPU kernel. Rows are taken a
    block at a time so that the temporary stays in cache."""
    n, width = latent.shape[0], mapping.shape[1]
    x = np.empty((n, width), dtype=np.float32)
    rows = max(1, block_bytes // (4 * width))
    term = np.empty((min(n, rows), width), dtype=np.float32)
    for start in range(0, n, rows):
        stop = min(n, start + rows)
        out, t = x[start:stop], term[: stop - start]
        np.multiply(latent[start:stop, 0, None], mapping[0], out=out)
        for k in range(1, mapping.shape[0]):
            np.multiply(latent[start:stop, k, None], mapping[k], out=t)
            out += t
    return x


def _tensor(x: np.ndarray, sample_shape: tuple[int, ...]) -> torch.Tensor:
    return torch.from_numpy(x.reshape(-1, *sample_shape))


def _check(
    n_train: int,
    n_test: int,
    n_classes: int,
    sample_shape: tuple[int, ...],
    noise: float,
    seed: int,
) -> None:
    """ValueError naming the first bad argument."""
    for name, value in (("n_train", n_train), ("n_test", n_test)):
        if value < 1:
            raise ValueError(f"{name} is {value}: must be >= 1")
    if n_classes < 2:
        raise ValueError(f"n_classes is {n_classes}: must be >= 2")
    if len(sample_shape) == 0 or any(d < 1 for d in sample_shape):
        raise ValueError(f"sample_shape is {sample_shape}: needs at least one dimension, all >= 1")
    if not math.isfinite(noise) or not 0 <= noise <= MAX_NOISE:
        raise ValueError(f"noise is {noise}: must be between 0 and {MAX_NOISE:g}")
    if seed < 0:
        raise ValueError(f"seed is {seed}: must be >= 0")
