"""What every scheme does the same way: move model blocks through ``ctx.hops`` and evaluate."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from typing import NoReturn

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
from snake_mpi.transport.wire import Transfer


def send_blocks(
    ctx: Context, dest: int, kind: int, round_: int, hop: int, ids: Sequence[int]
) -> None:
    """Send blocks ``ids`` of ``ctx.model`` (state and versions) to ``dest`` as one transfer;
    the seconds spent packing them (0 when the block buffers go as they are) in ``pack_s``."""
    ctx.record.add("pack_s", ctx.hops.send(ctx.model, dest, kind, round_, hop, ids))


def post_blocks(
    ctx: Context,
    source: int,
    kind: int,
    round_: int,
    hop: int,
    ids: Sequence[int],
    *,
    into_model: bool = True,
) -> None:
    """Post the receive of transfer ``(kind, round_, hop)`` of blocks ``ids`` from ``source``
    now (``Hops.post``), completed by a later ``receive_blocks`` of it. ``into_model``: the
    blocks land in ``ctx.model``'s own block buffers where its hops are in place, else in a
    transfer buffer."""
    ctx.hops.post(ctx.model, source, kind, round_, hop, ids, into_model=into_model)


def receive_transfer(ctx: Context, source: int, kind: int, round_: int, hop: int) -> Transfer:
    """Receive one transfer of model blocks into a transfer buffer (not into ``ctx.model``:
    e.g. an update to average); its block ids are checked against the model."""
    return ctx.hops.receive_transfer(ctx.model, source, kind, round_, hop)


def receive_blocks(ctx: Context, source: int, kind: int, round_: int, hop: int) -> list[int]:
    """Receive blocks into ``ctx.model`` (state and versions); older versions than this rank
    holds end the job. The seconds spent copying the payload into the model (0 when it landed
    there) in ``pack_s``."""
    ids, unpack_s = ctx.hops.receive(ctx.model, source, kind, round_, hop)
    ctx.record.add("pack_s", unpack_s)
    return ids


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
    raise e  # LocalComm.abort raises; Comm.abort never returns


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
    swap = ctx.frozen.turn(ctx.model, trainable) if ctx.frozen else contextlib.nullcontext()
    try:
        with swap:  # snake.frozen_weights: the masters stand in for their int8 blocks
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
