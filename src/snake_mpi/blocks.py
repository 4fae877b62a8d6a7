"""A model as ordered blocks B_0 (stem) ... B_{L-1} (head): freeze/thaw, flatten to one byte
buffer and back (bit-exact), per-block versions, byte sizes, training-state accounting.

A block's *state* is its parameters and buffers (e.g. batch-norm statistics): everything a
receiver needs to continue from where the sender stopped. A tensor shared by several blocks (a
language model's tied embedding and LM-head matrix) belongs to the first block that has it: it
is counted, sent and trained as part of that block only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

ROLE_STEM, ROLE_MIDDLE, ROLE_HEAD = "stem", "middle", "head"


class BlockModel(nn.Module):
    """An ``nn.Sequential``-like model whose children are the blocks, with a version per block."""

    lm_config: Any
    """A language model's Hugging Face config (set by ``models.lm.to_blocks``; else unset)."""

    def __init__(self, blocks: Sequence[tuple[str, nn.Module]]) -> None:
        super().__init__()
        if len(blocks) < 3:
            raise ValueError("a block model needs a stem, at least one middle block and a head")
        self.names = [name for name, _ in blocks]
        self.blocks = nn.ModuleList([m for _, m in blocks])
        self.roles = [ROLE_STEM] + [ROLE_MIDDLE] * (len(blocks) - 2) + [ROLE_HEAD]
        self.versions = np.zeros(len(blocks), dtype=np.int64)
        self._owners: dict[int, int] | None = None

    def shared_owners(self) -> dict[int, int]:
        """``id`` of every tensor that appears in more than one block -> the first block that
        has it, its owner (empty for most models). Cached; ``drop_blocks`` and dtype/device
        moves invalidate it."""
        if self._owners is None:
            first: dict[int, int] = {}
            count: dict[int, int] = {}
            for b, mod in enumerate(self.blocks):
                for t in module_tensors(mod):
                    first.setdefault(id(t), b)
                    count[id(t)] = count.get(id(t), 0) + 1
            self._owners = {k: first[k] for k, n in count.items() if n > 1}
        return self._owners

    def tied_tensors(self) -> int:
        """Number of tensors that appear in more than one block (0 for most models)."""
        return len(self.shared_owners())

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: tensors may be new objects
        self._owners = None
        return super()._apply(fn, *args, **kwargs)

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def middle_ids(self) -> list[int]:
        return list(range(1, self.n_blocks - 1))

    def forward(self, x: torch.Tensor, *, no_grad_below: int = 0) -> torch.Tensor:
        """Run every block; those below ``no_grad_below`` without autograd (no activations kept)."""
        if no_grad_below > 0:
            with torch.no_grad():
                for b in range(no_grad_below):
                    x = self.blocks[b](x)
        for b in range(no_grad_below, self.n_blocks):
            x = self.blocks[b](x)
        return x


def block_tensors(model: BlockModel, b: int) -> list[torch.Tensor]:
    """The state tensors block ``b`` owns (parameters, then buffers) in a fixed order, each once;
    a tensor that an earlier block also has is that block's, not this one's."""
    own = module_tensors(model.blocks[b])
    owners = model.shared_owners()
    if not owners:
        return own
    return [t for t in own if owners.get(id(t), b) == b]


def block_parameters(model: BlockModel, b: int) -> list[nn.Parameter]:
    """The parameters block ``b`` owns (see ``block_tensors``)."""
    return [t for t in block_tensors(model, b) if isinstance(t, nn.Parameter)]


def module_tensors(mod: nn.Module) -> list[torch.Tensor]:
    """A module's state tensors (parameters, then buffers) in a fixed order, each once."""
    seen: set[int] = set()
    out = []
    for t in [p for _, p in mod.named_parameters()] + [t for _, t in mod.named_buffers()]:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def drop_blocks(model: BlockModel, ids: Iterable[int]) -> None:
    """Free blocks this rank never holds (a split-learning client keeps only its lower part):
    each becomes an empty ``nn.Identity``, so it counts 0 bytes everywhere."""
    for b in ids:
        model.blocks[b] = nn.Identity()
    model._owners = None


