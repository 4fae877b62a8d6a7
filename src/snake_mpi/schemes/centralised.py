"""Centralised training: one rank, all the data, every block trainable. The accuracy ceiling of
the workload and the memory of plain training; a round is ``train.local_epochs`` passes (or
``local_steps`` steps) over the whole training set, then an evaluation. No messages."""

from __future__ import annotations

from snake_mpi.context import Context
from snake_mpi.schemes.common import evaluate_and_record, train_and_record


def run(ctx: Context) -> None:
    """Train the whole model on this (only) rank for ``train.rounds`` rounds."""
    everything = list(range(ctx.model.n_blocks))
    ctx.report.owners = [0] * ctx.model.n_blocks
    for r in range(ctx.checkpoint.first_round, ctx.cfg.train.rounds):
        ctx.record.begin_round(r)
        train_and_record(ctx, everything)
        ctx.model.versions[:] = r + 1
        evaluate_and_record(ctx)
        ctx.record.end_round()
        ctx.checkpoint.boundary(ctx, r)
