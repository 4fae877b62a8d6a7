"""The buffers model blocks travel in, per transfer path (``device.choose_transfer``):

- ``host`` (a CPU rank): the model's own block buffers (``blocks.flat_storage``,
  ``comm.hop_buffers = "views"``): a send hands them to MPI as they are and a receive lands in
  them, so nothing is copied or allocated per hop. A model that is not flat
  (``comm.hop_buffers = "copy"``) is packed into a fresh host array per send (``flatten``) and
  copied back after each receive, as hops worked before;
- ``staged`` (a GPU rank, MPI without CUDA support): one reusable **pinned** host buffer per
  direction; the blocks are copied device -> pinned buffer before a send and pinned buffer ->
  device after a receive, one copy per block buffer (copies from pinned memory run at full
  PCIe/NVLink speed);
- ``direct`` (a GPU rank with CUDA-aware MPI): the device block buffers themselves (a model that
  is not flat: one reusable device buffer per direction), handed to mpi4py as CUDA tensors
  (DLPack / ``__cuda_array_interface__``). mpi4py does not synchronise the stream, so the
  stream is synchronised before every send and receive.

Reusable buffers grow to the largest payload seen (never beyond the model's bytes), so a delta
hop of one block does not cost the memory of the whole model. The bytes on the wire are the
same on every path: one header and the blocks' state bytes (``wire.py``). No MPI here.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from snake_mpi.blocks import (
    BlockModel,
    block_buffer,
    block_nbytes,
    flatten,
    flatten_into,
    is_held,
    unflatten,
)
from snake_mpi.device import PATH_DIRECT, PATH_HOST, PATH_STAGED


class HopBuffers:
    """Packs blocks into the payload a send takes, and provides the buffer a receive fills."""

    def __init__(self, path: str = PATH_HOST, device: torch.device | str = "cpu") -> None:
        if path not in (PATH_HOST, PATH_STAGED, PATH_DIRECT):
            raise ValueError(f"unknown transfer path {path!r}")
        self.path = path
        self.device = torch.device(device)
        if path == PATH_DIRECT and self.device.type != "cuda":
            raise ValueError("the direct path needs a CUDA device")
        self._buffers: dict[str, torch.Tensor] = {}
        self.pinned = path == PATH_STAGED and torch.cuda.is_available()
        """Whether staging buffers are page-locked (False only where CUDA is absent, i.e. when
        the staged path is exercised on a CPU for testing)."""

    def buffer_bytes(self) -> int:
        """Bytes the reusable buffers hold now (pinned host or device memory)."""
        return sum(b.numel() for b in self._buffers.values())

    def _buffer(self, which: str, nbytes: int) -> torch.Tensor:
        """The reusable buffer ``which`` ("send"/"recv"), grown to at least ``nbytes``; its
        first ``nbytes`` bytes."""
        buf = self._buffers.get(which)
        if buf is None or buf.numel() < nbytes:
            self._buffers.pop(which, None)
            del buf  # free the smaller one first
            if self.path == PATH_DIRECT:
                buf = torch.empty(nbytes, dtype=torch.uint8, device=self.device)
            else:
                buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)
            self._buffers[which] = buf
        return buf[:nbytes]

    def in_place(self, model: BlockModel) -> bool:
        """Whether hops of ``model`` send and land in its block buffers (a flat model on the
        host or direct path), with no copy."""
        return model.is_flat and self.path in (PATH_HOST, PATH_DIRECT)

    def pack(self, model: BlockModel, ids: Sequence[int]) -> tuple[Any, np.ndarray]:
        """The payload of blocks ``ids`` ready to send, and the bytes per block. In place
        (``in_place``): the list of the blocks' own buffers (numpy views on the host path,
        device tensors on the direct path, stream synchronised). Otherwise a host-path
        payload is a new numpy array; a staged one a numpy view of the pinned send buffer; a
        direct one a view of the device send buffer (stream synchronised). A reused buffer is
        valid until the next ``pack``."""
        if self.in_place(model):
            if self.path == PATH_DIRECT:  # the blocks' last writes must be done before MPI
                torch.cuda.current_stream(self.device).synchronize()
            return _block_views(model, ids, host=self.path == PATH_HOST)
        if self.path == PATH_HOST:
            return flatten(model, ids)
        total = _total_bytes(model, ids)
        buf = self._buffer("send", total)
        sizes = flatten_into(model, ids, buf)
        if self.path == PATH_DIRECT:
            torch.cuda.current_stream(self.device).synchronize()
            return buf, sizes
        return buf.numpy(), sizes

    def host_in_place(self, model: BlockModel) -> bool:
        """Whether hops of ``model`` go from and into its own host block buffers (a flat model
        on the host path): where a hop plan can serve them."""
        return self.path == PATH_HOST and model.is_flat

    def host_views(self, model: BlockModel, ids: Sequence[int], *, receive: bool) -> list[Any]:
        """Numpy views of blocks ``ids``' own host buffers (``host_in_place``), for a hop
        plan. ``receive``: released blocks get their bytes back first (they are about to be
        received); without it, a released block is an error (as in ``pack``)."""
        return _block_views(model, ids, host=True, allocate=receive)[0]

    def receive_into(self, nbytes: int) -> Any:
        """The buffer a receive of ``nbytes`` payload bytes lands in (``TransferSpec.alloc``);
        ``None`` on the host path (the communicator allocates)."""
        if self.path == PATH_HOST:
            return None
        if self.path == PATH_DIRECT:  # kernels queued on the last payload (an average's adds)
            torch.cuda.current_stream(self.device).synchronize()  # must read it before MPI
            return self._buffer("recv", nbytes)  # writes the next one outside torch's stream
        return self._buffer("recv", nbytes).numpy()

    @property
    def alloc(self) -> Callable[[int], Any] | None:
        """``receive_into`` for ``TransferSpec(alloc=...)``, or None on the host path."""
        return None if self.path == PATH_HOST else self.receive_into

    def into(self, model: BlockModel) -> Any:
        """``TransferSpec.into`` for receives into ``model`` (``in_place``): the buffers of the
        blocks a header announces, each given its bytes back if it was released; None where
        hops of this model are copied (``alloc`` applies then)."""
        if not self.in_place(model):
            return None

        def land(ids: list[int], nbytes: list[int]) -> list[Any]:
            for b, n in zip(ids, nbytes, strict=True):
                if not 0 <= b < model.n_blocks or block_nbytes(model, b) != n:
                    have = block_nbytes(model, b) if 0 <= b < model.n_blocks else "no"
                    raise ValueError(f"block {b} of {n} bytes announced; the model has {have}")
            if self.path == PATH_DIRECT:  # kernels queued on the blocks must finish first
                torch.cuda.current_stream(self.device).synchronize()
            return _block_views(model, ids, host=self.path == PATH_HOST, allocate=True)[0]

        return land

    def unpack(self, model: BlockModel, ids: Sequence[int], payload: Any, sizes: Any) -> None:
        """Write a received payload into blocks ``ids`` of ``model`` (on its device); returns
        once the copies are done, so the receive buffer may be reused. A payload that landed
        in the blocks' own buffers (``into``) is already there."""
        if isinstance(payload, list):
            return
        unflatten(model, ids, payload, sizes)
        if self.path != PATH_HOST and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _total_bytes(model: BlockModel, ids: Sequence[int]) -> int:
    return sum(block_nbytes(model, b) for b in ids)


