"""What every scheme does the same way: move model blocks through ``ctx.comm`` and evaluate."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import NoReturn

import numpy as np

from snake_mpi.blocks import BlockModel
from snake_mpi.context import Context
from snake_mpi.train import (
    KDSpec,
    NonFiniteLoss,
    TurnOptions,
    evaluate,
    evaluate_detail,
    label_log_prior,
    round_lr,
    train_local,
    turn_batch_sizes,
)
from snake_mpi.transport.wire import Transfer, TransferSpec


def send_blocks(
    ctx: Context, dest: int, kind: int, round_: int, hop: int, ids: Sequence[int]
) -> None:
    """Send blocks ``ids`` of ``ctx.model`` (state and versions) to ``dest`` as one transfer;
    the seconds spent packing them (0 when the block buffers go as they are) in ``pack_s``."""
    model = ctx.model
    ids = list(ids)
    plan = ctx.hop.plan(ctx.comm, model, dest, ids)
    if plan is not None:  # the block buffers, with requests made once (nothing to pack)
        plan.send_blocks(kind, round_, hop, model.versions[ids].tolist())
        return
    t0 = time.perf_counter()
    payload, sizes = ctx.hop.pack(model, ids)
    ctx.record.add("pack_s", time.perf_counter() - t0)
    ctx.comm.send_blocks(
        dest,
        Transfer(
            kind=kind,
            round=round_,
            hop=hop,
            block_ids=np.asarray(ids, dtype=np.int64),
            versions=model.versions[ids],
            block_nbytes=sizes,
            payload=payload,
        ),
    )


def expect_planned(
    ctx: Context, source: int, kind: int, round_: int, hop: int, ids: Sequence[int]
) -> bool:
    """Post the receive of transfer ``(kind, round_, hop)`` of blocks ``ids`` from ``source``
    now, landing in ``ctx.model``'s own block buffers, by the rank's ``HopPlan`` for these
    blocks (completed by a later ``receive_blocks``, as ``Comm.expect``'s are); False where it
    has none: then post it with ``ctx.comm.expect``."""
    plan = ctx.hop.plan(ctx.comm, ctx.model, source, ids, receive=True)
    if plan is None:
        return False
    plan.expect(kind, round_, hop)
    return True


def receive_transfer(
    ctx: Context, source: int, kind: int, round_: int, hop: int, *, into_model: bool = False
) -> Transfer:
    """Receive one transfer of model blocks and check its block ids against the model.
    ``into_model``: the blocks land in ``ctx.model``'s own block buffers where its hops are
    in place (``HopBuffers.in_place``), else in a transfer buffer."""
    into = ctx.hop.into(ctx.model) if into_model else None
    spec = TransferSpec(kind, round_, hop, alloc=ctx.hop.alloc, into=into)
    t = ctx.comm.recv_blocks(source, spec)
    n = ctx.model.n_blocks
    if any(b < 0 or b >= n for b in t.block_ids.tolist()):
        raise ValueError(
            f"rank {ctx.comm.rank}: block ids {t.block_ids.tolist()} out of range (model has {n})"
        )
    return t


def receive_blocks(ctx: Context, source: int, kind: int, round_: int, hop: int) -> list[int]:
    """Receive blocks into ``ctx.model`` (state and versions); refuse older versions (which
    end the job: where the bytes land in the model's own buffers they are there already). The
    seconds spent copying the payload into the model (0 when it landed there) in ``pack_s``."""
    model = ctx.model
    plan = ctx.comm.take_plan(source, kind, round_, hop)
    if plan is not None:  # posted by expect_planned: the blocks land in their buffers
        ids = list(plan.ids)
        versions = plan.receive(kind, round_, hop)
        _refuse_stale(ctx, source, round_, hop, ids, versions)
        model.versions[ids] = versions
        return ids
    t = receive_transfer(ctx, source, kind, round_, hop, into_model=True)
    ids = t.block_ids.tolist()
    _refuse_stale(ctx, source, round_, hop, ids, t.versions.tolist())
    if not isinstance(t.payload, list):  # else it landed in the blocks: nothing to copy
        t0 = time.perf_counter()
        ctx.hop.unpack(model, ids, t.payload, t.block_nbytes)
        ctx.record.add("pack_s", time.perf_counter() - t0)
    model.versions[ids] = t.versions
    return ids


def _refuse_stale(
    ctx: Context, source: int, round_: int, hop: int, ids: list[int], versions: list[int]
) -> None:
    """End the job where a hop brings an older version of a block than this rank holds."""
    held = ctx.model.versions[ids].tolist()
    stale = [b for b, v, h in zip(ids, versions, held, strict=True) if v < h]
    if stale:
        raise ValueError(
            f"rank {ctx.comm.rank}: received older versions of blocks {stale} than it holds "
            f"(round {round_}, hop {hop} from rank {source})"
        )


def evaluate_and_record(ctx: Context, model: BlockModel | None = None) -> None:
    """Evaluate ``model`` (default: ``ctx.model``) on the test set; record time and result,
    with the accuracy per class of a classifier (where label skew shows)."""
    t0 = time.perf_counter()
    e = evaluate_detail(
        model if model is not None else ctx.model,
        ctx.data.x_test,
        ctx.data.y_test,
        batch_size=ctx.cfg.train.eval_batch_size,
        n_classes=ctx.record.n_classes,
    )
    ctx.record.add("eval_s", time.perf_counter() - t0)
    ctx.record.evaluated(accuracy=e.accuracy, loss=e.loss, class_accuracy=e.class_accuracy)


def evaluate_turn(ctx: Context) -> None:
    """``eval.after_each_turn``: the test accuracy of ``ctx.model`` right after this rank's
    turn, before it is handed on (``/rounds/turn_accuracy``; time in ``eval_s``)."""
    t0 = time.perf_counter()
    _loss, acc = evaluate(
        ctx.model, ctx.data.x_test, ctx.data.y_test, batch_size=ctx.cfg.train.eval_batch_size
    )
    ctx.record.add("eval_s", time.perf_counter() - t0)
    ctx.record.turn_evaluated(acc)


def slowdown(ctx: Context, compute_s: float) -> None:
    """Emulated weak device: stretch ``compute_s`` by this rank's ``emulate.slowdown`` factor,
    sleeping the difference, recorded apart as ``slowdown_s``."""
    factors = ctx.cfg.emulate.slowdown
    if factors and factors[ctx.comm.rank] > 1:
        extra = (factors[ctx.comm.rank] - 1.0) * compute_s
        time.sleep(extra)
        ctx.record.add("slowdown_s", extra)


def abort_non_finite(ctx: Context, e: NonFiniteLoss) -> NoReturn:
    """End the job: a NaN or infinite loss makes every later figure meaningless."""
    r = ctx.record.round
    ctx.comm.abort(
        f"{e} of its turn in round {r + 1} of {ctx.cfg.train.rounds}: training diverged "
        "(check that the features are finite and scaled, and train.lr)"
    )
    raise e  # LocalComm.abort raises; comm.Comm.abort never returns


def turn_options(ctx: Context, *, logit_adjust: float = 0.0, prox_mu: float = 0.0) -> TurnOptions:
    """This rank's turn options in the current round: the round's learning rate, and logit
    adjustment with its own label prior (classification only) and the proximal term as asked."""
    shift = None
    if logit_adjust > 0 and ctx.cfg.model.family != "lm":
        shift = logit_adjust * label_log_prior(ctx.data.y_train, ctx.cfg.data.n_classes)
    return TurnOptions(
        logit_shift=shift,
        prox_mu=prox_mu,
        lr=round_lr(ctx.cfg.train, max(ctx.record.round, 0)),
    )


def train_and_record(
    ctx: Context,
    trainable: Sequence[int],
    kd: KDSpec | None = None,
    options: TurnOptions | None = None,
) -> None:
    """One turn of local training of blocks ``trainable`` on this rank's shard, recorded;
    ``options`` default to the round's learning rate alone (``turn_options``)."""
    t0 = time.perf_counter()
    try:
        res = train_local(
            ctx.model,
            trainable,
            ctx.data.x_train,
            ctx.data.y_train,
            cfg=ctx.cfg.train,
            generator=ctx.generator,
            augment=ctx.data.augment,
            kd=kd,
            options=options if options is not None else turn_options(ctx),
            on_step=ctx.record.step_reporter(
                len(turn_batch_sizes(len(ctx.data.x_train), ctx.cfg.train))
            ),
        )
    except NonFiniteLoss as e:
        abort_non_finite(ctx, e)
    rec = ctx.record
    compute_s = time.perf_counter() - t0
    rec.add("compute_s", compute_s)
    slowdown(ctx, compute_s)
    rec.add("samples", res.samples)
    rec.add("steps", res.steps)
    rec.trained(
        loss=res.loss,
        kd_loss=res.kd_loss,
        trainable_params=res.trainable_params,
        train_state_bytes=res.train_state_bytes,
    )
    if ctx.cfg.eval.after_each_turn:
        evaluate_turn(ctx)
