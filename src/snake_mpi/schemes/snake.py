"""Snake Learning, peer-to-peer: the model travels round the ring of nodes; each node trains
only its segment of middle blocks (plus the ends, per policy) on its own data, then hands on
the blocks the next node lacks (``delta``) or the whole model (``full``).

Versions: when node ``i`` trains in round ``r`` it stamps its blocks with ``r * N + i + 1``.
A node that last held the model at stamp ``s`` lacks exactly the blocks with version > ``s``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from snake_mpi import assign
from snake_mpi.blocks import BlockModel, block_nbytes, block_params, flatten, unflatten
from snake_mpi.config import SnakeConfig
from snake_mpi.schemes import Context
from snake_mpi.train import evaluate, train_local
from snake_mpi.wire import KIND_MODEL, KIND_SYNC

OWNER_ALL = -1
OWNER_NONE = -2


def plan_segments(model: BlockModel, cfg: SnakeConfig, n_nodes: int) -> list[list[int]]:
    """Trainable block ids of every node: its segment of middle blocks, plus the ends by policy."""
    mids = model.middle_ids
    if cfg.block_cost == "params":
        costs = [float(block_params(model, b)) for b in mids]
    else:
        costs = [1.0] * len(mids)
    caps = list(cfg.capabilities) or [1.0] * n_nodes
    segments = assign.partition_blocks(costs, caps)
    stem, head = 0, model.n_blocks - 1
    plan = []
    for i, seg in enumerate(segments):
        ids = [mids[j] for j in seg]
        if cfg.ends == "all" or (cfg.ends == "owner" and i == 0):
            ids.insert(0, stem)
        if cfg.ends == "all" or (cfg.ends == "owner" and i == n_nodes - 1):
            ids.append(head)
        plan.append(ids)
    return plan


def block_owners(plan: Sequence[Sequence[int]], n_blocks: int) -> np.ndarray:
    """Owner rank per block; OWNER_ALL if several nodes train it, OWNER_NONE if none does."""
    owners = np.full(n_blocks, OWNER_NONE, dtype=np.int64)
    for node, ids in enumerate(plan):
        for b in ids:
            owners[b] = node if owners[b] == OWNER_NONE else OWNER_ALL
    return owners


def stamp(round_: int, node: int, n_nodes: int) -> int:
    """Version given to blocks that ``node`` trains in ``round_``."""
    return round_ * n_nodes + node + 1


def last_stamp(receiver: int, sender: int, round_: int, n_nodes: int) -> int:
    """Stamp of the receiver's latest turn before ``sender``'s hop in ``round_`` (0: never)."""
    r = round_ if receiver <= sender else round_ - 1
    return stamp(r, receiver, n_nodes) if r >= 0 else 0


def blocks_to_send(versions: np.ndarray, receiver_stamp: int, transfer: str) -> list[int]:
    """Blocks a hop carries: all (``full``) or those newer than the receiver's copy (``delta``)."""
    if transfer == "full":
        return list(range(len(versions)))
    return [int(b) for b in np.flatnonzero(versions > receiver_stamp)]


def expected_wrap_blocks(
    versions: np.ndarray, plan: Sequence[Sequence[int]], round_: int, transfer: str
) -> list[int]:
    """Blocks node 0 will get from node N-1 at the end of ``round_`` (node 0 has trained)."""
    n = len(plan)
    predicted = versions.copy()
    for node in range(1, n):
        predicted[list(plan[node])] = stamp(round_, node, n)
    return blocks_to_send(predicted, stamp(round_, 0, n), transfer)


def _send(ctx: Context, dest: int, kind: int, round_: int, hop: int, ids: list[int]) -> None:
    model = ctx.model
    payload, sizes = flatten(model, ids)
    ctx.comm.send_blocks(
        dest,
        kind=kind,
        round=round_,
        hop=hop,
        block_ids=np.asarray(ids, dtype=np.int64),
        versions=model.versions[ids],
        block_nbytes=sizes,
        payload=payload,
    )


