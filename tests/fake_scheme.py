"""A scheme made up for the fake-scheme test (``test_fake_scheme.py``), declared the way a real
one is: this module's ``SPEC`` is all it takes, joined by one ``registry.add`` line.

``relay``: the whole model goes round the ring once a round. Rank 0 trains it on its shard and
sends it to rank 1, which trains and passes it on, ..., and the last rank sends it back to
rank 0, which evaluates it. Every rank holds data and sends (and receives) one whole model a
round.
"""

from __future__ import annotations

import numpy as np

from snake_mpi.schemes.registry import SchemeSpec


def run(ctx) -> None:
    """Run ``train.rounds`` rounds of the relay on this rank."""
    from snake_mpi.schemes.common import (
        evaluate_and_record,
        receive_blocks,
        send_blocks,
        train_and_record,
    )
    from snake_mpi.transport.wire import KIND_MODEL

    comm, model, rec = ctx.comm, ctx.model, ctx.record
    n, k = comm.size, comm.rank
    everything = list(range(model.n_blocks))
    ctx.report.owners = [-1] * model.n_blocks
    for r in range(ctx.checkpoint.first_round, ctx.cfg.train.rounds):
        rec.begin_round(r)
        if k > 0:
            receive_blocks(ctx, k - 1, KIND_MODEL, r, k - 1)
        train_and_record(ctx, everything)
        model.versions[:] = r * n + k + 1
        send_blocks(ctx, (k + 1) % n, KIND_MODEL, r, k, everything)
        if k == 0:
            receive_blocks(ctx, n - 1, KIND_MODEL, r, n - 1)
            evaluate_and_record(ctx)
        rec.end_round()
        ctx.checkpoint.boundary(ctx, r)


def expected_bytes(cfg, res) -> tuple[np.ndarray, np.ndarray]:
    """One whole model (and its header) sent and received by every rank every round."""
    from snake_mpi.analysis.analytic import result_block_bytes
    from snake_mpi.transport.wire import header_nbytes

    sizes = result_block_bytes(res)
    hop = header_nbytes(len(sizes)) + sum(sizes)
    sent = np.full((res.n_rounds, res.world_size), hop, dtype=np.int64)
    return sent, sent.copy()


def check_world(cfg, world_size: int, holders: int) -> None:
    """At most 8 ranks round the ring."""
    from snake_mpi.config import ConfigError

    if world_size > 8:
        raise ConfigError(f"relay: at most 8 ranks, got {world_size}")


SPEC = SchemeSpec(
    name="relay",
    run=run,
    client_server=False,
    supports_lm=False,
    expected_bytes=expected_bytes,
    data_role="nodes",
    whole_model_turns=True,
    check_world=check_world,
    label=lambda cfg: f"relay-x{cfg.train.local_epochs}",
    result_attrs=lambda cfg: {"ring": "0->1->...->0"},
    judged=True,
)
