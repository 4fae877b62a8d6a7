"""Causal language-model data from local text files, packed into fixed-length sequences.

A sample is ``seq_len`` tokens ``x`` and the ``seq_len`` tokens that follow each of them ``y``
(``x`` shifted by one). Tokens come from the checkpoint's tokenizer where there is one, otherwise
from a byte-level tokenizer (token = byte, 256 tokens), so a randomly initialised model still
trains on real text and nothing is downloaded.

The corpus is a file or a directory of ``.txt``/``.md``/``.rst``/``.py`` files (read in sorted
order; ``site-packages`` and hidden directories are skipped); an empty path means the Python
standard library's own sources, which every machine has. Held-out split: in a directory, a file
whose path hashes (CRC-32) to 0 mod 10 goes to the test stream, every other file to the training
stream, so test text is never trained on; a single file gives its last tokens to the test set.
"""

from __future__ import annotations

import os
import sysconfig
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

from snake_mpi.data.cifar10 import DataError
from snake_mpi.data.synthetic import Dataset

SUFFIXES = (".txt", ".md", ".rst", ".py")
BYTE_VOCAB = 256
TEST_EVERY = 10
"""One directory file in this many (by path hash) is held out for testing."""


def corpus_path(path: str) -> Path:
    """The configured corpus, or the standard library's sources for an empty path."""
    return Path(path).expanduser() if path else Path(sysconfig.get_paths()["stdlib"])


def corpus_files(root: Path) -> list[Path]:
    """Text files of a corpus directory in a fixed (sorted) order."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(
            d
            for d in dirnames
            if not d.startswith(".") and d not in ("site-packages", "__pycache__")
        )
        for name in sorted(filenames):
            if name.endswith(SUFFIXES):
                out.append(Path(dirpath) / name)
    return out


def is_test_file(root: Path, f: Path) -> bool:
    """Held-out files: CRC-32 of the path relative to the corpus root is 0 mod ``TEST_EVERY``."""
    return zlib.crc32(f.relative_to(root).as_posix().encode()) % TEST_EVERY == 0


def byte_tokens(raw: bytes) -> list[int]:
    """Byte-level tokenizer: one token per byte, then a newline between documents."""
    return list(raw) + [10]


class Tokenizer:
    """Bytes, or the checkpoint's tokenizer (``transformers.AutoTokenizer`` on a local path)."""

    def __init__(self, checkpoint: str = "") -> None:
        self.encode: Callable[[bytes], list[int]]
        if checkpoint:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(checkpoint, local_files_only=True)
            eos = [tok.eos_token_id] if tok.eos_token_id is not None else []
            self.vocab_size = len(tok)
            self.encode = lambda raw: tok(raw.decode("utf-8", "replace"))["input_ids"] + eos
            self.name = f"checkpoint:{checkpoint}"
        else:
            self.vocab_size = BYTE_VOCAB
            self.encode = byte_tokens
            self.name = "bytes"


def has_tokenizer(checkpoint: str) -> bool:
    """Whether a checkpoint directory carries tokenizer files."""
    p = Path(checkpoint)
    return any((p / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json"))


def _stream(files: list[Path], tok: Tokenizer, need: int) -> Iterator[np.ndarray]:
    have = 0
    for f in files:
        if have >= need:
            return
        try:
            ids = np.asarray(tok.encode(f.read_bytes()), dtype=np.int64)
        except OSError:
            continue  # unreadable file: skip, like a missing one
        have += len(ids)
        yield ids


def _take(
    files: list[Path], tok: Tokenizer, n_seq: int, seq_len: int, what: str, where: str = ""
) -> np.ndarray:
    """``n_seq`` sequences of ``seq_len`` + 1 tokens from ``files``; ``where`` says, in the
    error, which files the ``what`` tokens come from."""
    need = n_seq * (seq_len + 1)
    parts = list(_stream(files, tok, need))
    tokens = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if len(tokens) < need:
        raise DataError(
            f"the text corpus has {len(tokens)} {what} tokens; {n_seq} sequences of "
            f"{seq_len} + 1 tokens need {need} (lower data.n_train/n_test or data.seq_len, or "
            "point data.path at more text)" + (f"; {where}" if where else "")
        )
    return tokens[:need].reshape(n_seq, seq_len + 1)


def split_rule(n_files: int, n_held: int) -> str:
    """How a corpus directory is split into training and held-out files, with the counts."""
    return (
        f"held-out (test) text comes from the files whose path relative to data.path hashes "
        f"(CRC-32) to 0 mod {TEST_EVERY}, training text from the others: {n_held} of its "
        f"{n_files} {'/'.join(SUFFIXES)} files are held out"
    )


def check_text(path: str) -> None:
    """Fail early, with the path, if the corpus is missing or has no text files."""
    root = corpus_path(path)
    if root.is_file():
        return
    if not root.is_dir():
        raise DataError(f"data.path {str(root)!r} (text corpus) is neither a file nor a directory")
    if not corpus_files(root):
        raise DataError(f"data.path {str(root)!r} has no {'/'.join(SUFFIXES)} files")


def load_text(
    path: str, *, n_train: int, n_test: int, seq_len: int, tokenizer: Tokenizer
) -> Dataset:
    """``n_train`` training and ``n_test`` held-out sequences of ``seq_len`` tokens (+ targets)."""
    check_text(path)
    root = corpus_path(path)
    if root.is_file():
        seqs = _take([root], tokenizer, n_train + n_test, seq_len, "")
        train, test = seqs[:n_train], seqs[n_train:]
    else:
        files = corpus_files(root)
        held = [f for f in files if is_test_file(root, f)]
        rest = [f for f in files if not is_test_file(root, f)]
        rule = split_rule(len(files), len(held))
        if (n_test and not held) or (n_train and not rest):
            which = "held-out" if n_test and not held else "training"
            raise DataError(
                f"data.path {str(root)!r} gives no {which} text: {rule}; add files, or point "
                "data.path at one file (its last tokens are held out)"
            )
        train = _take(rest, tokenizer, n_train, seq_len, "training", rule)
        test = _take(held, tokenizer, n_test, seq_len, "held-out", rule)
    train_t, test_t = torch.from_numpy(train), torch.from_numpy(test)
    return Dataset(
        x_train=train_t[:, :-1].contiguous(),
        y_train=train_t[:, 1:].contiguous(),
        x_test=test_t[:, :-1].contiguous(),
        y_test=test_t[:, 1:].contiguous(),
        n_classes=tokenizer.vocab_size,
    )