def _receive(ctx: Context, source: int, kind: int, round_: int, hop: int) -> None:
    model = ctx.model
    t = ctx.comm.recv_blocks(source, kind=kind, round=round_, hop=hop)
    ids = [int(b) for b in t.block_ids]
    if any(b < 0 or b >= model.n_blocks for b in ids):
        raise ValueError(f"rank {ctx.comm.rank}: block ids {ids} out of range")
    stale = [b for b, v in zip(ids, t.versions, strict=True) if v < model.versions[b]]
    if stale:
        raise ValueError(
            f"rank {ctx.comm.rank}: received older versions of blocks {stale} than it holds "
            f"(round {round_}, hop {hop} from rank {source})"
        )
    unflatten(model, ids, t.payload, t.block_nbytes)
    model.versions[ids] = t.versions


def run(ctx: Context) -> None:
    """Run ``train.rounds`` rounds of Snake Learning P2P on this rank (one node of the ring)."""
    cfg, comm, model, rec = ctx.cfg, ctx.comm, ctx.model, ctx.record
    n, node = comm.size, comm.rank
    last = n - 1
    plan = plan_segments(model, cfg.snake, n)
    ctx.info["owners"] = block_owners(plan, model.n_blocks)
    ctx.info["plan"] = plan
    mine = plan[node]
    rounds = cfg.train.rounds
    for r in range(rounds):
        rec.begin_round(r)
        if node > 0:
            _receive(ctx, comm.pred, KIND_MODEL, r, node - 1)
        elif r > 0:
            _receive(ctx, comm.pred, KIND_MODEL, r - 1, last)
        t0 = time.perf_counter()
        res = train_local(
            model, mine, ctx.data.x_train, ctx.data.y_train, cfg=cfg.train, generator=ctx.generator
        )
        model.versions[mine] = stamp(r, node, n)
        rec.add("compute_s", time.perf_counter() - t0)
        rec.add("samples", res.samples)
        rec.add("steps", res.steps)
        rec.trained(
            loss=res.loss,
            trainable_params=res.trainable_params,
            train_state_bytes=res.train_state_bytes,
        )
        if node == last:
            t0 = time.perf_counter()
            loss, acc = evaluate(
                model, ctx.data.x_test, ctx.data.y_test, batch_size=cfg.train.eval_batch_size
            )
            rec.add("eval_s", time.perf_counter() - t0)
            rec.evaluated(accuracy=acc, loss=loss)
        if not (r == rounds - 1 and node == last):
            dest = comm.succ
            ids = blocks_to_send(model.versions, last_stamp(dest, node, r, n), cfg.snake.transfer)
            _send(ctx, dest, KIND_MODEL, r, node, ids)
        if node == 0 and r < rounds - 1:  # before the round-end gather, see Comm.expect
            wrap = expected_wrap_blocks(model.versions, plan, r, cfg.snake.transfer)
            nbytes = sum(block_nbytes(model, b) for b in wrap)
            comm.expect(comm.pred, kind=KIND_MODEL, round=r, hop=last, payload_bytes=nbytes)
        rec.end_round()
    if cfg.snake.final_sync:
        final_sync(ctx, rounds)


def final_sync(ctx: Context, rounds: int) -> None:
    """Pass the final model on from the last node round the ring, so every rank holds it.

    Hop k goes from node ``(last + k) % N`` to the next; each carries what the receiver lacks.
    Bytes are counted by comm as usual and reported under ``final_sync`` (not in a round).
    """
    comm, model = ctx.comm, ctx.model
    n, node = comm.size, comm.rank
    last = n - 1
    comm.stats.take()
    r = rounds - 1
    if node != last:
        sender = comm.pred
        _receive(ctx, sender, KIND_SYNC, r, sender)
    if comm.succ != last:
        dest = comm.succ
        receiver_stamp = stamp(r, dest, n)  # every receiver's last turn was in the last round
        _send(
            ctx,
            dest,
            KIND_SYNC,
            r,
            node,
            blocks_to_send(model.versions, receiver_stamp, ctx.cfg.snake.transfer),
        )
    ctx.info["final_sync"] = comm.stats.take()
