"""What one rank's checkpoint holds, and putting it back.

Only what the config and the seed cannot rebuild: the blocks this rank holds whose version is
above 0 (trained or received since the model was built; a block at version 0 is exactly as
built), the version of every block, which blocks are freed (``snake.keep = "own"``), every
random state (this rank's generator, torch's global CPU and CUDA generators, numpy's and
Python's global ones), the communication counters of the round under way and the cumulative
control bytes, the recorder's running totals, and the plan inputs a ``measure`` run timed
(``SchemeReport.plan_inputs``, stored as ``info.<name>``).
Optimisers live for one turn in every scheme (``train.optimizer``), so none outlives a round
boundary, and data order is the generator's state.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Set
from typing import TYPE_CHECKING

import numpy as np
import torch

from snake_mpi.blocks import (
    BlockModel,
    block_tensors,
    hold_block,
    is_held,
    model_device,
    release_blocks,
    released_blocks,
)
from snake_mpi.context import PLAN_INPUTS
from snake_mpi.transport.wire import CommStats

if TYPE_CHECKING:
    from snake_mpi.context import Context

_STATS = tuple(f.name for f in dataclasses.fields(CommStats))


def saved_blocks(model: BlockModel) -> list[int]:
    """Blocks a checkpoint writes: held on this rank and changed since the model was built."""
    gone = set(released_blocks(model))
    return [
        b
        for b in range(model.n_blocks)
        if model.versions[b] > 0 and b not in gone and block_tensors(model, b)
    ]


def block_bytes(model: BlockModel, ids: list[int]) -> int:
    """Bytes of the tensors of blocks ``ids`` as a checkpoint stores them."""
    return sum(t.numel() * t.element_size() for b in ids for t in block_tensors(model, b))


def _host(t: torch.Tensor) -> tuple[np.ndarray, bool]:
    """A tensor's values as a host array (bfloat16 as its uint16 words: flag True)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).numpy().view(np.uint16), True
    return t.numpy(), False


def capture(ctx: Context, carried: bool) -> tuple[dict[str, np.ndarray], dict[str, str], set[str]]:
    """This rank's state at a round boundary: ``(arrays, metadata, names of bf16 arrays)``.

    ``carried``: whether this rank has already received the next round's first hop (taken in
    at the checkpoint so that nothing is in flight)."""
    model, rec = ctx.model, ctx.record
    arrays: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for b in saved_blocks(model):
        for i, t in enumerate(block_tensors(model, b)):
            arr, is_bf16 = _host(t)
            arrays[f"block.{b}.{i}"] = arr
            if is_bf16:
                bf16.add(f"block.{b}.{i}")
    arrays["versions"] = np.asarray(model.versions, dtype=np.int64)
    arrays["released"] = np.asarray(released_blocks(model), dtype=np.int64)
    arrays["rng.generator"] = ctx.generator.get_state().numpy()
    arrays["rng.torch"] = torch.get_rng_state().numpy()
    device = model_device(model)
    if device.type == "cuda":
        arrays["rng.cuda"] = torch.cuda.get_rng_state(device).numpy()
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    arrays["rng.numpy"] = np.asarray(keys, dtype=np.uint32)
    version, internal, gauss_next = random.getstate()
    arrays["rng.python"] = np.asarray(internal, dtype=np.uint64)
    arrays["stats"] = np.array([getattr(ctx.comm.stats, k) for k in _STATS], dtype=np.float64)
    for key, value in ctx.report.plan_inputs().items():
        arrays[f"info.{key}"] = value
    meta = {
        "rank": str(ctx.comm.rank),
        "round": str(rec.round),
        "carried": str(int(carried)),
        "rng.numpy": f"{kind}|{pos}|{has_gauss}|{gauss!r}",
        "rng.python": f"{version}|{gauss_next!r}",
        # the seconds in a fixed width (17 significant digits: exact): the file's size, which
        # checkpoint_bytes records, must not depend on how long the run took
        "recorder": f"{rec.cum_bytes_sent}|{rec.n_rounds_written}|{rec.elapsed_s():.16e}",
    }
    return arrays, meta, bf16


def restore(
    ctx: Context, arrays: dict[str, np.ndarray], meta: dict[str, str], bf16: Set[str]
) -> None:
    """Put a state ``capture`` took back into ``ctx`` (a model as built from the same config
    and seed, the scheme's set-up done)."""
    model = ctx.model
    versions = arrays["versions"]
    if versions.shape != (model.n_blocks,):
        raise ValueError(
            f"checkpoint has {versions.size} block versions, the model {model.n_blocks}"
        )
    with torch.no_grad():
        for name, arr in arrays.items():
            if not name.startswith("block."):
                continue
            _, b, i = name.split(".")
            t = block_tensors(model, int(b))[int(i)]
            src = torch.from_numpy(np.array(arr))
            if name in bf16:
                src = src.view(torch.bfloat16)
            if src.numel() != t.numel() or src.dtype != t.dtype:
                raise ValueError(
                    f"checkpoint tensor {name}: {src.dtype} x {src.numel()}, "
                    f"the model's {t.dtype} x {t.numel()}"
                )
            if not is_held(t):
                hold_block(model, int(b))
            t.copy_(src.view(t.shape))
    model.versions[:] = versions
    release_blocks(model, [int(b) for b in arrays["released"]])
    ctx.generator.set_state(torch.from_numpy(np.array(arrays["rng.generator"])))
    torch.set_rng_state(torch.from_numpy(np.array(arrays["rng.torch"])))
    if "rng.cuda" in arrays:
        device = model_device(model)
        torch.cuda.set_rng_state(torch.from_numpy(np.array(arrays["rng.cuda"])), device)
    kind, pos, has_gauss, gauss = meta["rng.numpy"].split("|")
    np.random.set_state(
        (kind, np.array(arrays["rng.numpy"]), int(pos), int(has_gauss), float(gauss))
    )
    version, gauss_next = meta["rng.python"].split("|")
    internal = tuple(int(x) for x in arrays["rng.python"])
    random.setstate((int(version), internal, None if gauss_next == "None" else float(gauss_next)))
    for k, v in zip(_STATS, arrays["stats"], strict=True):
        current = getattr(ctx.comm.stats, k)
        setattr(ctx.comm.stats, k, type(current)(v))
    ctx.report.restore_plan_inputs(
        {key: arrays[f"info.{key}"] for key in PLAN_INPUTS if f"info.{key}" in arrays}
    )
    cum, written, elapsed = meta["recorder"].split("|")
    ctx.record.resume(
        cum_bytes_sent=int(cum), n_rounds_written=int(written), elapsed_s=float(elapsed)
    )
