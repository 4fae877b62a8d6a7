"""Datasets and how their training samples are shared out over the nodes."""

from __future__ import annotations

from snake_mpi.config import DataConfig
from snake_mpi.data.cifar10 import DataError
from snake_mpi.data.partition import (
    label_histogram,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from snake_mpi.data.synthetic import DEFAULT_NOISE, Dataset, make_synthetic

__all__ = [
    "DEFAULT_NOISE",
    "DataError",
    "Dataset",
    "check_data",
    "label_histogram",
    "load_dataset",
    "make_synthetic",
    "partition_dirichlet",
    "partition_iid",
    "partition_shards",
]


def text_tokenizer(d: DataConfig, checkpoint: str = ""):
    """The tokenizer of ``data.name = "text"``: the checkpoint's (``checkpoint``, or ``auto`` with
    a checkpoint that has one) or bytes."""
    from snake_mpi.data.text import Tokenizer, has_tokenizer

    use = d.tokenizer == "checkpoint" or (
        d.tokenizer == "auto" and checkpoint and has_tokenizer(checkpoint)
    )
    return Tokenizer(checkpoint if use else "")


def load_dataset(d: DataConfig, seed: int, *, checkpoint: str = "") -> Dataset:
    """The configured dataset (identical on every rank: generated or drawn from ``seed``);
    ``checkpoint`` is the language model's directory, whose tokenizer text data may use."""
    if d.name == "text":
        from snake_mpi.data.text import load_text

        return load_text(
            d.path,
            n_train=d.n_train,
            n_test=d.n_test,
            seq_len=d.seq_len,
            tokenizer=text_tokenizer(d, checkpoint),
        )
    if d.name == "cifar10":
        from snake_mpi.data.cifar10 import load_cifar10

        return load_cifar10(d.path, n_train=d.n_train, n_test=d.n_test, seed=seed)
    if d.name == "arrays":
        from snake_mpi.data.arrays import load_arrays

        return load_arrays(
            d.path,
            sample_shape=tuple(d.sample_shape),
            n_classes=d.n_classes,
            n_train=d.n_train,
            n_test=d.n_test,
            seed=seed,
        )
    if d.name == "idx":
        from snake_mpi.data.idx import load_idx

        return load_idx(
            d.path,
            sample_shape=tuple(d.sample_shape),
            n_classes=d.n_classes,
            pad_to=d.pad_to,
            n_train=d.n_train,
            n_test=d.n_test,
            seed=seed,
        )
    return make_synthetic(
        n_train=d.n_train,
        n_test=d.n_test,
        n_classes=d.n_classes,
        sample_shape=tuple(d.sample_shape),
        noise=d.noise,
        seed=seed,
    )


def check_data(d: DataConfig) -> None:
    """Fail before any message is sent if the data's path is missing or malformed
    (``DataError`` says what is wrong and where the data come from)."""
    if d.name == "text":
        from snake_mpi.data.text import check_text

        check_text(d.path)
    elif d.name == "cifar10":
        from snake_mpi.data.cifar10 import check_cifar10

        check_cifar10(d.path)
    elif d.name == "arrays":
        from snake_mpi.data.arrays import check_arrays, read_arrays

        check_arrays(
            read_arrays(d.path),
            sample_shape=tuple(d.sample_shape),
            n_classes=d.n_classes,
            path=d.path,
        )
    elif d.name == "idx":
        from snake_mpi.data.idx import check_idx

        check_idx(
            d.path, sample_shape=tuple(d.sample_shape), n_classes=d.n_classes, pad_to=d.pad_to
        )
