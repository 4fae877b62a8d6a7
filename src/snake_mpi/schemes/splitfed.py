"""SplitFed (v1): split learning with the clients in parallel. Each round the server sends every
client the client-side blocks; every client trains its part on its shard against its own copy
of the server-side blocks (the server serves the clients' batches in turn, step by step); then
clients return their blocks and the server replaces both parts by their averages weighted by
the clients' sample counts, and evaluates the whole model.
"""

from __future__ import annotations

import copy

from snake_mpi.blocks import drop_blocks, module_tensors
from snake_mpi.context import Context
from snake_mpi.schemes.common import (
    evaluate_and_record,
    receive_blocks,
    receive_transfer,
    send_blocks,
)
from snake_mpi.schemes.fedavg import RunningAverage, weights_by_samples
from snake_mpi.schemes.splitnet import ClientTurn, ServerPart, record_server, steps_of
from snake_mpi.transport.wire import KIND_MODEL, KIND_UPDATE


def run(ctx: Context) -> None:
    """Run ``train.rounds`` rounds of SplitFed v1 on this rank."""
    cfg, comm, model, rec = ctx.cfg, ctx.comm, ctx.model, ctx.record
    cut = cfg.split.cut
    clients = list(range(1, comm.size))
    client_ids = list(range(cut))
    server_ids = list(range(cut, model.n_blocks))
    ctx.report.owners = [-1] * cut + [0] * len(server_ids)
    if comm.rank > 0:
        drop_blocks(model, server_ids)
    for r in range(ctx.checkpoint.first_round, cfg.train.rounds):
        rec.begin_round(r)
        if comm.rank == 0:
            for c in clients:
                send_blocks(ctx, c, KIND_MODEL, r, c, client_ids)
            parts = {
                c: ServerPart(ctx, cut, [copy.deepcopy(model.blocks[b]) for b in server_ids])
                for c in clients
            }
            steps = {c: steps_of(cfg, ctx.shard_sizes[c]) for c in clients}
            for part in parts.values():
                part.begin_turn()
            for step in range(max(steps.values())):
                for c in clients:
                    if step < steps[c]:
                        parts[c].serve_step(c, r, step)
            for part in parts.values():
                part.end_turn()
            weights = weights_by_samples(ctx.shard_sizes, clients)
            server_avg = RunningAverage.of_blocks(model, server_ids)
            client_avg = RunningAverage.of_blocks(model, client_ids)
            for c, w in zip(clients, weights, strict=True):
                t = receive_transfer(ctx, c, KIND_UPDATE, r, c)
                if t.block_ids.tolist() != client_ids:
                    raise ValueError(f"rank 0: client {c} returned blocks {t.block_ids.tolist()}")
                client_avg.add(t.payload, float(w))
                copies = [t for m in parts[c].blocks for t in module_tensors(m)]
                server_avg.add_tensors(copies, float(w))
            client_avg.write()
            server_avg.write()
            model.versions[:] = r + 1
            record_server(ctx, list(parts.values()))
            evaluate_and_record(ctx)
        else:
            receive_blocks(ctx, 0, KIND_MODEL, r, comm.rank)
            ClientTurn(ctx, cut, r).run()
            model.versions[client_ids] = r + 1
            send_blocks(ctx, 0, KIND_UPDATE, r, comm.rank, client_ids)
        rec.end_round()
        ctx.checkpoint.boundary(ctx, r)
