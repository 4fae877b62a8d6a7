"""What a scheme is given (``Context``: config, communicator, model, data, recorder, random
stream, transfer buffers, checkpoints), what it trains on (``NodeData``) and what it hands
back for the result file (``SchemeReport``).

A scheme module imports this and its helpers, never ``run`` or the checkpoint package:
``Context.checkpoint`` is anything with the ``RoundCheckpoints`` methods (``checkpoint.
Checkpointer`` in a run; ``NoCheckpoints`` by default).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

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


class TurnSwap(Protocol):
    """What stands in for some blocks during a turn (``schemes.frozen.FrozenInt8``)."""

    def turn(
        self, model: BlockModel, trainable: Sequence[int]
    ) -> contextlib.AbstractContextManager[None]: ...


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


@dataclass(frozen=True, slots=True)
class FinalSync:
    """This rank's bytes in the pass after the last round that leaves every rank holding the
    final model (``/final_sync``)."""

    bytes_sent: int
    bytes_received: int

    @classmethod
    def of(cls, counters: dict[str, float]) -> FinalSync:
        """From the counters ``CommStats.take`` returns over the pass."""
        return cls(int(counters["bytes_sent"]), int(counters["bytes_received"]))


PLAN_INPUTS = ("capabilities", "block_time_s", "block_time_spread")
"""The ``SchemeReport`` fields a run decides once at its start (``snake.capability =
"measure"`` times every rank's blocks): a checkpoint keeps them, so that a resumed run trains
on the same plan."""


@dataclass(slots=True)
class SchemeReport:
    """What a scheme hands back for the result file; every field stays None where the scheme
    has nothing to say (the writer then leaves the dataset out, or writes its default)."""

    owners: Sequence[int] | np.ndarray | None = None
    """Rank that trains each block (``/blocks/owner``: -1 several ranks, -2 never trained)."""
    plan: list[list[int]] | None = None
    """Snake: the block ids each node trains (node ``k``: ``plan[k]``)."""
    capabilities: list[float] | None = None
    """Snake: the capability of each node the plan used (``/assignment/capability``)."""
    block_time_s: np.ndarray | None = None
    """Snake with ``capability = "measure"``: (ranks, blocks) step times the plan used."""
    block_time_spread: np.ndarray | None = None
    """The same measurement's noise (``/assignment/block_time_spread``)."""
    final_sync: FinalSync | None = None
    """This rank's final-sync bytes; None when the run did no final sync."""

    def block_owners(self, n_blocks: int) -> np.ndarray:
        """``/blocks/owner``: ``owners``, or -2 (never trained) for every block."""
        if self.owners is None:
            return np.full(n_blocks, -2, dtype=np.int64)
        return np.asarray(self.owners, dtype=np.int64)

    def plan_inputs(self) -> dict[str, np.ndarray]:
        """The ``PLAN_INPUTS`` that are set, as float64 arrays (what a checkpoint keeps)."""
        out = {}
        for key in PLAN_INPUTS:
            value = getattr(self, key)
            if value is not None:
                out[key] = np.asarray(value, dtype=np.float64)
        return out

    def restore_plan_inputs(self, arrays: dict[str, np.ndarray]) -> None:
        """Put back what ``plan_inputs`` gave (capabilities as a list, the times as arrays)."""
        if "capabilities" in arrays:
            self.capabilities = [float(x) for x in arrays["capabilities"]]
        if "block_time_s" in arrays:
            self.block_time_s = np.array(arrays["block_time_s"])
        if "block_time_spread" in arrays:
            self.block_time_spread = np.array(arrays["block_time_spread"])


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
    report: SchemeReport = field(default_factory=SchemeReport)
    """What the scheme hands back for the result file (block owners, plan, final sync)."""
    shard_sizes: list[int] = field(default_factory=list)
    """Training samples of every rank (0 for a server or controller), for weighted averages."""
    seeds: dict[str, int] = field(default_factory=dict)
    """The run's shared seeds (``run.seeds_for``): identical on every rank."""
    hop: HopBuffers = field(default_factory=_hop_buffers)
    """The buffers model blocks travel in on this rank's transfer path (host, staged, direct)."""
    hops: Hops = field(init=False)
    """The hops of ``model``'s blocks over ``comm`` in ``hop``'s buffers: what a scheme sends,
    posts and receives blocks by (``transport.hops.Hops``)."""
    frozen: TurnSwap | None = None
    """With ``snake.frozen_weights = "int8"``: the int8 blocks' full-precision copies this rank
    trains in their place (``schemes.frozen.FrozenInt8``); None otherwise."""
    checkpoint: RoundCheckpoints = field(default_factory=NoCheckpoints)
    """This run's checkpoints: ``restore`` after the scheme's set-up gives the first round;
    ``boundary`` after every round takes one when due (none by default)."""

    def __post_init__(self) -> None:
        from snake_mpi.transport.hops import Hops

        self.hops = Hops(self.comm, self.hop)
