"""Sequential split learning's declaration (``SPEC``) and its analytic byte count. Light (no
torch): the round loop is ``snake_mpi.schemes.split``."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from snake_mpi.schemes.registry import SchemeSpec

if TYPE_CHECKING:
    import numpy as np

    from snake_mpi.config import RunConfig
    from snake_mpi.store import Result


def activation_bytes_per_sample_of(cfg: RunConfig) -> int:
    """Bytes of one sample's activation at the configured cut (builds the model to find out)."""
    from snake_mpi.models import build_model
    from snake_mpi.schemes.splitnet import activation_bytes_per_sample, cut_shape

    model = build_model(
        cfg.model, sample_shape=cfg.data.sample_shape, n_classes=cfg.data.n_classes, seed=0
    )
    return activation_bytes_per_sample(cut_shape(model, cfg.split.cut, cfg.data.sample_shape))


def split_formula(
    formula: Callable[..., tuple[np.ndarray, np.ndarray]], cfg: RunConfig, res: Result
) -> tuple[np.ndarray, np.ndarray]:
    """``formula`` (``analytic.split_bytes`` or ``splitfed_bytes``) of the run's client
    blocks, batches and cut activation size."""
    from snake_mpi.analysis import analytic
    from snake_mpi.train import turn_batch_sizes

    samples = [int(s) for s in res.tables["ranks"]["data_samples"]]
    batches = [turn_batch_sizes(s, cfg.train) for s in samples]
    act = activation_bytes_per_sample_of(cfg)
    client_blocks = analytic.result_block_bytes(res)[: cfg.split.cut]
    return formula(client_blocks, batches, act, res.n_rounds)


def expected_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """Split learning: cut activations and gradients per batch, client blocks relayed."""
    from snake_mpi.analysis import analytic

    return split_formula(analytic.split_bytes, cfg, res)


SPEC = SchemeSpec(
    name="split",
    run="snake_mpi.schemes.split:run",
    client_server=True,
    supports_lm=False,
    expected_bytes=expected_bytes,
    sections=("split",),
)
