"""What a run's numbers depend on besides its config and seed, and a fingerprint of its data.

The guarantee (docs/reproducibility.md): the data, the partition and the initial model are the
same bits on any machine and placement; the training steps are the same bits where every rank
has the same ``NumericSettings`` (torch's thread count, the CPU kernels torch dispatches to, the
environment variables that steer the math libraries) on the same software. Each rank records
its settings and its dataset's SHA-256 in ``/ranks``; ``compare`` names the settings in which
the runs it compares differ.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

NUMERIC_ENV_VARS = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "OPENBLAS_CORETYPE",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "ATEN_CPU_CAPABILITY",
    "DNNL_MAX_CPU_ISA",
    "ONEDNN_MAX_CPU_ISA",
    "CUBLAS_WORKSPACE_CONFIG",
    "NVIDIA_TF32_OVERRIDE",
)
"""Environment variables that change which kernels the math libraries run, or how many threads
split a reduction: recorded (as set) in every rank's ``numeric_env``."""

SETTING_COLUMNS = ("torch_threads", "cpu_capability", "numeric_env")
"""The ``/ranks`` columns of ``NumericSettings``."""
PROVENANCE_KEYS = ("torch_version", "numpy_version")
"""Software whose version changes kernels (recorded in ``/provenance``)."""


class DataMismatch(RuntimeError):
    """The ranks of one run generated or read different data (the run stops before training)."""


@dataclass(frozen=True, slots=True)
class NumericSettings:
    """One rank's settings that the bits of a training step may depend on."""

    torch_threads: int
    """torch's intra-op threads (how reductions are split)."""
    cpu_capability: str
    """The CPU kernels torch dispatches to (``DEFAULT``, ``AVX2``, ``AVX512``, ...)."""
    numeric_env: str
    """``NAME=value`` of each set variable of ``NUMERIC_ENV_VARS``, comma-separated."""


def current(torch_threads: int, environ: Mapping[str, str] | None = None) -> NumericSettings:
    """This process's settings, with ``torch_threads`` as the run set them."""
    import torch

    env = os.environ if environ is None else environ
    return NumericSettings(
        torch_threads=int(torch_threads),
        cpu_capability=str(torch.backends.cpu.get_cpu_capability()),
        numeric_env=",".join(f"{k}={env[k]}" for k in NUMERIC_ENV_VARS if k in env),
    )


def dataset_sha256(dataset: Any) -> str:
    """SHA-256 over the dataset's train and test tensors (dtype, shape and bytes of each): equal
    on two ranks exactly when they hold bit-identical data."""
    h = hashlib.sha256()
    for name in ("x_train", "y_train", "x_test", "y_test"):
        t = getattr(dataset, name).contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.numpy().view("uint8").reshape(-1).data)
    return h.hexdigest()


def data_mismatch(hashes: Sequence[str]) -> str | None:
    """A sentence naming the ranks whose data differ from rank 0's, or None when every rank
    holds the same data."""
    odd = [r for r, h in enumerate(hashes) if h != hashes[0]]
    if not odd:
        return None
    ranks = ", ".join(str(r) for r in odd)
    return (
        f"rank(s) {ranks} generated or read other data than rank 0 (dataset sha256 "
        f"{hashes[odd[0]][:12]} against {hashes[0][:12]}): the ranks' files or library versions "
        "differ; give every rank the same data file and software (docs/reproducibility.md)"
    )


def run_differences(runs: Sequence[tuple[str, Mapping[str, Sequence[Any]]]]) -> list[str]:
    """For runs given as ``(label, {setting: value per rank, ...})``, one phrase per setting in
    which they differ, e.g. ``"torch_threads: 1 (a, b); 4 (c)"``; empty when they agree.

    A run's value is the set of its ranks' values (a run on mixed nodes shows several)."""
    keys: list[str] = []
    for _, columns in runs:
        keys += [k for k in columns if k not in keys]
    out: list[str] = []
    for key in keys:
        by_value: dict[str, list[str]] = {}
        for label, columns in runs:
            values = sorted({str(v) for v in columns.get(key, ["(not recorded)"])})
            shown = " + ".join(v if v else "(none)" for v in values)
            by_value.setdefault(shown, []).append(label)
        if len(by_value) > 1:
            parts = "; ".join(f"{v} ({', '.join(labels)})" for v, labels in by_value.items())
            out.append(f"{key}: {parts}")
    return out
