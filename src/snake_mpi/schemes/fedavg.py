"""Federated averaging (client-server): rank 0 is the server and does not train; ranks 1..N-1
are clients. Each round the server sends the whole model to every sampled client, each client
trains all blocks on its shard and sends the whole model back, and the server replaces the model
by the average of the returned ones weighted by the clients' sample counts, then evaluates.

The server folds each returned model into a float64 running sum as it arrives (one model's worth
of payload at a time), so its memory is the model, the sum and one payload, whatever N is.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from snake_mpi.blocks import BlockModel, block_tensors
from snake_mpi.context import Context
from snake_mpi.schemes.common import (
    evaluate_and_record,
    receive_blocks,
    receive_transfer,
    send_blocks,
    train_and_record,
    turn_options,
)
from snake_mpi.transport.wire import KIND_MODEL, KIND_UPDATE


def sampled_clients(seed: int, n_clients: int, per_round: int, rounds: int) -> list[list[int]]:
    """Client ranks (1..n_clients) taking part in each round: all, or ``per_round`` of them drawn
    without replacement from a stream seeded by ``seed`` (the same on every rank)."""
    everyone = list(range(1, n_clients + 1))
    if per_round in (0, n_clients):
        return [everyone] * rounds
    rng = np.random.default_rng(seed)
    return [
        sorted(int(c) for c in rng.choice(everyone, per_round, replace=False))
        for _ in range(rounds)
    ]


def weights_by_samples(shard_sizes: Sequence[int], clients: Sequence[int]) -> np.ndarray:
    """FedAvg weights ``n_k / sum(n)`` of the given client ranks."""
    n = np.array([shard_sizes[c] for c in clients], dtype=np.float64)
    return n / n.sum()


class RunningAverage:
    """Weighted sum of models (or of some of their blocks), one flattened payload at a time,
    in float64 for accuracy.

    Integer state (e.g. batch-norm's ``num_batches_tracked``) is not averaged: the value of the
    first model added is kept (clients run the same number of steps).
    """

    def __init__(self, tensors: Sequence[torch.Tensor]) -> None:
        self.tensors = list(tensors)
        self.sums = [
            torch.zeros(t.shape, dtype=torch.float64, device=t.device)
            if t.is_floating_point()
            else None
            for t in self.tensors
        ]
        self.first_ints: list[torch.Tensor | None] = [None] * len(self.tensors)

    @classmethod
    def of_blocks(cls, model: BlockModel, ids: Sequence[int]) -> RunningAverage:
        """An average of blocks ``ids`` of ``model`` (payloads in ``flatten`` order)."""
        return cls([t for b in ids for t in block_tensors(model, b)])

    def add_tensors(self, tensors: Sequence[torch.Tensor], weight: float) -> None:
        """Add ``weight`` times tensors that correspond one to one with the averaged ones."""
        for i, value in enumerate(tensors):
            self._add(i, value.detach(), weight)

    def _add(self, i: int, value: torch.Tensor, weight: float) -> None:
        s = self.sums[i]
        if s is not None:
            s.add_(value.to(device=s.device, dtype=torch.float64), alpha=weight)
        elif self.first_ints[i] is None:
            self.first_ints[i] = value.clone()

    def add(self, payload: np.ndarray | torch.Tensor, weight: float) -> None:
        """Add ``weight`` times the blocks held in ``payload`` (``flatten`` order; a host array
        or a device tensor)."""
        raw = payload if torch.is_tensor(payload) else torch.from_numpy(payload)
        offset = 0
        for i, t in enumerate(self.tensors):
            n = t.numel() * t.element_size()
            value = raw[offset : offset + n].view(t.dtype).view(t.shape)
            offset += n
            self._add(i, value, weight)
        if offset != raw.numel():
            raise ValueError(f"payload has {raw.numel()} bytes, the model {offset}")

    def write(self) -> None:
        """Replace the model's state by the average."""
        with torch.no_grad():
            for t, s, first in zip(self.tensors, self.sums, self.first_ints, strict=True):
                if s is not None:
                    t.copy_(s.to(t.dtype))
                elif first is not None:
                    t.copy_(first)


def run(ctx: Context) -> None:
    """Run ``train.rounds`` rounds of FedAvg on this rank (server or client)."""
    cfg, comm, model, rec = ctx.cfg, ctx.comm, ctx.model, ctx.record
    everything = list(range(model.n_blocks))
    ctx.report.owners = np.full(model.n_blocks, -1, dtype=np.int64)  # every client trains all
    schedule = sampled_clients(
        ctx.seeds.get("sampling", cfg.seed),
        comm.size - 1,
        cfg.fedavg.clients_per_round,
        cfg.train.rounds,
    )
    start = ctx.checkpoint.first_round
    for r, chosen in enumerate(schedule):
        if r < start:
            continue
        rec.begin_round(r)
        if comm.rank == 0:
            serve_round(ctx, r, chosen)
        elif comm.rank in chosen:
            receive_blocks(ctx, 0, KIND_MODEL, r, comm.rank)
            f = cfg.fedavg
            options = turn_options(ctx, logit_adjust=f.logit_adjust, prox_mu=f.prox_mu)
            train_and_record(ctx, everything, options=options)
            model.versions[:] = r + 1
            send_blocks(ctx, 0, KIND_UPDATE, r, comm.rank, everything)
        rec.end_round()
        ctx.checkpoint.boundary(ctx, r)


def serve_round(ctx: Context, r: int, chosen: Sequence[int]) -> None:
    """The server's round: model out to every chosen client, weighted average of what returns."""
    model = ctx.model
    everything = list(range(model.n_blocks))
    for c in chosen:
        send_blocks(ctx, c, KIND_MODEL, r, c, everything)
    average = RunningAverage.of_blocks(model, everything)
    for c, w in zip(chosen, weights_by_samples(ctx.shard_sizes, chosen), strict=True):
        t = receive_transfer(ctx, c, KIND_UPDATE, r, c)
        if t.block_ids.tolist() != everything:
            raise ValueError(f"rank 0: client {c} returned blocks {t.block_ids.tolist()}")
        average.add(t.payload, float(w))
    average.write()
    model.versions[:] = r + 1
    evaluate_and_record(ctx)
