"""Model families, each split into blocks (stem, middle blocks, head); none knows about MPI."""

from __future__ import annotations

import threading

import torch

from snake_mpi.blocks import BlockModel
from snake_mpi.config import ModelConfig
from snake_mpi.models import cnn, mlp, vgg


def _lm(
    cfg: ModelConfig,
    *,
    sample_shape: tuple[int, ...],
    n_classes: int,
    int8_layers: tuple[frozenset[int], frozenset[int]] | None = None,
) -> BlockModel:
    from snake_mpi.models import lm  # imports transformers: only for language models

    return lm.build(cfg, vocab_size=n_classes, int8_layers=int8_layers)


_FAMILIES = {"cnn": cnn.build, "mlp": mlp.build, "vgg11": vgg.build, "lm": _lm}
_GLOBAL_RNG = threading.Lock()  # nn init draws from torch's one process-wide generator


def build_model(
    cfg: ModelConfig,
    *,
    sample_shape: tuple[int, ...],
    n_classes: int,
    seed: int,
    int8_layers: tuple[frozenset[int], frozenset[int]] | None = None,
) -> BlockModel:
    """Build the configured family with weights drawn from ``seed`` (same on every rank);
    ``n_classes`` is the classes, or a language model's tokenizer vocabulary. ``int8_layers``:
    a language model's decoder layers made int8 as they are built (``models.lm.build``)."""
    try:
        build = _FAMILIES[cfg.family]
    except KeyError:
        raise ValueError(
            f"unknown model family {cfg.family!r}; known: {sorted(_FAMILIES)}"
        ) from None
    with _GLOBAL_RNG, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if int8_layers is not None:
            return _lm(cfg, sample_shape=sample_shape, n_classes=n_classes, int8_layers=int8_layers)
        return build(cfg, sample_shape=sample_shape, n_classes=n_classes)
