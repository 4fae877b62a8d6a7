"""A model as ordered blocks B_0 (stem) ... B_{L-1} (head): freeze/thaw, flatten to one byte
buffer and back (bit-exact), per-block versions, byte sizes, training-state accounting.

Block buffers (``flat_storage``): the state of each block lives in one contiguous uint8
buffer, and the block's parameters and buffers are views into it (as DDP buckets and FSDP's
flat parameters do), so a hop sends that buffer as it is and a receive lands in it: nothing is
packed or allocated per hop. Inside a block the tensors lie in *wire order*
(``wire_tensors``): by element size, largest first (int64, then fp32, then bf16, ...), each
group in ``block_tensors`` order; every tensor then starts at a multiple of its element size,
with no padding, so a block's buffer is exactly its state bytes. ``flatten`` uses the same order,
so a packed payload and a block buffer hold the same bytes.

A block's *state* is its parameters and buffers (e.g. batch-norm statistics): everything a
receiver needs to continue from where the sender stopped. A tensor shared by several blocks (a
language model's tied embedding and LM-head matrix) belongs to the first block that has it: it
is counted, sent and trained as part of that block only.
"""

from __future__ import annotations

import copy
import ctypes
import functools
import hashlib
import itertools
import mmap
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Self

import numpy as np
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

ROLE_STEM, ROLE_MIDDLE, ROLE_HEAD = "stem", "middle", "head"


