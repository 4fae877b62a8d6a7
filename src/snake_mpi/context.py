"""What a scheme is given (``Context``: config, communicator, model, data, recorder, random
stream, transfer buffers, checkpoints) and what it trains on (``NodeData``).

A scheme module imports this and its helpers, never ``run`` or the checkpoint package:
``Context.checkpoint`` is anything with the ``RoundCheckpoints`` methods (``checkpoint.
Checkpointer`` in a run; ``NoCheckpoints`` by default).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import torch

    from snake_mpi.blocks import BlockModel
    from snake_mpi.config import RunConfig
    from snake_mpi.record import Recorder
    from snake_mpi.transport.hops import Hops
    from snake_mpi.transport.payloads import HopBuffers
    from snake_mpi.transport.protocol import Communicator


class RoundCheckpoints(Protocol):
    """What a scheme calls of its run's checkpoints: it starts at ``first_round``, asks
    ``carried_in(r)`` whether round ``r + 1``'s first hop came with the checkpoint, and calls
    ``boundary`` after every round."""

    first_round: int
    attempts: list[dict[str, Any]]

    def carried_in(self, r: int) -> bool: ...

    def boundary(self, ctx: Context, r: int, carry_in: Callable[[], Any] | None = None) -> None: ...


@dataclass
class NoCheckpoints:
    """No checkpoints: every round runs from 0, none is taken (a ``Context`` built without a
    run's ``Checkpointer``, as tests build them)."""

    first_round: int = 0
    attempts: list[dict[str, Any]] = field(default_factory=list)

    def carried_in(self, r: int) -> bool:
        return False

    def boundary(self, ctx: Context, r: int, carry_in: Callable[[], Any] | None = None) -> None:
        return None


def _hop_buffers() -> HopBuffers:
    from snake_mpi.transport.payloads import HopBuffers

    return HopBuffers()


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
    """A ``snake_mpi.transport.mpi.comm.Comm``, or an in-process ``localcomm.LocalComm``."""
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
    hops: Hops = field(init=False)
    """The hops of ``model``'s blocks over ``comm`` in ``hop``'s buffers: what a scheme sends,
    posts and receives blocks by (``transport.hops.Hops``)."""
    checkpoint: RoundCheckpoints = field(default_factory=NoCheckpoints)
    """This run's checkpoints: ``restore`` after the scheme's set-up gives the first round;
    ``boundary`` after every round takes one when due (none by default)."""

    def __post_init__(self) -> None:
        from snake_mpi.transport.hops import Hops

        self.hops = Hops(self.comm, self.hop)
