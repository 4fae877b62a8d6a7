"""GPU probe: one rank's device memory, utilisation, power and energy per round.

Where the figures come from:

- torch's caching allocator (this process): ``gpu_max_allocated_bytes`` counts tensors,
  ``gpu_max_reserved_bytes`` the allocator's pool; both are exact peaks since ``begin_round``.
- NVML (``nvidia-ml-py``, module ``pynvml``): device memory in use (adds the CUDA contexts and
  driver reservations), utilisation, power, the energy counter, and this process's memory from
  the list of compute processes. The handle is found by the device's UUID, never by index:
  NVML ignores ``CUDA_VISIBLE_DEVICES``, so its index 0 need not be torch's device 0.

Known limits:

- The energy counter (``nvmlDeviceGetTotalEnergyConsumption``, mJ, Volta and later) updates
  every 20-100 ms, so energy and mean power of rounds under about 1 s are approximate.
- Memory used, power, utilisation and energy are the whole device's: on a GPU shared by several
  ranks they are not this rank's share (NVML cannot attribute them).
- NVML lists host PIDs; inside a PID namespace (most containers) this process's PID does not
  appear and its memory is NaN ("unavailable"), never 0.
- Sampled peaks (NVML used and process bytes) can miss spikes shorter than the sampling interval.

Any failing NVML call makes that figure NaN; the probe keeps working for the others. Without
NVML the torch figures still work (``nvml_ok`` is False).
"""

from __future__ import annotations

import contextlib
import importlib
import math
import os
import threading
from time import perf_counter
from typing import Any

ROUND_KEYS = (
    "gpu_max_allocated_bytes",
    "gpu_max_reserved_bytes",
    "gpu_nvml_used_bytes",
    "gpu_nvml_process_bytes",
    "gpu_energy_j",
    "gpu_power_w",
)
"""The figures of ``GpuProbe.end_round``, in this order."""

SERIES_KEYS = ("gpu_power_w", "gpu_util_percent", "gpu_nvml_used_bytes")
"""The figures of ``GpuProbe.sample`` (one sampler tick)."""

NAN = math.nan


def available() -> bool:
    """True if torch sees a CUDA device."""
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _str(value: Any) -> str:
    """The binding returns bytes in older releases and str in newer ones."""
    return value.decode() if isinstance(value, bytes) else str(value)


def _nvml_uuid(props: Any) -> str:
    """NVML's spelling of a device UUID from torch's device properties (``GPU-`` prefix)."""
    uuid = str(props.uuid)
    return uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"


def _max(peak: float, value: float) -> float:
    """Running maximum that ignores NaN values (NaN until a value is seen)."""
    if math.isnan(value):
        return peak
    return value if math.isnan(peak) else max(peak, value)


