"""The MNIST family (MNIST, Fashion-MNIST, KMNIST, EMNIST) from its IDX files in a local
directory; never downloaded.

The directory holds ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte`` and ``t10k-labels-idx1-ubyte``, each plain or gzipped (``.gz``; a
file that starts with gzip's magic bytes is decompressed whatever its name). An IDX file is two
zero bytes, a type byte (0x08: unsigned bytes, the only type the family uses), the number of
dimensions, each dimension as a big-endian int32, then the values: images ``(N, rows, cols)``,
labels ``(N,)``. Every file is read and checked in full (magic, dimensions, length, counts of
images against labels, labels in ``[0, data.n_classes)``, the image size against
``data.sample_shape``) before any message, and a ``DataError`` names the file and what is wrong.
Images are kept as stored (EMNIST's are transposed; a model learns them either way), and
``data.n_classes`` must exceed the largest label (EMNIST letters: 1-26, so 27).

``data.path`` empty: ``$IDX_DIR``, else ``DEBIAN_DIR`` (where the Debian package
``dataset-fashion-mnist`` puts Fashion-MNIST; ``make fashion-mnist`` installs it).
Images are one channel, scaled to [0, 1], optionally zero-padded in a centred border
(``data.pad_to = 32`` with ``data.sample_shape = [1, 32, 32]``: the 32x32 images VGG-11 needs;
0, the default: ``[1, 28, 28]`` as stored), then standardised by the mean and standard
deviation of the whole training file's pixels (the same on every rank, whatever is drawn).
"""

from __future__ import annotations

import gzip
import os
import zlib
from pathlib import Path

import numpy as np
import torch

from snake_mpi.data.cifar10 import DataError
from snake_mpi.data.synthetic import Dataset

FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
"""Per split: the images' and the labels' file names (each also read with ``.gz``)."""
ENV_VAR = "IDX_DIR"
"""Environment variable naming the IDX directory when the config's ``data.path`` is empty."""
DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
"""Where Debian's ``dataset-fashion-mnist`` installs Fashion-MNIST (``dpkg -L``); the default."""
WHERE = (
    "install Fashion-MNIST with `make fashion-mnist` (Debian's dataset-fashion-mnist, as root), "
    "or give a directory of MNIST-family IDX files as data.path or in $IDX_DIR"
)
UNSIGNED_BYTE = 0x08
GZIP_MAGIC = b"\x1f\x8b"


def resolve_path(path: str) -> Path:
    """The configured directory, else ``$IDX_DIR``, else ``DEBIAN_DIR``; it must exist."""
    raw = path or os.environ.get(ENV_VAR, "")
    p = Path(raw).expanduser() if raw else DEBIAN_DIR
    if not p.is_dir():
        said = "data.path" if path else (f"${ENV_VAR}" if raw else "the default data.path")
        what = "is not a directory" if p.exists() else "does not exist"
        raise DataError(f"IDX data: {said} {p} {what}; {WHERE}")
    return p


