"""Bring your own data: a classification dataset as one ``.npz`` file with ``x_train``,
``y_train``, ``x_test`` and ``y_test`` (read without pickle). Features are used as float32 as
they are (normalise them beforehand); labels must be integers in ``[0, n_classes)``."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch

from snake_mpi.data.cifar10 import DataError
from snake_mpi.data.synthetic import Dataset

KEYS = ("x_train", "y_train", "x_test", "y_test")


def read_arrays(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The four arrays of an ``.npz`` file; a clear error for a missing or malformed file."""
    p = Path(path).expanduser()
    if not str(path):
        raise DataError(
            "data.name = 'arrays' needs data.path: an .npz file with " + ", ".join(KEYS)
        )
    if not p.is_file():
        raise DataError(f"data.path {p} is not a file (an .npz with {', '.join(KEYS)})")
    if p.suffix == ".npy" or _is_npy(p):
        raise DataError(
            f"{p} is a .npy file (one array), not an .npz file with {', '.join(KEYS)}; "
            "save them with numpy.savez"
        )
    try:
        with np.load(p, allow_pickle=False) as f:
            missing = [k for k in KEYS if k not in f.files]
            if missing:
                raise DataError(f"{p} lacks {', '.join(missing)} (has {', '.join(f.files)})")
            arrays = {k: f[k] for k in KEYS}
    except (zipfile.BadZipFile, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        if not zipfile.is_zipfile(p):  # numpy then takes it for a pickle and says so
            raise DataError(
                f"{p} is not a readable .npz file: not a zip archive (numpy.savez writes one "
                f"with {', '.join(KEYS)})"
            ) from None
        if "pickle" in str(e):
            raise DataError(
                f"{p} holds object arrays (stored with pickle); only .npz files without "
                "pickled objects are read: save numeric arrays with numpy.savez"
            ) from None
        raise DataError(f"{p} is not a readable .npz file: {e}") from None
    raw = [k for k, v in arrays.items() if not isinstance(v, np.ndarray)]
    if raw:  # a zip member that is not .npy data comes back from numpy as its bytes
        raise DataError(
            f"{p}: {', '.join(raw)} in it is not a .npy array (not saved by numpy.savez)"
        )
    return arrays


def _is_npy(p: Path) -> bool:
    """Whether ``p`` starts with numpy's .npy magic string."""
    with p.open("rb") as f:
        return f.read(6) == b"\x93NUMPY"


def first_non_finite(x: np.ndarray) -> tuple[int, ...] | None:
    """Index of the first NaN or infinite value of ``x`` as float32 (values beyond float32's
    range count), None if all are finite."""
    if not np.issubdtype(x.dtype, np.floating):
        return None
    with np.errstate(over="ignore"):
        bad = ~np.isfinite(x.astype(np.float32))
    if not bad.any():
        return None
    return tuple(int(i) for i in np.unravel_index(int(np.argmax(bad)), x.shape))


def _as_float32(v: np.generic) -> str:
    value = float(v)
    return f"{value!r} (beyond float32's range)" if np.isfinite(value) else repr(value)


def check_arrays(
    arrays: dict[str, np.ndarray], *, sample_shape: tuple[int, ...], n_classes: int, path: str
) -> None:
    """Shapes agree with each other and with the config; labels are integers in range."""
    for split in ("train", "test"):
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
            raise DataError(
                f"{path}: y_{split} must be a 1-D integer array, got shape {y.shape} {y.dtype}"
            )
        if x.shape[0] != y.shape[0]:
            raise DataError(
                f"{path}: x_{split} has {x.shape[0]} samples but y_{split} has {y.shape[0]}"
            )
        if x.shape[0] == 0:
            raise DataError(f"{path}: x_{split} is empty")
        if tuple(x.shape[1:]) != tuple(sample_shape):
            raise DataError(
                f"{path}: x_{split} samples have shape {list(x.shape[1:])}, the config says "
                f"data.sample_shape = {list(sample_shape)}"
            )
        if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
            raise DataError(f"{path}: x_{split} must be numeric, got {x.dtype}")
        bad = first_non_finite(x)
        if bad is not None:
            raise DataError(
                f"{path}: x_{split} has a non-finite value at index {bad}: {_as_float32(x[bad])}; "
                "features must be finite float32 numbers (normalise them)"
            )
        if y.min() < 0 or y.max() >= n_classes:
            raise DataError(
                f"{path}: y_{split} has labels from {y.min()} to {y.max()}, outside "
                f"[0, {n_classes}) (data.n_classes = {n_classes})"
            )


def load_arrays(
    path: str,
    *,
    sample_shape: tuple[int, ...],
    n_classes: int,
    n_train: int,
    n_test: int,
    seed: int,
) -> Dataset:
    """The dataset of an ``.npz`` file, checked, with ``n_train``/``n_test`` samples drawn
    (seeded, without replacement) when fewer than the file's are asked for."""
    a = read_arrays(path)
    check_arrays(a, sample_shape=sample_shape, n_classes=n_classes, path=path)
    rng = np.random.default_rng(seed)
    picked = {}
    for split, n in (("train", n_train), ("test", n_test)):
        have = len(a[f"y_{split}"])
        if n > have:
            raise DataError(f"data.n_{split} = {n} but {path} holds {have} {split} samples")
        picked[split] = np.sort(rng.choice(have, n, replace=False))
    return Dataset(
        x_train=torch.from_numpy(a["x_train"][picked["train"]].astype(np.float32)),
        y_train=torch.from_numpy(a["y_train"][picked["train"]].astype(np.int64)),
        x_test=torch.from_numpy(a["x_test"][picked["test"]].astype(np.float32)),
        y_test=torch.from_numpy(a["y_test"][picked["test"]].astype(np.int64)),
        n_classes=n_classes,
    )
