"""SplitFed's declaration (``SPEC``) and its analytic byte count. Light (no torch): the round
loop is ``snake_mpi.schemes.splitfed``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snake_mpi.schemes.registry import SchemeSpec
from snake_mpi.schemes.split_spec import split_formula

if TYPE_CHECKING:
    import numpy as np

    from snake_mpi.config import RunConfig
    from snake_mpi.store import Result


def expected_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """SplitFed: as split learning, every client at once, client blocks averaged."""
    from snake_mpi.analysis import analytic

    return split_formula(analytic.splitfed_bytes, cfg, res)


SPEC = SchemeSpec(
    name="splitfed",
    run="snake_mpi.schemes.splitfed:run",
    client_server=True,
    supports_lm=False,
    expected_bytes=expected_bytes,
    sections=("split",),
)
