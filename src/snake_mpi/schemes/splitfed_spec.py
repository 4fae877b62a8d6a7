"""SplitFed's declaration (``SPEC``). Light (no torch): the round loop is
``snake_mpi.schemes.splitfed``; its analytic byte count reads the run as split learning's does
(``split_spec.split_inputs``)."""

from __future__ import annotations

from snake_mpi.schemes.registry import SchemeSpec

SPEC = SchemeSpec(
    name="splitfed",
    run="snake_mpi.schemes.splitfed:run",
    client_server=True,
    supports_lm=False,
    expected_bytes="snake_mpi.analysis.expected:splitfed_bytes",
    sections=("split",),
)
