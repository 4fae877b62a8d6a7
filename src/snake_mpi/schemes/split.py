"""Vanilla split learning, sequential: clients (ranks 1..N-1) hold blocks ``0 .. cut-1``, the
server (rank 0) the rest. Clients take turns; in its turn a client trains its part batch by
batch against the server (``splitnet``), then relays its blocks to the next client (the last
client of a round to client 1 of the next). The last client also sends its blocks to the
server after each round, so that the server can evaluate the whole model.
"""

from __future__ import annotations

from snake_mpi.blocks import drop_blocks
from snake_mpi.context import Context
from snake_mpi.schemes.common import (
    evaluate_and_record,
    post_blocks,
    receive_blocks,
    send_blocks,
)
from snake_mpi.schemes.splitnet import ClientTurn, ServerPart, record_server, steps_of
from snake_mpi.transport.wire import KIND_MODEL, KIND_UPDATE


def run(ctx: Context) -> None:
    """Run ``train.rounds`` rounds of sequential split learning on this rank."""
    cfg, comm, model, rec = ctx.cfg, ctx.comm, ctx.model, ctx.record
    cut, last, rounds = cfg.split.cut, comm.size - 1, cfg.train.rounds
    client_ids = list(range(cut))
    ctx.report.owners = [-1] * cut + [0] * (model.n_blocks - cut)
    if comm.rank > 0:
        drop_blocks(model, range(cut, model.n_blocks))
    for r in range(ctx.checkpoint.first_round, rounds):
        rec.begin_round(r)
        if comm.rank == 0:
            part = ServerPart(ctx, cut, [model.blocks[b] for b in range(cut, model.n_blocks)])
            for client in range(1, last + 1):
                part.begin_turn()
                for step in range(steps_of(cfg, ctx.shard_sizes[client])):
                    part.serve_step(client, r, step)
                part.end_turn()
            receive_blocks(ctx, last, KIND_UPDATE, r, last)
            model.versions[cut:] = r + 1
            record_server(ctx, [part])
            evaluate_and_record(ctx)
        else:
            k = comm.rank
            if k > 1:
                receive_blocks(ctx, k - 1, KIND_MODEL, r, k - 1)
            elif r > 0 and not ctx.checkpoint.carried_in(r - 1):
                receive_blocks(ctx, last, KIND_MODEL, r - 1, last)
            ClientTurn(ctx, cut, r).run()
            model.versions[client_ids] = r * last + k
            if k == 1 and r < rounds - 1:  # the relay across the round end, see Comm.post
                post_blocks(ctx, last, KIND_MODEL, r, last, client_ids, into_model=False)
            if k == last:
                send_blocks(ctx, 0, KIND_UPDATE, r, k, client_ids)
            if k < last or r < rounds - 1:
                send_blocks(ctx, k % last + 1, KIND_MODEL, r, k, client_ids)
        rec.end_round()
        relay_in = None
        if comm.rank == 1 and r < rounds - 1:

            def relay_in(r: int = r) -> None:
                receive_blocks(ctx, last, KIND_MODEL, r, last)

        ctx.checkpoint.boundary(ctx, r, carry_in=relay_in)
