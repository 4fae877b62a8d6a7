"""The per-batch exchange of split learning, shared by ``split`` and ``splitfed``.

Clients hold blocks ``0 .. cut-1``, the server (rank 0) the rest. Per batch the client sends
the cut activations and the labels (one transfer, two parts), the server computes the loss,
updates its blocks and returns the gradient at the cut (one transfer), and the client finishes
its backward pass and updates its blocks. Optimisers live for one client turn, as everywhere
in this project (``train.optimizer``): state only while a part trains.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from snake_mpi.blocks import (
    BlockModel,
    model_bytes_held,
    model_device,
    optimizer_state_bytes,
    set_trainable,
    training_state_bytes,
)
from snake_mpi.config import RunConfig
from snake_mpi.context import Context
from snake_mpi.schemes.common import abort_non_finite, slowdown
from snake_mpi.train import (
    NonFiniteLoss,
    checked_loss,
    make_optimizer,
    round_lr,
    synchronize,
    turn_batch_sizes,
    turn_batches,
)
from snake_mpi.transport.wire import KIND_ACTIVATION, KIND_GRADIENT, Transfer, TransferSpec

PART_ACTIVATION, PART_LABELS = 0, 1


def cut_shape(model: BlockModel, cut: int, sample_shape: Sequence[int]) -> tuple[int, ...]:
    """Shape of one sample's activation at the cut (output of block ``cut - 1``)."""
    x = torch.zeros((1, *sample_shape), device=model_device(model))
    was = [m.training for m in model.blocks]
    model.eval()
    with torch.no_grad():
        for b in range(cut):
            x = model.blocks[b](x)
    for m, t in zip(model.blocks, was, strict=True):
        m.train(t)
    return tuple(x.shape[1:])


def activation_bytes_per_sample(shape: Sequence[int], dtype: torch.dtype = torch.float32) -> int:
    """Bytes of one sample's cut activation."""
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def steps_of(cfg: RunConfig, n_samples: int) -> int:
    """Batches a client with ``n_samples`` samples takes per turn (the server counts them)."""
    return len(turn_batch_sizes(n_samples, cfg.train))


def _bytes_of(t: torch.Tensor) -> np.ndarray:
    """A tensor's bytes in host memory (activations and gradients travel from the host on
    every device: they are made and used once, so there is nothing to keep on the GPU)."""
    return t.detach().contiguous().cpu().numpy().reshape(-1).view(np.uint8)


@dataclass
class ClientTurn:
    """A client's turn: its blocks' optimiser and the batches it will take."""

    ctx: Context
    cut: int
    round: int

    def run(self) -> None:
        """Train the client part over this turn's batches against the server; recorded."""
        ctx, cut, r = self.ctx, self.cut, self.round
        comm, model = ctx.comm, ctx.model
        params = set_trainable(model, range(cut))
        opt = make_optimizer(params, ctx.cfg.train, round_lr(ctx.cfg.train, r))
        compute_s, samples, steps = 0.0, 0, 0
        x_all, y_all = ctx.data.x_train, ctx.data.y_train
        dev = model_device(model)
        on_step = ctx.record.step_reporter(len(turn_batch_sizes(len(x_all), ctx.cfg.train)))
        for step, idx in enumerate(turn_batches(len(x_all), ctx.cfg.train, ctx.generator)):
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            x, y = x_all[idx], y_all[idx]
            if ctx.data.augment is not None:
                x = ctx.data.augment(x, ctx.generator)
            x = x.to(dev)
            for b in range(cut):
                x = model.blocks[b](x)
            act = x
            synchronize(model)
            compute_s += time.perf_counter() - t0
            a_bytes, y_bytes = _bytes_of(act), _bytes_of(y)
            comm.send_blocks(
                0,
                Transfer(
                    kind=KIND_ACTIVATION,
                    round=r,
                    hop=step,
                    block_ids=np.array([PART_ACTIVATION, PART_LABELS], dtype=np.int64),
                    versions=np.array([step, step], dtype=np.int64),
                    block_nbytes=np.array([a_bytes.nbytes, y_bytes.nbytes], dtype=np.int64),
                    payload=np.concatenate([a_bytes, y_bytes]),
                ),
            )
            t = comm.recv_blocks(0, TransferSpec(KIND_GRADIENT, r, step))
            t0 = time.perf_counter()
            grad = torch.from_numpy(t.payload.copy()).view(act.dtype).view(act.shape).to(dev)
            act.backward(grad)
            opt.step()
            synchronize(model)
            compute_s += time.perf_counter() - t0
            samples += len(idx)
            steps += 1
            on_step(steps)
        state = training_state_bytes(model, opt)["total"]
        opt.zero_grad(set_to_none=True)
        set_trainable(model, [])
        rec = ctx.record
        rec.add("compute_s", compute_s)
        slowdown(ctx, compute_s)
        rec.add("samples", samples)
        rec.add("steps", steps)
        rec.trained(
            loss=math.nan,  # the loss is computed on the server
            trainable_params=sum(p.numel() for p in params),
            train_state_bytes=state,
        )


