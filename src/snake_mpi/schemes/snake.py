"""Snake Learning: the model visits the nodes in turn; each node trains only its segment of
middle blocks (plus the ends, per policy) on its own data. Peer-to-peer (``p2p``): a node hands
the next node on the ring the blocks it lacks (``delta``) or the whole model (``full``).
Client-server (``cs``): a controller (rank 0) hands each node in turn what it lacks and gets
back only the blocks the node trained.

Versions: when node ``i`` trains in round ``r`` it stamps its blocks with ``r * N + i + 1``.
A node that last held the model at stamp ``s`` lacks exactly the blocks with version > ``s``.

Storage (``snake.keep``): ``all`` — a node keeps the whole model between turns; ``own`` — once
it has handed the model (P2P) or its update (CS) on, a node frees every block it does not train,
so at rest it holds its own blocks only, and each later hop to it also carries every block it
freed. The P2P run's last turn hands nothing on, so that node keeps the final model; the CS
controller always holds the whole model. The training math is the same under both.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from snake_mpi import assign
from snake_mpi.blocks import (
    BlockModel,
    block_params,
    release_blocks,
    released_blocks,
)
from snake_mpi.checkpoint import CheckpointStop
from snake_mpi.config import RunConfig, SnakeConfig
from snake_mpi.context import Context, FinalSync
from snake_mpi.probes.memory import release_free_memory
from snake_mpi.schemes.capability import measure_in_turn
from snake_mpi.schemes.common import (
    evaluate_and_record,
    post_blocks,
    receive_blocks,
    send_blocks,
    train_and_record,
    turn_options,
)
from snake_mpi.schemes.frozen import FrozenInt8, relay_blocks
from snake_mpi.train import KDSpec, TurnOptions
from snake_mpi.transport.wire import KIND_MODEL, KIND_SYNC, KIND_UPDATE

OWNER_ALL = -1
OWNER_NONE = -2


def plan_segments(
    model: BlockModel,
    cfg: SnakeConfig,
    n_nodes: int,
    *,
    costs: Sequence[float] | None = None,
    capabilities: Sequence[float] | None = None,
) -> list[list[int]]:
    """Trainable block ids of every node: its segment of middle blocks, plus the ends by policy."""
    params = [block_params(model, b) for b in range(model.n_blocks)]
    return plan_from_params(params, cfg, n_nodes, costs=costs, capabilities=capabilities)


def plan_for_run(ctx: Context, nodes: Sequence[int]) -> list[list[int]]:
    """The plan of this run over the node ranks ``nodes``: by declared capabilities, or by
    measuring every rank's block times now (``snake.capability = "measure"``); the figures
    used (and the measurement's spread) are put in ``ctx.report`` for the result file."""
    cfg = ctx.cfg.snake
    report = ctx.report
    if cfg.capability == "measure" and report.block_time_s is not None:  # resumed: as then
        times = np.asarray(report.block_time_s)
        node_times = times[list(nodes)][:, ctx.model.middle_ids]
        caps = [float(c) for c in report.capabilities or ()]
        costs = list(node_times.mean(axis=0))
        return plan_segments(ctx.model, cfg, len(nodes), costs=costs, capabilities=caps)
    if cfg.capability != "measure":
        caps = list(cfg.capabilities) or [1.0] * len(nodes)
        report.capabilities = caps
        return plan_segments(ctx.model, cfg, len(nodes))
    nb = ctx.model.n_blocks
    table = ctx.comm.allgather_row(np.concatenate(measure_in_turn(ctx)), "the block times")
    times, spread = table[:, :nb], table[:, nb:]  # (ranks, blocks) each
    mids = ctx.model.middle_ids
    node_times = times[list(nodes)][:, mids]
    costs = node_times.mean(axis=0)
    totals = node_times.sum(axis=1)
    caps = [float(c) for c in totals.mean() / totals]
    report.capabilities = caps
    report.block_time_s = times  # exactly what the plan used (expected.py rebuilds it)
    report.block_time_spread = spread
    return plan_segments(ctx.model, cfg, len(nodes), costs=list(costs), capabilities=caps)


def plan_from_params(
    block_params_: Sequence[int],
    cfg: SnakeConfig,
    n_nodes: int,
    *,
    costs: Sequence[float] | None = None,
    capabilities: Sequence[float] | np.ndarray | None = None,
) -> list[list[int]]:
    """``plan_segments`` from the blocks' parameter counts alone (e.g. a result's block table);
    ``costs`` (per middle block) and ``capabilities`` (per node) replace the configured ones
    (``snake.capability = "measure"``)."""
    n_blocks = len(block_params_)
    mids = list(range(1, n_blocks - 1))
    if costs is not None:
        costs = [float(c) for c in costs]
    elif cfg.block_cost == "params":
        costs = [float(block_params_[b]) for b in mids]
    else:
        costs = [1.0] * len(mids)
    caps = list(capabilities if capabilities is not None else cfg.capabilities) or [1.0] * n_nodes
    segments = assign.partition_blocks(costs, caps)
    stem, head = 0, n_blocks - 1
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


def kd_spec(cfg: RunConfig) -> KDSpec | None:
    """The turn's distillation, or None when ``snake.kd.weight`` is 0."""
    kd = cfg.snake.kd
    return KDSpec(kd.weight, kd.temperature) if kd.weight > 0 else None


def snake_options(ctx: Context) -> TurnOptions:
    """A node's turn options: ``snake.logit_adjust`` and ``snake.prox_mu`` (no traffic: the
    prior is the node's own labels, the proximal anchor the model as received)."""
    c = ctx.cfg.snake
    return turn_options(ctx, logit_adjust=c.logit_adjust, prox_mu=c.prox_mu)


def stamp(round_: int, node: int, n_nodes: int) -> int:
    """Version given to blocks that ``node`` trains in ``round_``."""
    return round_ * n_nodes + node + 1


def last_stamp(receiver: int, sender: int, round_: int, n_nodes: int) -> int:
    """Stamp of the receiver's latest turn before ``sender``'s hop in ``round_`` (0: never)."""
    r = round_ if receiver <= sender else round_ - 1
    return stamp(r, receiver, n_nodes) if r >= 0 else 0


def blocks_to_send(
    versions: np.ndarray, receiver_stamp: int, transfer: str, freed: Sequence[int] = ()
) -> list[int]:
    """Blocks a hop carries: all (``full``), or those newer than the receiver's copy plus those
    the receiver freed after its last turn (``delta``; ``freed``: see ``freed_blocks``)."""
    if transfer == "full":
        return list(range(len(versions)))
    lacks = versions > receiver_stamp
    lacks[list(freed)] = True
    return [int(b) for b in np.flatnonzero(lacks)]


def freed_blocks(own: Sequence[int], n_blocks: int, keep: str, has_trained: bool) -> list[int]:
    """Blocks a node does not hold between turns: with ``keep = "own"``, once it has had a turn,
    every block it does not train; none with ``keep = "all"`` or before its first turn."""
    if keep != "own" or not has_trained:
        return []
    mine = set(own)
    return [b for b in range(n_blocks) if b not in mine]


def expected_hop_blocks(
    versions: np.ndarray,
    plan: Sequence[Sequence[int]],
    receiver: int,
    round_: int,
    transfer: str,
    keep: str,
) -> list[int]:
    """Blocks node ``receiver`` will get in its next receive, known right after its own turn
    in ``round_`` (``versions``: its model then): node 0 the wrap from node N-1 at the end of
    ``round_``, any other node the hop from its predecessor in round ``round_ + 1``. Every node
    between the two turns trains its segment in ring order; the hop carries what is newer than
    the receiver's copy (and, with ``keep = "own"``, what it freed)."""
    n = len(plan)
    later = [(round_, j) for j in range(receiver + 1, n)]
    if receiver > 0:
        later += [(round_ + 1, j) for j in range(receiver)]
    predicted = versions.copy()
    for r, j in later:
        predicted[list(plan[j])] = stamp(r, j, n)
    freed = freed_blocks(plan[receiver], len(versions), keep, True)
    return blocks_to_send(predicted, stamp(round_, receiver, n), transfer, freed)


def keep_own(ctx: Context, own: Sequence[int]) -> None:
    """With ``snake.keep = "own"``: free every block this node does not train (it has handed the
    model or its update on) and hand the freed pages back to the OS, so its RSS shows it too."""
    freed = freed_blocks(own, ctx.model.n_blocks, ctx.cfg.snake.keep, True)
    if freed:
        release_blocks(ctx.model, freed)
        release_free_memory()


def check_whole(ctx: Context) -> None:
    """Refuse to train on a model with blocks freed and not received again (a protocol bug)."""
    missing = released_blocks(ctx.model)
    if missing:
        raise ValueError(
            f"rank {ctx.comm.rank}: blocks {missing} were freed after its last turn and not "
            f"received again before this one (round {ctx.record.round})"
        )


def int8_build_layers(
    cfg: RunConfig, world_size: int, rank: int
) -> tuple[frozenset[int], frozenset[int]] | None:
    """The decoder layers this rank builds as int8 and those it keeps a copy of
    (``models.lm.build``'s ``int8_layers``), from the plan the scheme will make, so the whole
    full-precision model never exists at once; None where the build cannot know it (the
    option off, a checkpoint loaded whole, a plan from measured speeds): the scheme then
    quantises the built model."""
    c = cfg.snake
    if (
        cfg.scheme != "snake"
        or c.frozen_weights != "int8"
        or cfg.model.family != "lm"
        or cfg.model.checkpoint
        or c.capability == "measure"
    ):
        return None
    from snake_mpi.models.lm import count_params

    n_nodes, node = (world_size, rank) if c.mode == "p2p" else (world_size - 1, rank - 1)
    params = count_params(cfg.model)["params"]
    plan = plan_from_params(params, c, n_nodes)
    relay = relay_blocks(block_owners(plan, len(params)), len(params))
    own = set(plan[node]) if node >= 0 else set()
    return frozenset(b - 1 for b in relay), frozenset(b - 1 for b in relay if b in own)


def hold_frozen(ctx: Context, owners: np.ndarray, own: Sequence[int]) -> None:
    """With ``snake.frozen_weights = "int8"``: hold the blocks fewer than two nodes train as
    int8 from now on, keeping full-precision copies of this node's own (``own``)."""
    if ctx.cfg.snake.frozen_weights == "int8":
        ctx.frozen = FrozenInt8(ctx.model, relay_blocks(owners, ctx.model.n_blocks), own)


def run(ctx: Context) -> None:
    """Run ``train.rounds`` rounds of Snake Learning on this rank, in the configured mode."""
    if ctx.cfg.snake.mode == "cs":
        run_cs(ctx)
    else:
        run_p2p(ctx)


def run_p2p(ctx: Context) -> None:
    """Peer-to-peer: this rank is node ``rank`` of the ring; the model hops node to node."""
    cfg, comm, model, rec = ctx.cfg, ctx.comm, ctx.model, ctx.record
    n, node = comm.size, comm.rank
    last = n - 1
    plan = plan_for_run(ctx, range(n))
    ctx.report.owners = block_owners(plan, model.n_blocks)
    ctx.report.plan = plan
    mine = plan[node]
    hold_frozen(ctx, ctx.report.owners, mine)
    rounds, transfer, keep = cfg.train.rounds, cfg.snake.transfer, cfg.snake.keep
    nb = model.n_blocks
    for r in range(ctx.checkpoint.first_round, rounds):
        rec.begin_round(r)
        if node > 0:
            receive_blocks(ctx, comm.pred, KIND_MODEL, r, node - 1)
        elif r > 0 and not ctx.checkpoint.carried_in(r - 1):
            receive_blocks(ctx, comm.pred, KIND_MODEL, r - 1, last)
        check_whole(ctx)
        train_and_record(ctx, mine, kd_spec(cfg), snake_options(ctx))
        model.versions[mine] = stamp(r, node, n)
        if node == last:
            evaluate_and_record(ctx)
        if not (r == rounds - 1 and node == last):
            dest = comm.succ
            held = last_stamp(dest, node, r, n)
            freed = freed_blocks(plan[dest], nb, keep, held > 0)
            ids = blocks_to_send(model.versions, held, transfer, freed)
            send_blocks(ctx, dest, KIND_MODEL, r, node, ids)
            keep_own(ctx, mine)  # handed on
        if r < rounds - 1 and (node == 0 or keep == "all"):
            # post this node's next receive now, so the hop lands while this node still
            # gathers the round's figures (node 0: must, before the gather, see Comm.post);
            # the staged or device buffer, or the model's blocks, are free until then (with
            # keep = "own" a freed block would be allocated early: a transfer buffer then)
            nxt = expected_hop_blocks(model.versions, plan, node, r, transfer, keep)
            r_in, hop_in = (r, last) if node == 0 else (r + 1, node - 1)
            post_blocks(ctx, comm.pred, KIND_MODEL, r_in, hop_in, nxt, into_model=keep == "all")
        rec.end_round()
        wrap_in = None
        if node == 0 and r < rounds - 1:

            def wrap_in(r: int = r) -> None:
                receive_blocks(ctx, comm.pred, KIND_MODEL, r, last)

        try:
            ctx.checkpoint.boundary(ctx, r, carry_in=wrap_in)
        except CheckpointStop:  # the hop posted ahead will not come
            ctx.hops.cancel()
            raise
    if cfg.snake.final_sync:
        final_sync(ctx, rounds)


def run_cs(ctx: Context) -> None:
    """Client-server: rank 0 is the controller (holds the model, does not train); node ``k`` is
    rank ``k + 1``. In turn, each node gets from the controller the blocks it lacks, trains its
    segment, and returns only the blocks it trained. The controller evaluates each round."""
    cfg, comm, model, rec = ctx.cfg, ctx.comm, ctx.model, ctx.record
    n_nodes = comm.size - 1
    plan = plan_for_run(ctx, range(1, n_nodes + 1))
    owners = block_owners(plan, model.n_blocks)
    ctx.report.owners = np.where(owners >= 0, owners + 1, owners)  # as ranks
    ctx.report.plan = plan
    hold_frozen(ctx, owners, plan[comm.rank - 1] if comm.rank > 0 else [])
    rounds, transfer, keep = cfg.train.rounds, cfg.snake.transfer, cfg.snake.keep
    nb = model.n_blocks
    for r in range(ctx.checkpoint.first_round, rounds):
        rec.begin_round(r)
        if comm.rank == 0:
            for k in range(n_nodes):
                held = stamp(r - 1, k, n_nodes) if r > 0 else 0  # the node's copy: its last turn
                freed = freed_blocks(plan[k], nb, keep, r > 0)
                ids = blocks_to_send(model.versions, held, transfer, freed)
                send_blocks(ctx, k + 1, KIND_MODEL, r, k, ids)
                got = receive_blocks(ctx, k + 1, KIND_UPDATE, r, k)
                if sorted(got) != sorted(plan[k]):
                    raise ValueError(f"rank 0: node {k} returned blocks {got}, not {plan[k]}")
            evaluate_and_record(ctx)
        else:
            k = comm.rank - 1
            receive_blocks(ctx, 0, KIND_MODEL, r, k)
            check_whole(ctx)
            train_and_record(ctx, plan[k], kd_spec(cfg), snake_options(ctx))
            model.versions[plan[k]] = stamp(r, k, n_nodes)
            send_blocks(ctx, 0, KIND_UPDATE, r, k, plan[k])
            keep_own(ctx, plan[k])  # handed on
        rec.end_round()
        ctx.checkpoint.boundary(ctx, r)
    if cfg.snake.final_sync:
        final_sync_cs(ctx, rounds, n_nodes)


def final_sync_cs(ctx: Context, rounds: int, n_nodes: int) -> None:
    """The controller sends nodes 0..n-2 what they lack of the final model (the last node holds
    it already; with ``keep = "own"`` it freed the rest, so it is sent that too), so every rank
    ends with the whole final model; reported under ``final_sync``."""
    comm, model, cfg = ctx.comm, ctx.model, ctx.cfg.snake
    comm.stats.take()
    r = rounds - 1
    plan = ctx.report.plan or []
    for k in range(n_nodes if cfg.keep == "own" else n_nodes - 1):
        if comm.rank == 0:
            freed = freed_blocks(plan[k], model.n_blocks, cfg.keep, True)
            ids = blocks_to_send(model.versions, stamp(r, k, n_nodes), cfg.transfer, freed)
            send_blocks(ctx, k + 1, KIND_SYNC, r, k, ids)
        elif comm.rank == k + 1:
            receive_blocks(ctx, 0, KIND_SYNC, r, k)
    ctx.report.final_sync = FinalSync.of(comm.stats.take())


def final_sync(ctx: Context, rounds: int) -> None:
    """Pass the final model on from the last node round the ring, so every rank holds it.

    Hop k goes from node ``(last + k) % N`` to the next; each carries what the receiver lacks
    (with ``keep = "own"`` also every block it freed: the last node kept the whole final model,
    and every rank ends holding it). Bytes are counted by comm as usual and reported under
    ``final_sync`` (not in a round).
    """
    comm, model = ctx.comm, ctx.model
    n, node = comm.size, comm.rank
    last = n - 1
    comm.stats.take()
    r = rounds - 1
    if node != last:
        sender = comm.pred
        receive_blocks(ctx, sender, KIND_SYNC, r, sender)
    if comm.succ != last:
        dest = comm.succ
        receiver_stamp = stamp(r, dest, n)  # every receiver's last turn was in the last round
        plan = ctx.report.plan or []
        freed = freed_blocks(plan[dest], model.n_blocks, ctx.cfg.snake.keep, True)
        ids = blocks_to_send(model.versions, receiver_stamp, ctx.cfg.snake.transfer, freed)
        send_blocks(ctx, dest, KIND_SYNC, r, node, ids)
    ctx.report.final_sync = FinalSync.of(comm.stats.take())
