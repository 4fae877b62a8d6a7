"""Measured compute capability: time training steps of every block on every rank, so the
assignment can give slower nodes fewer blocks (``snake.capability = "measure"``).

A timing is only ever lengthened by interference (another job, the OS, a noisy neighbour on a
virtual machine, a sampler thread), so a block's time is the *minimum* over many samples. The
samples are spread out so that no one slow spell can cover all of them: each timed pass steps
every block once, and the ranks take ``ROUNDS`` turns each, one rank at a time (ranks sharing
a host do not slow each other), each turn ``TURN_S`` of passes. So every rank's samples span
the whole measurement, and a slow spell of the host shows in some samples of every rank rather
than in all samples of one. The first turn starts with an untimed warm-up pass. How noisy the
samples were is reported as the spread ``median / min - 1`` per block.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from snake_mpi.blocks import BlockModel, model_device, set_trainable
from snake_mpi.context import Context

ROUNDS = 8
"""Turns per rank; the ranks take them in rotation."""
TURN_S = 0.03
"""A turn makes timed passes until it took this long (at least one, at most ``TURN_PASSES``)."""
TURN_PASSES = 20
MIN_PASSES = 3
"""Timed passes at least; beyond them, a rank whose passes took ``CAP_S`` in all skips its
remaining turns (a large model: ``MIN_PASSES`` passes after the warm-up, not ``ROUNDS``)."""
CAP_S = 5.0
BATCH = 64


def measure_in_turn(ctx: Context) -> tuple[np.ndarray, np.ndarray]:
    """This rank's ``BlockMeter`` result, measured in ``ROUNDS`` rounds of turns: in each
    round every rank in rank order times its blocks while the others wait at a barrier."""
    meter = BlockMeter(ctx)
    for _ in range(ROUNDS):
        for k in range(ctx.comm.size):
            if ctx.comm.rank == k:
                meter.turn()
            ctx.comm.barrier()
    return meter.result()


class BlockMeter:
    """One rank's samples of the seconds of one forward + backward step of each block, on a
    batch of its data (the test set's on a rank without training data). The rank's emulated
    slowdown (``emulate.slowdown``) stretches every turn like any other compute (by sleeping)
    and multiplies the times (not the spread). The model is left as found: frozen, no
    gradients, its buffers (batch-norm statistics) unchanged."""

    def __init__(
        self,
        ctx: Context,
        *,
        turn_s: float = TURN_S,
        turn_passes: int = TURN_PASSES,
        min_passes: int = MIN_PASSES,
        cap_s: float = CAP_S,
        batch: int = BATCH,
    ) -> None:
        self.model = ctx.model
        x = ctx.data.x_train if len(ctx.data.x_train) else ctx.data.x_test
        self.x = x[:batch].to(model_device(self.model))
        factors = ctx.cfg.emulate.slowdown
        self.factor = float(factors[ctx.comm.rank]) if factors else 1.0
        self.turn_s, self.turn_passes = turn_s, turn_passes
        self.min_passes, self.cap_s = min_passes, cap_s
        self.samples: list[np.ndarray] = []
        self.timed_s = 0.0
        # a timed step updates batch-norm statistics as many times as it runs, and how many
        # times depends on the timings: every turn puts them back, so the run stays reproducible
        self.saved = [b.detach().clone() for b in self.model.buffers()]

    def turn(self) -> None:
        """Timed passes for ``turn_s`` (a warm-up pass first, on the first turn)."""
        if len(self.samples) >= self.min_passes and self.timed_s >= self.cap_s:
            return
        model = self.model
        set_trainable(model, range(model.n_blocks))
        t0 = time.perf_counter()
        if not self.samples:
            timed_pass(model, self.x)  # warm-up: allocator, kernel caches, lazy initialisation
        t1 = time.perf_counter()
        for _ in range(self.turn_passes):
            self.samples.append(timed_pass(model, self.x))
            if time.perf_counter() - t1 >= self.turn_s:
                break
        t2 = time.perf_counter()
        self.timed_s += t2 - t1
        model.zero_grad(set_to_none=True)
        set_trainable(model, [])
        with torch.no_grad():
            for buf, saved in zip(model.buffers(), self.saved, strict=True):
                buf.copy_(saved)
        if self.factor > 1:
            time.sleep((self.factor - 1.0) * (t2 - t0))

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """Per block: seconds (the minimum sample, times the slowdown factor) and the spread."""
        times, spread = summarise(np.array(self.samples))
        return times * self.factor, spread


def timed_pass(model: BlockModel, x: torch.Tensor) -> np.ndarray:
    """Seconds of one forward + backward step of each block in turn, shape (n_blocks,); on a
    GPU the device is synchronised at both edges (kernels run asynchronously)."""
    times = np.zeros(model.n_blocks)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    h = x
    for b in range(model.n_blocks):
        inp = h.detach().requires_grad_(b > 0)
        sync()
        t0 = time.perf_counter()
        out = model.blocks[b](inp)
        out.float().sum().backward()
        sync()
        times[b] = time.perf_counter() - t0
        h = out.detach()
    return times


def summarise(samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per block (column) of ``samples`` (passes, blocks): the minimum, and the spread
    ``median / min - 1`` (0 where the minimum is 0)."""
    low = samples.min(axis=0)
    safe = np.where(low > 0, low, 1.0)
    return low, np.where(low > 0, np.median(samples, axis=0) / safe - 1.0, 0.0)