def release_blocks(model: BlockModel, ids: Iterable[int]) -> None:
    """Free the state bytes of blocks ``ids`` between turns (``snake.keep = "own"``), keeping
    each tensor's shape, dtype and device: the block still has its size (``block_nbytes``) and
    takes a payload again (``unflatten`` re-allocates it); until then ``model_bytes_held`` counts
    it 0 and it must not be run. Unlike ``drop_blocks`` the block can come back."""
    for b in ids:
        for t in block_tensors(model, b):
            if not is_held(t):
                continue
            whole = t.untyped_storage().nbytes() == _nbytes(t) and t.storage_offset() == 0
            if not (whole and t.untyped_storage().resizable()):
                t.data = torch.empty_like(t)  # its own storage, so no other tensor loses bytes
            t.untyped_storage().resize_(0)


def is_held(t: torch.Tensor) -> bool:
    """Whether tensor ``t``'s bytes are in memory (not freed by ``release_blocks``)."""
    return t.numel() == 0 or t.untyped_storage().nbytes() > 0


def released_blocks(model: BlockModel) -> list[int]:
    """Blocks with state freed by ``release_blocks`` and not received since."""
    return [
        b for b in range(model.n_blocks) if not all(is_held(t) for t in block_tensors(model, b))
    ]


def _reallocate(t: torch.Tensor) -> None:
    """Give a released tensor its bytes back (uninitialised; the caller fills them)."""
    if not is_held(t):
        t.untyped_storage().resize_(_nbytes(t))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def block_nbytes(model: BlockModel, b: int) -> int:
    """Bytes of block ``b``'s state as it travels (parameters and buffers)."""
    return sum(t.numel() * t.element_size() for t in block_tensors(model, b))


def block_params(model: BlockModel, b: int) -> int:
    """Number of parameters (not buffers) of block ``b``."""
    return sum(p.numel() for p in block_parameters(model, b))


def block_dtype(model: BlockModel, b: int) -> str:
    """The dtypes of block ``b``'s tensors, e.g. ``"float32"`` or ``"bfloat16+float32"``
    (sorted, each once; ``""`` for an empty block)."""
    names = sorted({str(t.dtype).removeprefix("torch.") for t in block_tensors(model, b)})
    return "+".join(names)


def block_table(model: BlockModel) -> dict[str, np.ndarray]:
    """Name, role, parameter count, dtypes and byte size of every block (columns)."""
    ids = range(model.n_blocks)
    return {
        "name": np.array(model.names, dtype=object),
        "role": np.array(model.roles, dtype=object),
        "dtype": np.array([block_dtype(model, b) for b in ids], dtype=object),
        "params": np.array([block_params(model, b) for b in ids], dtype=np.int64),
        "bytes": np.array([block_nbytes(model, b) for b in ids], dtype=np.int64),
    }


def set_trainable(model: BlockModel, trainable: Iterable[int]) -> list[nn.Parameter]:
    """Thaw exactly the given blocks (train mode, requires_grad); freeze the rest (eval mode).

    Frozen blocks are in eval mode so their buffers (batch-norm statistics) do not change:
    only a block's trainer may change its state (a tied tensor trains with the block that owns
    it). Returns the trainable parameters.
    """
    keep = set(trainable)
    params: list[nn.Parameter] = []
    for b, mod in enumerate(model.blocks):
        on = b in keep
        mod.train(on)
        for p in block_parameters(model, b):
            p.requires_grad_(on)
            if on:
                params.append(p)
    return params


def _byte_view(t: torch.Tensor) -> torch.Tensor:
    if not t.is_contiguous():
        raise ValueError("block tensors must be contiguous to travel as bytes")
    return t.detach().reshape(-1).view(torch.uint8)


