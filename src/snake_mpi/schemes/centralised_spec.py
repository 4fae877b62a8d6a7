"""Centralised training's declaration (``SPEC``): one rank, no messages. Light (no torch): the
round loop is ``snake_mpi.schemes.centralised``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from snake_mpi.schemes.registry import SchemeSpec

if TYPE_CHECKING:
    from snake_mpi.config import RunConfig
    from snake_mpi.store import Result


def expected_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """No model moves: zeros."""
    zero = np.zeros((res.n_rounds, res.world_size), dtype=np.int64)
    return zero, zero.copy()


SPEC = SchemeSpec(
    name="centralised",
    run="snake_mpi.schemes.centralised:run",
    whole_model_turns=True,
    client_server=False,
    supports_lm=True,
    expected_bytes=expected_bytes,
    min_ranks=1,
    max_ranks=1,
    checkpoint_blocks="snake_mpi.analysis.analytic:centralised_checkpoint_blocks",
)