def _block_views(
    model: BlockModel, ids: Sequence[int], *, host: bool, allocate: bool = False
) -> tuple[list[Any], np.ndarray]:
    """Blocks ``ids``' own buffers (numpy views on the host, else the uint8 tensors) and their
    bytes; an empty block gives an empty buffer. ``allocate``: released blocks get their bytes
    back (to receive into); without it, sending a released block is an error."""
    views: list[Any] = []
    for b in ids:
        buf = block_buffer(model, b, allocate=allocate)
        if buf is None:
            if block_nbytes(model, b):
                raise ValueError(f"block {b} ({model.names[b]}) has no block buffer")
            views.append(np.empty(0, dtype=np.uint8))
            continue
        if not is_held(buf):
            raise ValueError(f"block {b} ({model.names[b]}) was released and not received again")
        views.append(host_view(buf) if host else buf)
    return views, np.array([v.nbytes for v in views], dtype=np.int64)


def host_view(buf: torch.Tensor) -> np.ndarray:
    """A numpy array over a host uint8 tensor's bytes, for MPI's buffer protocol. Not
    ``Tensor.numpy()``: that makes the storage non-resizable for good, and ``release_blocks``
    frees a block by resizing its storage. The array does not keep the storage alive: use it
    only while the block is held (a send or receive)."""
    n = buf.numel()
    if n == 0:
        return np.empty(0, dtype=np.uint8)
    raw = (ctypes.c_uint8 * n).from_address(buf.data_ptr())
    return np.frombuffer(memoryview(raw).cast("B"), dtype=np.uint8)
