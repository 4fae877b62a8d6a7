"""Distributed learning schemes; each module has ``run(ctx) -> None`` and talks only to ctx.

Which schemes exist, and what each declares, is the registry's (``schemes.registry``). This
package imports no torch itself, so the config can read the registry cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from snake_mpi.schemes.registry import (
    REGISTRY,
    SchemeSpec,
    register,
    scheme_names,
    scheme_spec,
    unregister,
)

if TYPE_CHECKING:
    import torch

    from snake_mpi.blocks import BlockModel
    from snake_mpi.checkpoint import Checkpointer
    from snake_mpi.config import RunConfig
    from snake_mpi.record import Recorder
    from snake_mpi.transport.payloads import HopBuffers
    from snake_mpi.transport.protocol import Communicator

__all__ = [
    "REGISTRY",
    "Context",
    "NodeData",
    "SchemeSpec",
    "get_scheme",
    "register",
    "scheme_names",
    "scheme_spec",
    "unregister",
]


def _hop_buffers() -> HopBuffers:
    from snake_mpi.transport.payloads import HopBuffers

    return HopBuffers()


def _no_checkpoints() -> Checkpointer:
    from snake_mpi.checkpoint import Checkpointer

    return Checkpointer()


@dataclass(slots=True)
class NodeData:
    """This rank's training shard and (where it evaluates) the test set."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None
    """Train-time augmentation of a batch (``data.augment``), or None."""


@dataclass(slots=True)
class Context:
    """Everything a scheme may touch: config, communicator, model, data, recorder, RNG."""

    cfg: RunConfig
    comm: Communicator
    """A ``snake_mpi.transport.comm.Comm``, or an in-process ``localcomm.LocalComm``."""
    model: BlockModel
    data: NodeData
    record: Recorder
    generator: torch.Generator
    """This rank's own random stream (batch order)."""
    info: dict[str, Any]
    """What the scheme reports back for the result file (e.g. the block owners)."""
    shard_sizes: list[int] = field(default_factory=list)
    """Training samples of every rank (0 for a server or controller), for weighted averages."""
    seeds: dict[str, int] = field(default_factory=dict)
    """The run's shared seeds (``run.seeds_for``): identical on every rank."""
    hop: HopBuffers = field(default_factory=_hop_buffers)
    """The buffers model blocks travel in on this rank's transfer path (host, staged, direct)."""
    checkpoint: Checkpointer = field(default_factory=_no_checkpoints)
    """This run's checkpoints: ``restore`` after the scheme's set-up gives the first round;
    ``boundary`` after every round takes one when due (none by default)."""


def get_scheme(name: str) -> Callable[[Context], None]:
    """The ``run`` function of scheme ``name`` (from its registered spec)."""
    return scheme_spec(name).run_function()
