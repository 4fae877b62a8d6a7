"""CIFAR-10 from the official *binary* release, read from a local path; never downloaded.

The release (https://www.cs.toronto.edu/~kriz/cifar.html, "CIFAR-10 binary version",
``cifar-10-binary.tar.gz``, 162 MB) unpacks to ``cifar-10-batches-bin/`` with
``data_batch_1.bin`` … ``data_batch_5.bin`` (training) and ``test_batch.bin``. Each file is
10 000 records of 3 073 bytes: one label byte (0–9), then a 32×32 image as 1 024 red, 1 024
green and 1 024 blue bytes, rows in order. The path may be that directory, a directory that
contains it, or the ``.tar.gz`` itself (read in place, not unpacked). No pickle is involved.
"""

from __future__ import annotations

import os
import tarfile
import zlib
from pathlib import Path

import numpy as np
import torch

from snake_mpi.data.synthetic import Dataset

RECORD_BYTES = 1 + 3 * 32 * 32
RECORDS_PER_FILE = 10_000
TRAIN_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)]
TEST_FILE = "test_batch.bin"
ENV_VAR = "CIFAR10_DIR"
"""Environment variable naming the CIFAR-10 path when the config's ``data.path`` is empty."""
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
"""Per-channel mean and standard deviation of the training images (the usual normalisation)."""
WHERE = (
    "get the binary version from https://www.cs.toronto.edu/~kriz/cifar.html "
    "(cifar-10-binary.tar.gz) and give its path as data.path or in $CIFAR10_DIR"
)


class DataError(ValueError):
    """A dataset path that cannot be used; the message says what is wrong and what to do."""


def resolve_path(path: str) -> Path:
    """The configured path, or ``$CIFAR10_DIR``; a clear error if neither names anything."""
    raw = path or os.environ.get(ENV_VAR, "")
    if not raw:
        raise DataError(f"data.name = 'cifar10' needs a path: {WHERE}")
    p = Path(raw).expanduser()
    if not p.exists():
        raise DataError(f"CIFAR-10 path {p} does not exist; {WHERE}")
    return p


def _members(p: Path) -> dict[str, bytes] | dict[str, Path]:
    """File name -> path (a directory) or bytes (a tar archive) of the release's files."""
    names = [*TRAIN_FILES, TEST_FILE]
    if p.is_file():
        out: dict[str, bytes] = {}
        try:
            if not tarfile.is_tarfile(p):
                raise DataError(f"{p} is neither a directory nor a tar archive; {WHERE}")
            with tarfile.open(p) as tar:
                for m in tar.getmembers():
                    base = m.name.rsplit("/", 1)[-1]
                    if base in names and m.isfile():
                        f = tar.extractfile(m)
                        assert f is not None
                        out[base] = f.read()
        except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
            raise DataError(
                f"{p} cannot be read to the end (truncated or damaged archive: {e}); {WHERE}"
            ) from None
        missing = [n for n in names if n not in out]
        if missing:
            raise DataError(f"{p} lacks {', '.join(missing)}: not the CIFAR-10 binary release")
        return out
    for d in (p, p / "cifar-10-batches-bin"):
        if all((d / n).is_file() for n in names):
            return {n: d / n for n in names}
    missing = [n for n in names if not (p / n).is_file()]
    raise DataError(
        f"{p} does not hold the CIFAR-10 binary files (missing: {', '.join(missing)}); {WHERE}"
    )


def _decode(name: str, raw: bytes, expected_records: int | None) -> tuple[np.ndarray, np.ndarray]:
    if len(raw) == 0 or len(raw) % RECORD_BYTES:
        raise DataError(
            f"{name}: {len(raw)} bytes is not a whole number of {RECORD_BYTES}-byte records "
            f"(truncated, or not a CIFAR-10 binary file)"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, RECORD_BYTES)
    if expected_records is not None and len(records) != expected_records:
        raise DataError(
            f"{name}: {len(records)} records, the CIFAR-10 release has {expected_records}"
        )
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        bad = int(np.flatnonzero(labels > 9)[0])
        raise DataError(f"{name}: record {bad} has label {labels[bad]}, CIFAR-10 labels are 0-9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def read_cifar10(
    path: str | os.PathLike, *, expected_records: int | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: uint8 images ``(N, 3, 32, 32)``, int64 labels.

    ``expected_records``: the record count every file must have (``RECORDS_PER_FILE`` for the
    release); ``None`` accepts any whole number of records (a subset in the same format).
    """
    members = _members(Path(path))

    def load(name: str) -> tuple[np.ndarray, np.ndarray]:
        src = members[name]
        raw = src.read_bytes() if isinstance(src, Path) else src
        return _decode(name, raw, expected_records)

    parts = [load(n) for n in TRAIN_FILES]
    x_test, y_test = load(TEST_FILE)
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return x_train, y_train, x_test, y_test


def check_cifar10(path: str) -> Path:
    """Fail early (before any message is sent) on a missing or malformed path: every file
    present with a size that is a whole number of records."""
    p = resolve_path(path)
    members = _members(p)
    for name, src in members.items():
        size = src.stat().st_size if isinstance(src, Path) else len(src)
        if size == 0 or size % RECORD_BYTES:
            raise DataError(
                f"{name} in {p}: {size} bytes is not a whole number of {RECORD_BYTES}-byte "
                f"records (truncated, or not a CIFAR-10 binary file)"
            )
    return p


def normalise(x: np.ndarray) -> torch.Tensor:
    """uint8 images -> float32 tensor, scaled to [0, 1] and standardised per channel."""
    t = torch.from_numpy(np.ascontiguousarray(x)).to(torch.float32).div_(255.0)
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)
    return t.sub_(mean).div_(std)


def load_cifar10(
    path: str, *, n_train: int, n_test: int, seed: int, expected_records: int | None = None
) -> Dataset:
    """CIFAR-10 normalised, with ``n_train``/``n_test`` samples drawn (seeded, without
    replacement) when fewer than the release's are asked for."""
    x_train, y_train, x_test, y_test = read_cifar10(
        resolve_path(path), expected_records=expected_records
    )
    rng = np.random.default_rng(seed)
    for name, n, have in (("n_train", n_train, len(y_train)), ("n_test", n_test, len(y_test))):
        if n > have:
            raise DataError(f"data.{name} = {n} but the CIFAR-10 files hold {have} samples")
    tr = np.sort(rng.choice(len(y_train), n_train, replace=False))
    te = np.sort(rng.choice(len(y_test), n_test, replace=False))
    return Dataset(
        x_train=normalise(x_train[tr]),
        y_train=torch.from_numpy(y_train[tr].copy()),
        x_test=normalise(x_test[te]),
        y_test=torch.from_numpy(y_test[te].copy()),
        n_classes=10,
    )
