"""Federated averaging's declaration (``SPEC``): its world check, its tags, its analytic byte
count (by dotted path). Light (no torch): the round loop is ``snake_mpi.schemes.fedavg``."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snake_mpi.schemes.registry import SchemeSpec

if TYPE_CHECKING:
    from snake_mpi.config import RunConfig


def check_world(c: RunConfig, world_size: int, holders: int) -> None:
    """FedAvg's world-size check: no more clients per round than clients."""
    from snake_mpi.config import ConfigError

    if c.fedavg.clients_per_round > holders:
        raise ConfigError(
            f"fedavg.clients_per_round = {c.fedavg.clients_per_round} but there are only "
            f"{holders} clients (ranks 1..{world_size - 1})"
        )


def tags(cfg: RunConfig) -> list[str]:
    """FedAvg's label-skew options away from their defaults: ``la`` (logit adjustment, e.g.
    ``fedavg+la1``, never taken for plain FedAvg), ``prox``."""
    from snake_mpi.config import FedAvgConfig

    f, default = cfg.fedavg, FedAvgConfig()
    out = []
    if f.logit_adjust != default.logit_adjust:
        out.append(f"la{f.logit_adjust:g}")
    if f.prox_mu != default.prox_mu:
        out.append(f"prox{f.prox_mu:g}")
    return out


SPEC = SchemeSpec(
    name="fedavg",
    run="snake_mpi.schemes.fedavg:run",
    whole_model_turns=True,
    client_server=True,
    supports_lm=True,
    expected_bytes="snake_mpi.analysis.expected:fedavg_bytes",
    check_world=check_world,
    tags=tags,
    sections=("fedavg",),
    checkpoint_blocks="snake_mpi.analysis.analytic:fedavg_checkpoint_blocks",
)