class GpuProbe:
    """Per-rank GPU figures: torch allocator peaks and NVML memory, utilisation, power, energy.

    ``device_index`` is torch's CUDA index of this rank's device, or None on a CPU rank; then
    ``enabled`` is False and every method returns NaN figures or an empty dict. ``nvml`` and
    ``torch_cuda`` replace the ``pynvml`` module and ``torch.cuda`` (for tests).

    Use: ``begin_round()`` at the start of a round, ``sample()`` from the sampler thread,
    ``end_round()`` at its end, ``close()`` (or ``stop()``) when done. A ``probes.RoundProbe``:
    ``available()`` is False on a CPU rank or where torch cannot read the device, and
    ``reason`` says why (or why NVML's figures are missing).
    """

    def __init__(
        self, device_index: int | None, *, nvml: Any = None, torch_cuda: Any = None
    ) -> None:
        self.device_index = device_index
        self.enabled = device_index is not None
        self.nvml_ok = False
        self._nvml: Any = None
        self._handle: Any = None
        self._inited = False
        self._cuda: Any = None
        self._name = ""
        self._uuid = ""
        self._lock = threading.Lock()
        self._t0: float | None = None
        self._energy0_mj = NAN
        self._peak_used_bytes = NAN
        self._peak_process_bytes = NAN
        self._device_ok = False
        self.reason = "CPU rank: no GPU device"
        """Why the probe measures nothing (or only torch's figures) here; "" when all work."""
        if not self.enabled:
            return
        if torch_cuda is None:
            import torch

            torch_cuda = torch.cuda
        self._cuda = torch_cuda
        try:
            props = torch_cuda.get_device_properties(device_index)
            self._device_ok = True
            self._name = str(props.name)
            self._uuid = _nvml_uuid(props)
        except Exception as e:  # no such device or an old torch without .uuid: NVML stays off
            self.reason = f"torch cannot read CUDA device {device_index}: {type(e).__name__}: {e}"
        if self._device_ok:
            self.reason = ""
        self._open_nvml(nvml)

    def _open_nvml(self, nvml: Any) -> None:
        try:
            self._nvml = nvml if nvml is not None else importlib.import_module("pynvml")
            self._nvml.nvmlInit()
        except Exception as e:  # binding not installed, no driver, no permission
            self._nvml = None
            self._partly(f"NVML unavailable ({type(e).__name__}: {e}): torch figures only")
            return
        self._inited = True
        if not self._uuid:
            self._partly("no device UUID from torch: NVML figures unavailable")
            return
        try:
            self._handle = self._nvml.nvmlDeviceGetHandleByUUID(self._uuid)
        except Exception as e:
            self._partly(f"NVML has no device {self._uuid} ({type(e).__name__}): torch only")
            return
        self.nvml_ok = True

    def _partly(self, why: str) -> None:
        """Note why NVML's figures are missing (unless the device itself is the reason)."""
        if self._device_ok and not self.reason:
            self.reason = why

    # ------------------------------------------------------------ Probe interface

    def available(self) -> bool:
        """True on a GPU rank whose device torch can read (NVML may still be missing)."""
        return self.enabled and self._device_ok

    def start(self) -> None:
        """Nothing: the device and NVML are opened at construction."""

    def stop(self) -> None:
        """``close()``."""
        self.close()

    # ------------------------------------------------------------ identity

    def identity(self) -> dict[str, str]:
        """The device's name and NVML UUID ("" on a CPU rank)."""
        return {"gpu_name": self._name, "gpu_uuid": self._uuid}

    def versions(self) -> dict[str, str]:
        """CUDA runtime (torch's build), driver and NVML versions; "none" on a CPU rank."""
        if not self.enabled:
            return {"cuda_version": "none", "cuda_driver_version": "none", "nvml_version": "none"}
        try:
            import torch

            cuda = torch.version.cuda or "none"
        except ImportError:
            cuda = "none"
        return {
            "cuda_version": str(cuda),
            "cuda_driver_version": self._system_str("nvmlSystemGetDriverVersion"),
            "nvml_version": self._system_str("nvmlSystemGetNVMLVersion"),
        }

    def _system_str(self, fn: str) -> str:
        if not self._inited:
            return "unavailable"
        try:
            return _str(getattr(self._nvml, fn)())
        except Exception:
            return "unavailable"

    # ------------------------------------------------------------ readings

    def _device(self, fn: str) -> Any:
        """``nvml.<fn>(handle)``, or None when NVML is off or the call fails."""
        if not self.nvml_ok:
            return None
        try:
            return getattr(self._nvml, fn)(self._handle)
        except Exception:  # NVMLError (NotSupported, GPU lost, ...), or a binding without fn
            return None

    def _torch(self, fn: str) -> float:
        try:
            return float(getattr(self._cuda, fn)(self.device_index))
        except Exception:
            return NAN

    def _synchronize(self) -> None:
        # a CUDA error surfaces in the training itself; the probe only measures
        with contextlib.suppress(Exception):
            self._cuda.synchronize(self.device_index)

    def _energy_mj(self) -> float:
        value = self._device("nvmlDeviceGetTotalEnergyConsumption")
        return NAN if value is None else float(value)

    def _process_bytes(self) -> float:
        """This process's device memory per NVML; NaN if its PID is not listed (containers)."""
        procs = self._device("nvmlDeviceGetComputeRunningProcesses")
        if procs is None:
            return NAN
        pid = os.getpid()
        mine = [p.usedGpuMemory for p in procs if p.pid == pid]
        if not mine or any(used is None for used in mine):
            return NAN
        return float(sum(mine))

    def sample(self) -> dict[str, float]:
        """One sampler tick: ``SERIES_KEYS`` (power W, utilisation %, device memory used);
        also folds memory used and this process's memory into the round peaks.

        Thread-safe. Empty on a CPU rank.
        """
        if not self.enabled:
            return {}
        with self._lock:
            power_mw = self._device("nvmlDeviceGetPowerUsage")
            util = self._device("nvmlDeviceGetUtilizationRates")
            mem = self._device("nvmlDeviceGetMemoryInfo")
            used_bytes = NAN if mem is None else float(mem.used)
            self._peak_used_bytes = _max(self._peak_used_bytes, used_bytes)
            self._peak_process_bytes = _max(self._peak_process_bytes, self._process_bytes())
        return {
            "gpu_power_w": NAN if power_mw is None else float(power_mw) / 1000.0,
            "gpu_util_percent": NAN if util is None else float(util.gpu),
            "gpu_nvml_used_bytes": used_bytes,
        }

    # ------------------------------------------------------------ rounds

    def begin_round(self) -> None:
        """Start a round: synchronise, reset torch's and the sampled peaks, read the energy
        counter and the clock."""
        if not self.enabled:
            return
        self._synchronize()
        with contextlib.suppress(Exception):
            self._cuda.reset_peak_memory_stats(self.device_index)
        with self._lock:
            self._peak_used_bytes = NAN
            self._peak_process_bytes = NAN
            self._energy0_mj = self._energy_mj()
            self._t0 = perf_counter()

    def end_round(self) -> dict[str, float]:
        """End a round: ``ROUND_KEYS`` since ``begin_round`` (all NaN on a CPU rank).

        ``gpu_power_w`` is the time average, energy over elapsed time; a counter that
        went backwards (driver reload) makes energy and power NaN.
        """
        if not self.enabled:
            return dict.fromkeys(ROUND_KEYS, NAN)
        self._synchronize()
        energy_mj = self._energy_mj()
        t1 = perf_counter()
        self.sample()
        with self._lock:
            energy_j = NAN
            if self._t0 is not None and energy_mj >= self._energy0_mj:  # False for NaN
                energy_j = (energy_mj - self._energy0_mj) / 1000.0
            elapsed_s = NAN if self._t0 is None else t1 - self._t0
            power_w = energy_j / elapsed_s if elapsed_s > 0 else NAN
            return {
                "gpu_max_allocated_bytes": self._torch("max_memory_allocated"),
                "gpu_max_reserved_bytes": self._torch("max_memory_reserved"),
                "gpu_nvml_used_bytes": self._peak_used_bytes,
                "gpu_nvml_process_bytes": self._peak_process_bytes,
                "gpu_energy_j": energy_j,
                "gpu_power_w": power_w,
            }

    def close(self) -> None:
        """Shut NVML down if this probe initialised it; safe to call more than once."""
        self.nvml_ok = False
        self._handle = None
        if not self._inited:
            return
        self._inited = False
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


def gpu_memory() -> dict[str, int]:
    """Memory of the current CUDA device in bytes, or ``{}`` without a GPU (a one-off snapshot).

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
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            handle = pynvml.nvmlDeviceGetHandleByUUID(
                _nvml_uuid(torch.cuda.get_device_properties(dev))
            )
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # NVML absent, driver mismatch, old torch: best effort only
        return out
    out.update(nvml_used_bytes=int(info.used), nvml_total_bytes=int(info.total))
    return out
