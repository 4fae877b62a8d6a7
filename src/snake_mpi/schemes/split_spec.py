"""Sequential split learning's declaration (``SPEC``) and what its analytic byte count reads
from a result. Light (no torch): the round loop is ``snake_mpi.schemes.split``; the formula is
``snake_mpi.analysis.analytic``'s (named by dotted path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snake_mpi.schemes.registry import SchemeSpec

if TYPE_CHECKING:
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


def split_inputs(cfg: RunConfig, res: Result) -> tuple[list[int], list[list[int]], int, int]:
    """The arguments of ``analytic.split_bytes`` / ``splitfed_bytes`` for a finished run: the
    client blocks' bytes, each rank's batch sizes per turn, the cut activation bytes per
    sample, the rounds."""
    from snake_mpi.train import turn_batch_sizes

    samples = [int(s) for s in res.tables["ranks"]["data_samples"]]
    batches = [turn_batch_sizes(s, cfg.train) for s in samples]
    client_blocks = [int(b) for b in res.tables["blocks"]["bytes"]][: cfg.split.cut]
    return client_blocks, batches, activation_bytes_per_sample_of(cfg), res.n_rounds


SPEC = SchemeSpec(
    name="split",
    run="snake_mpi.schemes.split:run",
    client_server=True,
    supports_lm=False,
    expected_bytes="snake_mpi.analysis.expected:split_bytes",
    sections=("split",),
)