def flatten(model: BlockModel, ids: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Copy the state of blocks ``ids`` into one contiguous uint8 buffer in host memory.

    Returns ``(payload, nbytes_per_block)``; the bytes are the tensors' own, so the round trip
    through ``unflatten`` is bit-exact for any dtype.
    """
    sizes = np.array([block_nbytes(model, b) for b in ids], dtype=np.int64)
    buf = torch.empty(int(sizes.sum()), dtype=torch.uint8)
    flatten_into(model, ids, buf)
    return buf.numpy(), sizes


def flatten_into(model: BlockModel, ids: Sequence[int], out: torch.Tensor) -> np.ndarray:
    """``flatten`` into ``out`` (a uint8 tensor of exactly the blocks' bytes, on any device:
    pinned host memory to stage a GPU rank's weights, or device memory for a CUDA-aware MPI);
    returns the bytes per block. Copies from a GPU into ``out`` may still be in flight on the
    current stream when this returns."""
    sizes = np.array([block_nbytes(model, b) for b in ids], dtype=np.int64)
    if out.dtype != torch.uint8 or out.dim() != 1 or out.numel() != int(sizes.sum()):
        raise ValueError(f"out must be {int(sizes.sum())} uint8 values, got {tuple(out.shape)}")
    offset = 0
    for b in ids:
        for t in block_tensors(model, b):
            n = t.numel() * t.element_size()
            out[offset : offset + n].copy_(_byte_view(t))
            offset += n
    return sizes


def unflatten(
    model: BlockModel, ids: Sequence[int], payload: np.ndarray, nbytes: np.ndarray
) -> None:
    """Write a payload made by ``flatten`` back into blocks ``ids`` of ``model`` (in place).

    ``payload``: a uint8 numpy array, or a uint8 tensor on any device."""
    src = payload if torch.is_tensor(payload) else torch.from_numpy(payload)
    offset = 0
    with torch.no_grad():
        for b, expect in zip(ids, nbytes, strict=True):
            have = block_nbytes(model, b)
            if have != int(expect):
                raise ValueError(
                    f"block {b} ({model.names[b]}) has {have} bytes, payload says {expect}"
                )
            for t in block_tensors(model, b):
                n = t.numel() * t.element_size()
                _reallocate(t)  # a block released between turns comes back
                _byte_view(t).copy_(src[offset : offset + n])
                offset += n
    if offset != src.numel():
        raise ValueError(f"payload has {src.numel()} bytes, blocks used {offset}")


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of the model's first tensor (CPU for a model with none)."""
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


def model_bytes_held(model: BlockModel) -> int:
    """Bytes of model state this process holds now (what sits in memory between turns): every
    block's tensors but those freed by ``release_blocks``."""
    return sum(
        _nbytes(t) for b in range(model.n_blocks) for t in block_tensors(model, b) if is_held(t)
    )


def training_state_bytes(
    model: BlockModel, optimizer: torch.optim.Optimizer | None
) -> dict[str, int]:
    """Weights held + gradients + optimiser state, counted from the tensors that exist now."""
    weights = model_bytes_held(model)
    grads = sum(
        p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None
    )
    optim = optimizer_state_bytes(optimizer) if optimizer is not None else 0
    return {
        "weights": weights,
        "grads": grads,
        "optimizer": optim,
        "total": weights + grads + optim,
    }


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimiser's state (moments, momentum, step counters)."""
    return sum(
        v.numel() * v.element_size()
        for state in optimizer.state.values()
        for v in state.values()
        if torch.is_tensor(v)
    )


def model_hash(model: BlockModel) -> str:
    """SHA-256 over every block's state bytes (the bytes ``flatten`` would produce, hashed
    tensor by tensor, so that no copy of the model is made): equal hashes mean bit-identical
    models. Tensors freed by ``release_blocks`` are left out: the hash is of what is held."""
    h = hashlib.sha256()
    for b in range(model.n_blocks):
        for t in block_tensors(model, b):
            if is_held(t):
                h.update(_byte_view(t).cpu().numpy().data)
    return h.hexdigest()
