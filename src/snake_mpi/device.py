"""Where a rank computes: its local rank on the host, its CUDA device, and how its weights
travel (``direct`` from device memory, ``staged`` through pinned host memory, ``host`` on CPU).

No MPI here and no CUDA work at import: ``run.main`` resolves the local rank from the
launcher's environment and sets the device *before* mpi4py initialises MPI (Open MPI may
allocate CUDA resources inside ``MPI_Init``, on the current device). Only when no launcher
variable names the local rank does the caller fall back to a shared-memory split of the world
communicator, after initialisation.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from snake_mpi.config import DEVICES, GPU_TRANSFERS, ConfigError

if TYPE_CHECKING:
    import torch

LOCAL_RANK_VARS = (
    "OMPI_COMM_WORLD_LOCAL_RANK",  # Open MPI's mpirun / prterun
    "SLURM_LOCALID",  # srun (not SLURM_LOCAL_ID: that typo sent every rank to GPU 0 in kokkos)
    "MPI_LOCALRANKID",  # MPICH / Intel MPI (Hydra)
    "PMI_LOCAL_RANK",  # PMI-based launchers
)
"""Environment variables that give a rank's index among the ranks on its host, in the order
they are trusted."""

DEVICE_SETTINGS = DEVICES
TRANSFER_SETTINGS = GPU_TRANSFERS

PATH_HOST, PATH_STAGED, PATH_DIRECT = "host", "staged", "direct"
SPLIT_SOURCE = "MPI_COMM_TYPE_SHARED split"
"""``Placement.local_rank_source`` when no launcher variable named the local rank."""


class DeviceError(ConfigError):
    """The configured device or transfer path cannot be used on this machine (exit 2)."""


def local_rank_from_env(environ: Mapping[str, str] | None = None) -> tuple[int | None, str]:
    """This process's local rank and the variable it came from; ``(None, "")`` when no launcher
    variable holds a non-negative integer (the caller then splits the communicator)."""
    env = os.environ if environ is None else environ
    for var in LOCAL_RANK_VARS:
        text = env.get(var, "").strip()
        if text.isdigit():
            return int(text), var
    return None, ""


@dataclass(frozen=True, slots=True)
class Placement:
    """This rank's device: ``kind`` "cpu" or "cuda", and on CUDA the torch index."""

    kind: str
    index: int = -1
    local_rank: int = 0
    local_rank_source: str = ""
    visible_devices: int = 0

    @property
    def name(self) -> str:
        """``cpu`` or ``cuda:<index>`` (as torch spells it)."""
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


def choose(
    setting: str,
    *,
    cuda_available: bool,
    n_devices: int,
    local_rank: int,
    local_rank_source: str = "",
) -> Placement:
    """The device of the rank with ``local_rank`` on its host.

    ``auto``: CUDA when torch sees a usable GPU, else CPU; ``cuda`` without one is a
    ``DeviceError``. With exactly one visible device every rank uses it (the launcher has
    masked the rest); with more ranks than devices on a host they share them round-robin
    (Snake trains one node at a time, so one GPU can host a whole ring): recorded, not refused.
    """
    if setting not in DEVICE_SETTINGS:
        raise DeviceError(f"device must be one of {', '.join(DEVICE_SETTINGS)}; got {setting!r}")
    usable = cuda_available and n_devices > 0
    if setting == "cpu" or (setting == "auto" and not usable):
        return Placement("cpu", local_rank=local_rank, local_rank_source=local_rank_source)
    if not usable:
        raise DeviceError(
            'device = "cuda" but torch sees no usable CUDA device on this host '
            f"(torch.cuda.is_available() = {cuda_available}, {n_devices} device(s); "
            f"CUDA_VISIBLE_DEVICES = {os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')!r}); "
            'use device = "auto" or "cpu", or a CUDA build of torch on a GPU node'
        )
    index = 0 if n_devices == 1 else local_rank % n_devices
    return Placement(
        "cuda",
        index=index,
        local_rank=local_rank,
        local_rank_source=local_rank_source,
        visible_devices=n_devices,
    )


def choose_transfer(
    setting: str, device_kind: str, cuda_support: bool | None, how: str = ""
) -> tuple[str, str]:
    """The path weights take between ranks, and why: ``(path, reason)``.

    ``cuda_support``: what the MPI library says about CUDA-aware transfers (True, False, or
    None when it cannot say; ``how`` names the query). ``auto`` takes ``direct`` only where
    the library confirms support; an explicit ``direct`` that the library denies is refused
    (handing a device pointer to a host-only MPI crashes); one it cannot confirm is taken at
    the user's word.
    """
    if setting not in TRANSFER_SETTINGS:
        raise DeviceError(
            f"comm.gpu_transfer must be one of {', '.join(TRANSFER_SETTINGS)}; got {setting!r}"
        )
    said = {True: "supported", False: "not supported", None: "unknown"}[cuda_support]
    query = f"CUDA-aware MPI: {said}" + (f" ({how})" if how else "")
    if device_kind != "cuda":
        return PATH_HOST, "CPU rank: weights travel from host memory"
    if setting == "staged":
        return PATH_STAGED, f"comm.gpu_transfer = staged; {query}"
    if setting == "direct":
        if cuda_support is False:
            raise DeviceError(
                'comm.gpu_transfer = "direct" but the MPI library reports no CUDA support '
                f'({how or "query"}); use "staged" or "auto", or a CUDA-aware MPI build'
            )
        return PATH_DIRECT, f"comm.gpu_transfer = direct; {query}"
    if cuda_support:
        return PATH_DIRECT, f"comm.gpu_transfer = auto; {query}"
    return PATH_STAGED, f"comm.gpu_transfer = auto; {query}"


def cuda_state() -> tuple[bool, int]:
    """Whether torch sees CUDA, and how many devices (no context is created)."""
    import torch

    try:
        available = bool(torch.cuda.is_available())
        return available, int(torch.cuda.device_count()) if available else 0
    except Exception:  # a broken driver install: treat as no GPU
        return False, 0


def activate(placement: Placement) -> torch.device:
    """Make ``placement`` the current device (before any other CUDA work) and return it as a
    ``torch.device``. On a GPU the CUDA context is created here, on that device: at start-up,
    so that it counts in the rank's baseline memory rather than in the model's."""
    import torch

    device = torch.device(placement.name)
    if placement.kind == "cuda":
        try:
            torch.cuda.set_device(placement.index)
            torch.empty(1, device=device)  # the context, now and here
        except Exception as e:  # exclusive-process mode, a GPU out of memory, a driver fault
            raise DeviceError(f"cannot use {placement.name}: {type(e).__name__}: {e}") from None
    return device