def find_file(directory: Path, name: str) -> Path:
    """``name`` or ``name.gz`` in ``directory`` (the plain file where both are)."""
    for candidate in (directory / name, directory / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    raise DataError(f"{directory} has no {name} (nor {name}.gz): not an IDX dataset; {WHERE}")


def read_raw(p: Path) -> bytes:
    """The file's bytes, decompressed when it is gzipped; a damaged gzip is a ``DataError``."""
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise DataError(f"{p} cannot be read: {e.strerror or e}") from None
    if not raw.startswith(GZIP_MAGIC):
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise DataError(f"{p} is a damaged or truncated gzip file ({e})") from None


def parse_idx(p: Path, raw: bytes, ndim: int) -> np.ndarray:
    """The uint8 array of an IDX file of ``ndim`` dimensions (3: images, 1: labels)."""
    kind = "an images" if ndim == 3 else "a labels"
    if len(raw) < 4 or raw[:2] != b"\0\0":
        raise DataError(
            f"{p}: bad magic number {raw[:4].hex() or '(empty file)'}, an IDX file starts "
            f"with 0000 then its type and dimension count (not an IDX file, or damaged)"
        )
    if raw[2] != UNSIGNED_BYTE:
        raise DataError(
            f"{p}: IDX type 0x{raw[2]:02x}, the MNIST family stores unsigned bytes (0x08)"
        )
    if raw[3] != ndim:
        raise DataError(
            f"{p}: {raw[3]} dimension(s), {kind} file has {ndim} (magic 0x{raw[:4].hex()}, "
            f"expected 0x{UNSIGNED_BYTE << 8 | ndim:08x})"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{p}: {len(raw)} bytes, shorter than its {header}-byte header")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    if any(d <= 0 for d in dims):
        raise DataError(f"{p}: dimensions {list(dims)}, each must be positive")
    expected = int(np.prod(dims, dtype=np.int64))
    have = len(raw) - header
    if have != expected:
        what = "truncated" if have < expected else "trailing bytes: damaged, or not IDX"
        raise DataError(
            f"{p}: {have} bytes of data, its header says {' x '.join(map(str, dims))} = "
            f"{expected} ({what})"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def read_idx(path: str | os.PathLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{"train": (images, labels), "test": ...}`` (uint8 ``(N, rows, cols)``, uint8
    ``(N,)``), with counts and image sizes checked against each other."""
    directory = resolve_path(str(path))
    out = {}
    for split, (images_name, labels_name) in FILES.items():
        images_file = find_file(directory, images_name)
        labels_file = find_file(directory, labels_name)
        x = parse_idx(images_file, read_raw(images_file), 3)
        y = parse_idx(labels_file, read_raw(labels_file), 1)
        if len(x) != len(y):
            raise DataError(
                f"{images_file} holds {len(x)} images but {labels_file} holds {len(y)} labels"
            )
        out[split] = (x, y)
    (train_x, _), (test_x, _) = out["train"], out["test"]
    if train_x.shape[1:] != test_x.shape[1:]:
        raise DataError(
            f"{directory}: training images are {'x'.join(map(str, train_x.shape[1:]))}, test "
            f"images {'x'.join(map(str, test_x.shape[1:]))}; both splits must agree"
        )
    return out


def check_idx(
    path: str, *, sample_shape: tuple[int, ...], n_classes: int, pad_to: int
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The files of ``read_idx``, also checked against the config: labels in
    ``[0, n_classes)`` and ``sample_shape`` equal to ``[1, rows, cols]``, or ``[1, pad_to,
    pad_to]`` when padding (``pad_to`` no smaller than the images)."""
    data = read_idx(path)
    directory = resolve_path(path)
    for split, (_, y) in data.items():
        if y.max() >= n_classes:
            at = int(np.argmax(y >= n_classes))
            labels_file = find_file(directory, FILES[split][1])
            raise DataError(
                f"{labels_file}: label {y[at]} at item {at} is outside [0, {n_classes}) "
                f"(data.n_classes = {n_classes})"
            )
    rows, cols = data["train"][0].shape[1:]
    if pad_to < 0:
        raise DataError(f"data.pad_to must be 0 (no padding) or an image side, got {pad_to}")
    if pad_to and pad_to < max(rows, cols):
        raise DataError(
            f"data.pad_to = {pad_to} is smaller than the {rows}x{cols} images of {directory}"
        )
    side = (pad_to, pad_to) if pad_to else (rows, cols)
    if tuple(sample_shape) != (1, *side):
        hint = "" if pad_to else " (or [1, 32, 32] with data.pad_to = 32)"
        raise DataError(
            f"{directory} holds one-channel {rows}x{cols} images"
            f"{f' padded to {pad_to}x{pad_to}' if pad_to else ''}: data.sample_shape must be "
            f"[1, {side[0]}, {side[1]}]{hint}, got {list(sample_shape)}"
        )
    return data


def pixel_stats(images: np.ndarray) -> tuple[float, float]:
    """Mean and standard deviation of uint8 pixels scaled to [0, 1] (exact, from a histogram:
    no float copy of the images)."""
    counts = np.bincount(images.ravel(), minlength=256).astype(np.float64)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum()
    mean = float(counts @ values / n)
    std = float(np.sqrt(counts @ (values - mean) ** 2 / n))
    return mean, std


def normalise(x: np.ndarray, *, pad_to: int, mean: float, std: float) -> torch.Tensor:
    """uint8 ``(N, rows, cols)`` -> float32 ``(N, 1, side, side)``: scaled to [0, 1], zero-padded
    to ``pad_to`` (centred; 0: as stored), standardised by ``mean`` and ``std``."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0).unsqueeze(1)
    if pad_to:
        rows, cols = x.shape[1:]
        top, left = (pad_to - rows) // 2, (pad_to - cols) // 2
        pad = (left, pad_to - cols - left, top, pad_to - rows - top)
        t = torch.nn.functional.pad(t, pad)
    return t.sub_(mean).div_(std)


def load_idx(
    path: str,
    *,
    sample_shape: tuple[int, ...],
    n_classes: int,
    pad_to: int,
    n_train: int,
    n_test: int,
    seed: int,
) -> Dataset:
    """The IDX dataset, checked (``check_idx``), with ``n_train``/``n_test`` samples drawn
    (seeded, without replacement, as for CIFAR-10) when fewer than the files' are asked for."""
    data = check_idx(path, sample_shape=sample_shape, n_classes=n_classes, pad_to=pad_to)
    (x_train, y_train), (x_test, y_test) = data["train"], data["test"]
    for name, n, have in (("n_train", n_train, len(y_train)), ("n_test", n_test, len(y_test))):
        if n > have:
            raise DataError(
                f"data.{name} = {n} but the IDX files in {resolve_path(path)} hold {have} samples"
            )
    mean, std = pixel_stats(x_train)
    if std == 0:
        raise DataError(f"{resolve_path(path)}: every training pixel has the value {mean * 255:g}")
    rng = np.random.default_rng(seed)
    tr = np.sort(rng.choice(len(y_train), n_train, replace=False))
    te = np.sort(rng.choice(len(y_test), n_test, replace=False))
    return Dataset(
        x_train=normalise(x_train[tr], pad_to=pad_to, mean=mean, std=std),
        y_train=torch.from_numpy(y_train[tr].astype(np.int64)),
        x_test=normalise(x_test[te], pad_to=pad_to, mean=mean, std=std),
        y_test=torch.from_numpy(y_test[te].astype(np.int64)),
        n_classes=n_classes,
    )
