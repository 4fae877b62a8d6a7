"""Measured compute capability: time a few training steps of every block on this rank, so the
assignment can give slower nodes fewer blocks (``snake.capability = "measure"``)."""

from __future__ import annotations

import time

import numpy as np

from snake_mpi.blocks import set_trainable
from snake_mpi.schemes import Context

STEPS = 5
"""Timed steps per block (after one untimed warm-up step); the median is reported."""
BATCH = 64


def measure_in_turn(ctx: Context) -> np.ndarray:
    """``measure_block_times`` on one rank at a time (the others wait at a barrier), so ranks
    that share a host or its cores do not slow each other's measurement."""
    times = np.zeros(ctx.model.n_blocks)
    for k in range(ctx.comm.size):
        if ctx.comm.rank == k:
            times = measure_block_times(ctx)
        ctx.comm.barrier()
    return times


def measure_block_times(ctx: Context, steps: int = STEPS, batch: int = BATCH) -> np.ndarray:
    """Seconds of one forward + backward step of each block, shape (n_blocks,), on a batch of
    this rank's data (the test set's on a rank without training data). The rank's emulated
    slowdown (``emulate.slowdown``) stretches the measurement like any other compute."""
    model = ctx.model
    x = ctx.data.x_train if len(ctx.data.x_train) else ctx.data.x_test
    x = x[:batch]
    times = np.zeros((steps, model.n_blocks))
    set_trainable(model, range(model.n_blocks))
    t_start = time.perf_counter()
    for rep in range(steps + 1):
        h = x
        for b in range(model.n_blocks):
            inp = h.detach().requires_grad_(b > 0)
            t0 = time.perf_counter()
            out = model.blocks[b](inp)
            out.float().sum().backward()
            if rep > 0:
                times[rep - 1, b] = time.perf_counter() - t0
            h = out.detach()
    model.zero_grad(set_to_none=True)
    set_trainable(model, [])
    times = np.median(times, axis=0)
    factors = ctx.cfg.emulate.slowdown
    if factors and factors[ctx.comm.rank] > 1:
        f = factors[ctx.comm.rank]
        time.sleep((f - 1.0) * (time.perf_counter() - t_start))
        times *= f
    return times
