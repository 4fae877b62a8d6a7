"""The buffers model blocks travel in, per transfer path (``device.choose_transfer``):

- ``host`` (a CPU rank): a fresh host array per transfer, as ``blocks.flatten`` makes it;
- ``staged`` (a GPU rank, MPI without CUDA support): one reusable **pinned** host buffer per
  direction; the blocks are copied device -> pinned buffer before a send and pinned buffer ->
  device after a receive (copies from pinned memory run at full PCIe/NVLink speed);
- ``direct`` (a GPU rank with CUDA-aware MPI): one reusable device buffer per direction, handed
  to mpi4py as a CUDA tensor (DLPack / ``__cuda_array_interface__``). mpi4py does not
  synchronise the stream, so the stream is synchronised before every send.

Reusable buffers grow to the largest payload seen (never beyond the model's bytes), so a delta
hop of one block does not cost the memory of the whole model. The bytes on the wire are the
same on every path: one header and the blocks' state bytes (``wire.py``). No MPI here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from snake_mpi.blocks import BlockModel, block_nbytes, flatten, flatten_into, unflatten
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

    def pack(self, model: BlockModel, ids: Sequence[int]) -> tuple[Any, np.ndarray]:
        """The payload of blocks ``ids`` ready to send, and the bytes per block. A host-path
        payload is a new numpy array; a staged one a numpy view of the pinned send buffer; a
        direct one a view of the device send buffer (stream synchronised). A reused buffer is
        valid until the next ``pack``."""
        if self.path == PATH_HOST:
            return flatten(model, ids)
        total = _total_bytes(model, ids)
        buf = self._buffer("send", total)
        sizes = flatten_into(model, ids, buf)
        if self.path == PATH_DIRECT:
            torch.cuda.current_stream(self.device).synchronize()
            return buf, sizes
        return buf.numpy(), sizes

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

    def unpack(self, model: BlockModel, ids: Sequence[int], payload: Any, sizes: Any) -> None:
        """Write a received payload into blocks ``ids`` of ``model`` (on its device); returns
        once the copies are done, so the receive buffer may be reused."""
        unflatten(model, ids, payload, sizes)
        if self.path != PATH_HOST and self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()


def _total_bytes(model: BlockModel, ids: Sequence[int]) -> int:
    return sum(block_nbytes(model, b) for b in ids)
