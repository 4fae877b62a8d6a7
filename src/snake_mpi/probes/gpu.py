"""GPU probe: device memory from torch's allocator and, if pynvml is installed, from NVML.

A stub backend: ``available()`` is False on CPU-only machines and ``gpu_memory()`` then
returns ``{}``; nothing here requires pynvml.
"""

from __future__ import annotations


def available() -> bool:
    """True if torch sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def gpu_memory() -> dict[str, int]:
    """Memory of the current CUDA device in bytes, or ``{}`` without a GPU.

    Keys: ``allocated_bytes``, ``max_allocated_bytes``, ``reserved_bytes`` (torch's caching
    allocator, this process) and, with pynvml, ``nvml_used_bytes``/``nvml_total_bytes``
    (the whole device, all processes).
    """
    if not available():
        return {}
    import torch

    dev = torch.cuda.current_device()
    out = {
        "allocated_bytes": int(torch.cuda.memory_allocated(dev)),
        "max_allocated_bytes": int(torch.cuda.max_memory_allocated(dev)),
        "reserved_bytes": int(torch.cuda.memory_reserved(dev)),
    }
    out.update(_nvml_memory(dev))
    return out


def _nvml_memory(dev: int) -> dict[str, int]:
    """NVML's view of the device, matched by UUID (NVML ignores CUDA_VISIBLE_DEVICES)."""
    try:
        import pynvml
        import torch
    except ImportError:
        return {}
    try:
        pynvml.nvmlInit()
        uuid = str(torch.cuda.get_device_properties(dev).uuid)
        uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
        handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
        info = pynvml.nvmlDeviceGetMemoryInfo(handle)
    except Exception:  # NVML absent, driver mismatch, old torch: best effort only
        return {}
    return {"nvml_used_bytes": int(info.used), "nvml_total_bytes": int(info.total)}
