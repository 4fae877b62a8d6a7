"""Named arrays in the safetensors layout, written durably and read without pickle.

The layout (https://huggingface.co/docs/safetensors): an 8-byte little-endian header length,
a JSON header ``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{str: str}}``, then the raw little-endian bytes. Written here without the safetensors package
(the format is that small), so a checkpoint file opens with ``safetensors.numpy.load_file``
too. Arrays are numpy; bfloat16 tensors travel as their raw 2-byte words (dtype ``BF16``).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from snake_mpi.durable import as_storage_full, ensure_room, fsync_dir, is_no_space

_DTYPES = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
}
_CODES = {np.dtype(v): k for k, v in _DTYPES.items()}
BF16 = "BF16"
"""bfloat16: numpy has no such type; the words are held as uint16 and named BF16 here."""
_ALIGN = 8


class TensorFileError(ValueError):
    """A file that is not a readable tensor file (truncated, foreign, damaged)."""


def dtype_code(arr: np.ndarray, bf16: bool = False) -> str:
    """The safetensors dtype name of ``arr`` (``bf16``: uint16 words of bfloat16 values)."""
    if bf16:
        if arr.dtype != np.uint16:
            raise ValueError("bfloat16 words must be held as uint16")
        return BF16
    try:
        return _CODES[arr.dtype]
    except KeyError:
        raise ValueError(f"dtype {arr.dtype} cannot be stored") from None


def encode(
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    bf16: frozenset[str] = frozenset(),
) -> tuple[bytes, list[np.ndarray]]:
    """The header bytes and the arrays' byte views, in file order (``bf16``: names whose
    uint16 arrays hold bfloat16 words)."""
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset, views = 0, []
    for name, arr in arrays.items():
        a = np.ascontiguousarray(arr).reshape(np.shape(arr))  # a 0-d array stays 0-d
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        header[name] = {
            "dtype": dtype_code(a, name in bf16),
            "shape": list(a.shape),
            "data_offsets": [offset, offset + a.nbytes],
        }
        offset += a.nbytes
        views.append(a.reshape(-1).view(np.uint8))
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-(8 + len(text)) % _ALIGN)
    return struct.pack("<Q", len(text)) + text, views


def write(
    path: Path,
    arrays: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
    *,
    bf16: frozenset[str] = frozenset(),
    before_rename: object = None,
) -> tuple[int, str]:
    """Write ``arrays`` to ``path`` durably: a temporary name in the same directory, fsync,
    rename, fsync of the directory. Returns ``(bytes, sha256 hex)`` of the file.

    ``before_rename``: a callable run once the temporary file is complete and synced, just
    before the rename (the test-only fault hook ``debug.fail_kind = "kill_in_checkpoint"``)."""
    head, views = encode(arrays, metadata, bf16)
    tmp = path.with_name(path.name + ".tmp")
    size = len(head) + sum(v.nbytes for v in views)
    kept = "nothing of it was written, and the checkpoints before it are kept"
    ensure_room(path, size, what="a checkpoint file", kept=kept)
    h = hashlib.sha256(head)
    try:
        with open(tmp, "wb") as f:
            f.write(head)
            for v in views:
                f.write(v.data)
                h.update(v.data)
            f.flush()
            os.fsync(f.fileno())
            nbytes = f.tell()
    except OSError as e:
        tmp.unlink(missing_ok=True)  # no half-written file behind
        if is_no_space(e):
            raise as_storage_full(e, path, what="a checkpoint file", kept=kept) from None
        raise
    if callable(before_rename):
        before_rename()
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return nbytes, h.hexdigest()


def read(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], frozenset[str]]:
    """The arrays, the metadata and the names of bfloat16 arrays (as uint16 words) of a file
    written by ``write``; ``TensorFileError`` naming the file if it is not one."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise TensorFileError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < 8:
        raise TensorFileError(f"{path}: {len(raw)} bytes, too short for a tensor file")
    (n,) = struct.unpack("<Q", raw[:8])
    if n > len(raw) - 8:
        raise TensorFileError(f"{path}: header of {n} bytes, the file has {len(raw)}")
    try:
        header = json.loads(raw[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TensorFileError(f"{path}: header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise TensorFileError(f"{path}: header is not a JSON object")
    body = memoryview(raw)[8 + n :]
    meta = header.pop("__metadata__", {}) or {}
    if not isinstance(meta, dict):
        raise TensorFileError(f"{path}: __metadata__ is not a JSON object")
    arrays: dict[str, np.ndarray] = {}
    bf16: set[str] = set()
    for name, entry in header.items():
        try:
            code, shape = entry["dtype"], [int(s) for s in entry["shape"]]
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise TensorFileError(f"{path}: entry {name!r} is malformed") from None
        dtype = np.uint16 if code == BF16 else _DTYPES.get(code)
        if dtype is None:
            raise TensorFileError(f"{path}: entry {name!r} has unknown dtype {code!r}")
        count = int(np.prod(shape, dtype=np.int64))
        if not 0 <= begin <= end <= len(body) or end - begin != count * np.dtype(dtype).itemsize:
            raise TensorFileError(f"{path}: entry {name!r} lies outside the file or is cut")
        arrays[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape)
        if code == BF16:
            bf16.add(name)
    return arrays, {str(k): str(v) for k, v in meta.items()}, frozenset(bf16)


def sha256_of(path: Path, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_bytes):
            h.update(block)
    return h.hexdigest()