class ServerPart:
    """The server's blocks (``cut ..``) as trained against one client at a time."""

    def __init__(self, ctx: Context, cut: int, blocks: Sequence[nn.Module]) -> None:
        self.ctx, self.cut, self.blocks = ctx, cut, list(blocks)
        self.act_shape = cut_shape(ctx.model, cut, ctx.cfg.data.sample_shape)
        self.loss_sum, self.samples, self.steps, self.compute_s = 0.0, 0, 0, 0.0
        self.state_bytes = 0
        self.opt: torch.optim.Optimizer | None = None

    def begin_turn(self) -> None:
        """A fresh optimiser over the server blocks for one client's turn."""
        params = []
        for m in self.blocks:
            m.train(True)
            for p in m.parameters():
                p.requires_grad_(True)
                params.append(p)
        self.opt = make_optimizer(
            params, self.ctx.cfg.train, round_lr(self.ctx.cfg.train, self.ctx.record.round)
        )

    def serve_step(self, client: int, r: int, step: int) -> None:
        """Receive one batch's activations from ``client``, update, return the cut gradient."""
        comm = self.ctx.comm
        t = comm.recv_blocks(client, TransferSpec(KIND_ACTIVATION, r, step))
        a_nbytes, y_nbytes = (int(v) for v in t.block_nbytes)
        t0 = time.perf_counter()
        n = y_nbytes // 8
        act = torch.from_numpy(t.payload[:a_nbytes].copy()).view(torch.float32)
        dev = model_device(self.ctx.model)
        act = act.view(n, *self.act_shape).to(dev).requires_grad_(True)
        y = torch.from_numpy(t.payload[a_nbytes:].copy()).view(torch.int64).to(dev)
        assert self.opt is not None
        self.opt.zero_grad(set_to_none=True)
        x = act
        for m in self.blocks:
            x = m(x)
        loss = F.cross_entropy(x, y)
        try:
            value = checked_loss(loss, self.steps)
        except NonFiniteLoss as e:
            abort_non_finite(self.ctx, e)
        loss.backward()
        self.opt.step()
        assert act.grad is not None  # a leaf that requires grad, after backward
        grad = _bytes_of(act.grad)  # a copy to the host: waits for the step's kernels
        self.compute_s += time.perf_counter() - t0
        self.loss_sum += value * n
        self.samples += n
        self.steps += 1
        comm.send_blocks(
            client,
            Transfer(
                kind=KIND_GRADIENT,
                round=r,
                hop=step,
                block_ids=np.array([PART_ACTIVATION], dtype=np.int64),
                versions=np.array([step], dtype=np.int64),
                block_nbytes=np.array([grad.nbytes], dtype=np.int64),
                payload=grad,
            ),
        )

    def extra_state_bytes(self) -> int:
        """Bytes this part holds beyond the server's model: gradients and optimiser state, and
        its own weights when it is a copy (SplitFed keeps one per client)."""
        params = [p for m in self.blocks for p in m.parameters()]
        own = self.blocks[0] is not self.ctx.model.blocks[self.cut]
        weights = sum(p.numel() * p.element_size() for p in params) if own else 0
        grads = sum(p.grad.numel() * p.grad.element_size() for p in params if p.grad is not None)
        optim = optimizer_state_bytes(self.opt) if self.opt is not None else 0
        return weights + grads + optim

    def end_turn(self) -> None:
        """Note the state held at the end of the turn; drop gradients and the optimiser."""
        assert self.opt is not None
        self.state_bytes = max(self.state_bytes, self.extra_state_bytes())
        self.opt.zero_grad(set_to_none=True)
        self.opt = None
        for m in self.blocks:
            m.train(False)
            for p in m.parameters():
                p.requires_grad_(False)


def record_server(ctx: Context, parts: Sequence[ServerPart]) -> None:
    """Put the round's server-side figures (over all its parts) into the recorder."""
    rec = ctx.record
    samples = sum(p.samples for p in parts)
    rec.add("compute_s", sum(p.compute_s for p in parts))
    rec.add("samples", samples)
    rec.add("steps", sum(p.steps for p in parts))
    rec.trained(
        loss=sum(p.loss_sum for p in parts) / max(samples, 1),
        trainable_params=sum(q.numel() for m in parts[0].blocks for q in m.parameters()),
        train_state_bytes=model_bytes_held(ctx.model) + sum(p.state_bytes for p in parts),
    )