_LAYOUT_GENS = itertools.count(1)


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
        self.int8_masters: dict[int, nn.Module] = {}
        """Full-precision copies of int8 blocks this rank trains, made by the build
        (``models.lm.build``'s ``int8_layers``; ``schemes.frozen`` adopts them); not state."""
        self._owners: dict[int, int] | None = None
        self._flat: list[torch.Tensor | None] | None = None
        """Per block, the uint8 buffer its tensors view (``flat_storage``); None: not flat."""
        self.layout_gen = next(_LAYOUT_GENS)
        """Renewed whenever a block buffer is made, replaced, released or dropped: what was
        built over the buffers before (a ``Hops`` plan's persistent requests) is stale.
        Unique across models (one counter), so no two layouts share a value."""

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

    def _apply(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Self:
        # .to(), .float(), ...: tensors may be new objects
        self._owners = None
        out = super()._apply(fn, *args, **kwargs)
        if self._flat is not None:  # the moved tensors get block buffers on their new device
            flat_storage(self)
        return out

    def swap_block(self, b: int, module: nn.Module) -> nn.Module:
        """Put ``module`` in block ``b``'s place (its buffer, if flat, stays as it is: a module
        that stands in for a turn, ``schemes.frozen``); the module it replaces."""
        old = self.blocks[b]
        self.blocks[b] = module
        self._owners = None  # tied tensors are found by identity
        return old

    @property
    def is_flat(self) -> bool:
        """Whether block state lives in block buffers (``flat_storage``)."""
        return self._flat is not None

    @property
    def n_blocks(self) -> int:
        return len(self.blocks)

    @property
    def middle_ids(self) -> list[int]:
        return list(range(1, self.n_blocks - 1))

    def forward(
        self, x: torch.Tensor, *, no_grad_below: int = 0, recompute: bool = False
    ) -> torch.Tensor:
        """Run every block; those below ``no_grad_below`` without autograd (no activations kept).
        With ``recompute`` (and autograd on) the others keep only their input and recompute
        their activations in the backward pass (activation checkpointing)."""
        if no_grad_below > 0:
            with torch.no_grad():
                for b in range(no_grad_below):
                    x = self.blocks[b](x)
        recompute = recompute and torch.is_grad_enabled()
        for b in range(no_grad_below, self.n_blocks):
            if recompute:
                x = checkpoint(self.blocks[b], x, use_reentrant=False)
            else:
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
    ids = list(ids)
    for b in ids:
        model.blocks[b] = nn.Identity()
    model._owners = None
    model.layout_gen = next(_LAYOUT_GENS)
    if model._flat is not None:
        for b in ids:
            model._flat[b] = None


def wire_tensors(model: BlockModel, b: int) -> list[torch.Tensor]:
    """Block ``b``'s state tensors in wire order: by element size, largest first, each group in
    ``block_tensors`` order (Python's sort is stable). Every offset is then a multiple of the
    tensor's element size (sizes are powers of two), so views need no padding."""
    return sorted(block_tensors(model, b), key=lambda t: -t.element_size())


def flat_storage(model: BlockModel) -> None:
    """Put the state of every block into one contiguous uint8 buffer per block, in wire order,
    and make each of the block's tensors a view into it (values and ``Parameter`` objects are
    kept, so optimisers, hooks and tied weights still see the same tensors). Idempotent; a
    block whose tensors already view its buffer is left alone. ``BlockModel._apply`` calls it
    again after a dtype or device move. A block released by ``release_blocks`` stays released.
    One block is copied at a time, so the extra memory is one block's."""
    model._owners = None
    old = model._flat or [None] * model.n_blocks
    flat: list[torch.Tensor | None] = []
    with torch.no_grad():
        for b in range(model.n_blocks):
            ts = wire_tensors(model, b)
            if not ts:
                flat.append(None)
                continue
            kept = old[b]
            if kept is not None and _views_of(ts, kept):
                flat.append(kept)
                continue
            devices = {t.device for t in ts}
            if len(devices) > 1:
                raise ValueError(f"block {b} ({model.names[b]}) has tensors on {devices}")
            held = all(is_held(t) for t in ts)
            buf = _rehome(ts, copy=held)
            if not held:
                buf.untyped_storage().resize_(0)
            flat.append(buf)
    model._flat = flat
    model.layout_gen = next(_LAYOUT_GENS)


def _rehome(ts: Sequence[torch.Tensor], *, copy: bool) -> torch.Tensor:
    """A new uint8 buffer for tensors ``ts`` (wire order), which become views into it; their
    values are copied in if ``copy``."""
    buf = block_empty(sum(_nbytes(t) for t in ts), ts[0].device)
    offset = 0
    with torch.no_grad():
        for t in ts:
            n = _nbytes(t)
            view = buf[offset : offset + n].view(t.dtype).view(t.shape)
            if copy:
                view.copy_(t)
            t.data = view
            offset += n
    return buf


def _views_of(ts: Sequence[torch.Tensor], buf: torch.Tensor) -> bool:
    """Whether tensors ``ts`` are, in order, back-to-back views of ``buf``'s storage."""
    storage = buf.untyped_storage()
    offset = buf.storage_offset()  # bytes: buf is uint8 (non-zero where aligned, block_empty)
    for t in ts:
        if t.untyped_storage()._cdata != storage._cdata or not t.is_contiguous():
            return False
        if t.storage_offset() * t.element_size() != offset:
            return False
        offset += _nbytes(t)
    return offset == buf.storage_offset() + buf.numel()


def block_buffer(model: BlockModel, b: int, *, allocate: bool = False) -> torch.Tensor | None:
    """Block ``b``'s uint8 buffer (the bytes a hop sends and a receive fills), or None where
    the model is not flat or the block holds nothing. ``allocate``: give a block released by
    ``release_blocks`` its bytes back first (uninitialised: the caller fills them)."""
    if model._flat is None:
        return None
    buf = model._flat[b]
    if buf is not None and allocate and buf.untyped_storage().nbytes() == 0:
        buf = _rehome(wire_tensors(model, b), copy=False)  # a fresh, aligned buffer
        model._flat[b] = buf
        model.layout_gen = next(_LAYOUT_GENS)
    return buf


HUGE_PAGE = 2 << 20
HUGE_MIN_BYTES = 4 << 20
"""Block buffers from this size get transparent huge pages (NumPy's threshold for arrays)."""


def block_empty(nbytes: int, device: torch.device) -> torch.Tensor:
    """An uninitialised uint8 block buffer of ``nbytes``. On the host from ``HUGE_MIN_BYTES``
    it starts on a 2 MiB boundary (a slice of a slightly larger allocation: its storage offset
    is then not 0) and is advised to use transparent huge pages (``huge_pages``), so that no
    whole huge page of it sits in 4 KiB pages: torch's allocator aligns to 64 bytes only, and
    MPI's shared-memory copies (CMA) of 4 KiB pages are slower (docs/benchmarks.md)."""
    if device.type != "cpu" or nbytes < HUGE_MIN_BYTES:
        return torch.empty(nbytes, dtype=torch.uint8, device=device)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)
    skip = -raw.data_ptr() % HUGE_PAGE
    buf = raw[skip : skip + nbytes]
    huge_pages(buf)
    return buf


