"""Snake's frozen blocks as weight-only int8 (``snake.frozen_weights = "int8"``).

A middle block that one node trains (or none does) is, at every other node, frozen: it is only
run forward (and backward to its input). Such blocks are held, and travel, as weight-only int8
(``models.int8``: 1 byte per weight instead of 2 in bf16) at every rank. Their owner keeps its
own full-precision copy (its *master*), trains that during its turn in place of the int8 block,
and writes it back quantised when the turn ends, so the next node gets the new int8 block and
the owner's small updates still add up turn after turn in its master. Blocks several nodes
train (the ends by default) stay full precision. The model every rank evaluates and holds at
the end (its hash) is the int8 one; the masters are private training state, like the moments
of an optimiser, and are not in checkpoints (so the option is refused with them).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
from torch import nn

from snake_mpi.blocks import (
    BlockModel,
    copy_modules,
    flat_storage,
    model_device,
    module_tensors,
    tensor_bytes,
)
from snake_mpi.models.int8 import Int8Linear, load_quantized, quantize_linears
from snake_mpi.probes.memory import release_free_memory


class FrozenInt8:
    """This rank's int8 blocks and the masters of the ones it trains; ``turn`` swaps them."""

    def __init__(self, model: BlockModel, relay: Sequence[int], own: Sequence[int]) -> None:
        """Quantise blocks ``relay`` of ``model`` in place, first keeping a full-precision copy
        of those among ``own`` (this rank's trainable blocks)."""
        self.relay = sorted(relay)
        mine = set(own)
        self.masters: dict[int, nn.Module] = {}
        built = is_int8(model)
        if any(built) and [b for b, q in enumerate(built) if q] != self.relay:
            raise RuntimeError(
                f"the blocks built as int8, {[b for b, q in enumerate(built) if q]}, are not the "
                f"plan's {self.relay}"
            )
        if set(model.int8_masters) != (mine & set(self.relay) if any(built) else set()):
            raise RuntimeError(
                f"the build kept copies of blocks {sorted(model.int8_masters)}, not of this "
                f"node's int8 blocks {sorted(mine & set(self.relay))}"
            )
        dev = model_device(model)  # the build made them on the CPU; the model may have moved
        self.masters.update({b: m.to(dev) for b, m in model.int8_masters.items()})
        model.int8_masters = {}
        for b in self.relay:  # one block at a time: the extra memory is one block's
            if built[b]:  # made int8 as it was built (snake.int8_build_layers)
                continue
            mod = model.blocks[b]
            if b in mine:  # the module itself is the master (its tensors keep the old buffer)
                self.masters[b] = mod
                mod = copy_modules({b: mod})[b]
                model.swap_block(b, mod)
            quantize_linears(mod)
            if model.is_flat:
                flat_storage(model)  # the block's new buffer; the old one goes (or the master's)
        release_free_memory()  # the full-precision blocks are gone: let the RSS show it

    def master_bytes(self) -> int:
        """Bytes of the full-precision copies this rank keeps."""
        return sum(tensor_bytes(t) for m in self.masters.values() for t in module_tensors(m))

    @contextlib.contextmanager
    def turn(self, model: BlockModel, trainable: Sequence[int]) -> Iterator[None]:
        """During a turn of blocks ``trainable`` the masters stand in for their int8 blocks;
        after it they are quantised into them (in place: the block buffers stay)."""
        swapped = {b: model.swap_block(b, self.masters[b]) for b in trainable if b in self.masters}
        ok = False
        try:
            yield
            ok = True
        finally:
            for b, held in swapped.items():
                if ok:
                    load_quantized(held, self.masters[b])
                model.swap_block(b, held)


def is_int8(model: BlockModel) -> list[bool]:
    """Per block, whether it holds int8 layers."""
    return [any(isinstance(m, Int8Linear) for m in mod.modules()) for mod in model.blocks]


def relay_blocks(owners: Sequence[int] | np.ndarray, n_blocks: int) -> list[int]:
    """The middle blocks held as int8: those that fewer than two nodes train (``owners``:
    ``schemes.snake.block_owners``, -1 for a block several nodes train)."""
    return [b for b in range(1, n_blocks - 1) if int(owners[b]) != -1]