def huge_pages(buf: torch.Tensor) -> None:
    """Ask Linux for transparent huge pages (``madvise(MADV_HUGEPAGE)``) for the 2 MiB-aligned
    inside of a host block buffer of at least ``HUGE_MIN_BYTES``, before its pages are first
    touched: NumPy does this for its arrays, torch's CPU allocator does not (unless
    ``THP_MEM_ALLOC_ENABLE=1``), and MPI's shared-memory copies of 4 KiB pages are slower
    (docs/benchmarks.md). The tail after the last whole huge page stays in 4 KiB pages, so no
    resident byte is added. Best effort: nothing where the system has no such advice
    (``transparent_hugepage = never`` ignores it too)."""
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if advice is None or buf.device.type != "cpu" or buf.numel() < HUGE_MIN_BYTES:
        return
    start = -(-buf.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (buf.data_ptr() + buf.numel()) // HUGE_PAGE * HUGE_PAGE
    if end > start:
        _libc().madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), advice)


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def release_blocks(model: BlockModel, ids: Iterable[int]) -> None:
    """Free the state bytes of blocks ``ids`` between turns (``snake.keep = "own"``), keeping
    each tensor's shape, dtype and device: the block still has its size (``block_nbytes``) and
    takes a payload again (``unflatten`` re-allocates it); until then ``model_bytes_held`` counts
    it 0 and it must not be run. Unlike ``drop_blocks`` the block can come back."""
    model.layout_gen = next(_LAYOUT_GENS)
    for b in ids:
        buf = block_buffer(model, b)
        if buf is not None:  # every tensor of the block views it: one resize frees them all
            if not buf.untyped_storage().resizable():  # a numpy array was made of it
                buf = _rehome(wire_tensors(model, b), copy=False)  # (no pages touched)
                assert model._flat is not None
                model._flat[b] = buf
            buf.untyped_storage().resize_(0)
            continue
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


def hold_block(model: BlockModel, b: int) -> None:
    """Give block ``b``'s tensors their bytes back after ``release_blocks`` (uninitialised: the
    caller fills them): its block buffer, or each tensor of a model that is not flat."""
    if block_buffer(model, b, allocate=True) is None:
        for t in block_tensors(model, b):
            _reallocate(t)


def copy_modules(mods: dict[int, nn.Module]) -> dict[int, nn.Module]:
    """A deep copy of modules in which every tensor is copied on its own: ``copy.deepcopy``
    would copy a buffer's whole storage, i.e. the whole block buffer it views. Tensors shared
    between the modules stay shared in the copy."""
    memo: dict[int, Any] = {}
    with torch.no_grad():
        for m in mods.values():
            for t in module_tensors(m):
                if id(t) not in memo:
                    c = t.detach().clone()
                    if isinstance(t, nn.Parameter):
                        c = nn.Parameter(c, requires_grad=t.requires_grad)
                    memo[id(t)] = c
    return copy.deepcopy(mods, memo)


def _reallocate(t: torch.Tensor) -> None:
    """Give a released tensor its bytes back (uninitialised; the caller fills them)."""
    if not is_held(t):
        t.untyped_storage().resize_(_nbytes(t))


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def block_nbytes(model: BlockModel, b: int) -> int:
    """Bytes of block ``b``'s state as it travels (parameters and buffers). A flat block's is
    its buffer's length (its tensors view it byte for byte; also once released), so a hop
    does not walk the module's tensors."""
    buf = model._flat[b] if model._flat is not None else None
    if buf is not None:
        return buf.numel()
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
    """Copy the state of blocks ``ids`` into one contiguous uint8 buffer in host memory, each
    block's tensors in wire order (``wire_tensors``): the bytes its block buffer holds.

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
        buf = block_buffer(model, b)
        if buf is not None:  # one copy of the block's buffer
            out[offset : offset + buf.numel()].copy_(buf)
            offset += buf.numel()
            continue
        for t in wire_tensors(model, b):
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
            buf = block_buffer(model, b, allocate=True)  # a block released between turns
            if buf is not None:  # comes back
                buf.copy_(src[offset : offset + buf.numel()])
                offset += buf.numel()
                continue
            for t in wire_tensors(model, b):
                n = t.numel() * t.element_size()
                _reallocate(t)
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


def tensor_bytes(t: torch.Tensor) -> int:
    """Bytes a tensor holds: a tensor subclass that wraps others (a quantised optimiser state:
    codes and scales) is the sum of what it wraps, not its nominal shape times its dtype."""
    flatten = getattr(t, "__tensor_flatten__", None)
    if flatten is not None and type(t) is not torch.nn.Parameter:
        names, _ = flatten()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in an optimiser's state (moments, momentum, step counters)."""
    return sum(
        tensor_bytes(v)
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
