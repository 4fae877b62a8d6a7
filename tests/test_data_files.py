"""Real-data loaders on generated files: the CIFAR-10 binary reader (bit-exact, clear errors),
the .npz loader, shard partitioning, Dirichlet skew statistics, and augmentation."""

from __future__ import annotations

import tarfile

import numpy as np
import pytest
import torch

from snake_mpi.config import DataConfig
from snake_mpi.data import DataError, check_data
from snake_mpi.data.arrays import load_arrays
from snake_mpi.data.augment import crop_flip
from snake_mpi.data.cifar10 import (
    RECORD_BYTES,
    TEST_FILE,
    TRAIN_FILES,
    load_cifar10,
    read_cifar10,
)
from snake_mpi.data.partition import partition_dirichlet, partition_shards


def write_cifar(root, per_file=20, seed=0):
    """A CIFAR-10-format release with ``per_file`` records per file; returns what it holds."""
    rng = np.random.default_rng(seed)
    d = root / "cifar-10-batches-bin"
    d.mkdir(parents=True)
    truth = {}
    for name in [*TRAIN_FILES, TEST_FILE]:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], images.reshape(per_file, -1)], axis=1)
        (d / name).write_bytes(records.tobytes())
        truth[name] = (images, labels.astype(np.int64))
    return d, truth


def test_cifar_reader_is_bit_exact_from_a_directory_and_from_the_tarball(tmp_path):
    d, truth = write_cifar(tmp_path / "src")
    x_train, y_train, x_test, y_test = read_cifar10(tmp_path / "src")  # the parent works too
    np.testing.assert_array_equal(x_train, np.concatenate([truth[n][0] for n in TRAIN_FILES]))
    np.testing.assert_array_equal(y_train, np.concatenate([truth[n][1] for n in TRAIN_FILES]))
    np.testing.assert_array_equal(x_test, truth[TEST_FILE][0])
    np.testing.assert_array_equal(y_test, truth[TEST_FILE][1])
    assert x_train.dtype == np.uint8 and x_train.shape == (100, 3, 32, 32)
    archive = tmp_path / "cifar-10-binary.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-bin")
    for a, b in zip(read_cifar10(archive), (x_train, y_train, x_test, y_test), strict=True):
        np.testing.assert_array_equal(a, b)


def test_cifar_reader_errors_say_what_is_wrong(tmp_path, monkeypatch):
    d, _ = write_cifar(tmp_path)
    with pytest.raises(DataError, match="20 records, the CIFAR-10 release has 10000"):
        read_cifar10(d, expected_records=10_000)
    raw = (d / TRAIN_FILES[2]).read_bytes()
    (d / TRAIN_FILES[2]).write_bytes(raw[: 5 * RECORD_BYTES + 100])  # truncated mid-record
    with pytest.raises(DataError, match="data_batch_3.bin: 15465 bytes is not a whole number"):
        read_cifar10(d)
    with pytest.raises(DataError, match="not a whole number"):
        check_data(DataConfig(name="cifar10", path=str(d)))
    bad = bytearray(raw)
    bad[RECORD_BYTES * 3] = 12  # the label byte of record 3
    (d / TRAIN_FILES[2]).write_bytes(bytes(bad))
    with pytest.raises(DataError, match="record 3 has label 12"):
        read_cifar10(d)
    (d / TEST_FILE).unlink()
    with pytest.raises(DataError, match="missing: test_batch.bin.*cs.toronto.edu"):
        read_cifar10(d)
    with pytest.raises(DataError, match="does not exist"):
        check_data(DataConfig(name="cifar10", path=str(tmp_path / "nowhere")))
    monkeypatch.delenv("CIFAR10_DIR", raising=False)
    with pytest.raises(DataError, match=r"needs a path.*CIFAR10_DIR"):
        check_data(DataConfig(name="cifar10"))


def test_cifar_loader_normalises_subsamples_and_follows_the_environment(tmp_path, monkeypatch):
    write_cifar(tmp_path)
    monkeypatch.setenv("CIFAR10_DIR", str(tmp_path))
    ds = load_cifar10("", n_train=60, n_test=10, seed=1)
    assert ds.x_train.shape == (60, 3, 32, 32) and ds.x_train.dtype == torch.float32
    assert ds.n_classes == 10 and ds.y_test.shape == (10,)
    assert float(ds.x_train.min()) > -2.5 and float(ds.x_train.max()) < 2.6  # standardised
    again = load_cifar10(str(tmp_path), n_train=60, n_test=10, seed=1)
    assert torch.equal(ds.x_train, again.x_train)
    with pytest.raises(DataError, match="n_train = 500 but the CIFAR-10 files hold 100"):
        load_cifar10("", n_train=500, n_test=10, seed=1)


def write_npz(path, **over):
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.standard_normal((50, 8)).astype(np.float32),
        "y_train": rng.integers(0, 3, 50),
        "x_test": rng.standard_normal((20, 8)).astype(np.float32),
        "y_test": rng.integers(0, 3, 20),
    }
    arrays.update(over)
    arrays = {k: v for k, v in arrays.items() if v is not None}
    np.savez(path, **arrays)
    return arrays


def test_npz_loader_reads_and_validates(tmp_path):
    good = tmp_path / "good.npz"
    arrays = write_npz(good)
    ds = load_arrays(str(good), sample_shape=(8,), n_classes=3, n_train=50, n_test=20, seed=0)
    order = np.argsort(arrays["y_train"], kind="stable")  # the draw keeps every sample once
    assert sorted(ds.y_train.tolist()) == arrays["y_train"][order].tolist()
    cases = [
        ({"y_test": None}, "lacks y_test"),
        ({"y_train": np.zeros(49, np.int64)}, "x_train has 50 samples but y_train has 49"),
        ({"y_train": np.full(50, 3)}, r"labels from 3 to 3, outside \[0, 3\)"),
        ({"y_train": np.zeros(50, np.float32)}, "must be a 1-D integer array"),
        ({"x_test": np.zeros((20, 9), np.float32)}, r"shape \[9\], the config says"),
    ]
    for over, message in cases:
        bad = tmp_path / "bad.npz"
        write_npz(bad, **over)
        with pytest.raises(DataError, match=message):
            check_data(DataConfig(name="arrays", path=str(bad), sample_shape=(8,), n_classes=3))
    objects = tmp_path / "objects.npz"
    write_npz(objects, x_train=np.array([{"a": 1}] * 50, dtype=object))
    with pytest.raises(DataError, match="without pickled objects"):
        check_data(DataConfig(name="arrays", path=str(objects), sample_shape=(8,), n_classes=3))
    with pytest.raises(DataError, match="is not a file"):
        check_data(DataConfig(name="arrays", path=str(tmp_path / "none.npz")))


def test_shards_give_each_node_few_classes_and_cover_every_sample():
    labels = np.repeat(np.arange(10), 100)
    parts = partition_shards(labels, 5, 2, np.random.default_rng(0))
    assert sorted(np.concatenate(parts).tolist()) == list(range(1000))
    assert all(len(np.unique(labels[p])) <= 2 for p in parts)  # shards align with classes here
    again = partition_shards(labels, 5, 2, np.random.default_rng(0))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def mean_label_entropy(labels, parts, n_classes=10):
    ent = []
    for p in parts:
        q = np.bincount(labels[p], minlength=n_classes) / len(p)
        q = q[q > 0]
        ent.append(float(-(q * np.log(q)).sum()))
    return float(np.mean(ent))


def test_dirichlet_skew_grows_as_alpha_shrinks_and_no_node_is_empty():
    labels = np.repeat(np.arange(10), 200)
    entropy = {}
    for alpha in (100.0, 1.0, 0.1):
        runs = [partition_dirichlet(labels, 8, alpha, np.random.default_rng(s)) for s in range(5)]
        assert all(min(len(p) for p in parts) >= 1 for parts in runs)
        entropy[alpha] = np.mean([mean_label_entropy(labels, parts) for parts in runs])
    # near-uniform labels per node at alpha 100 (max entropy ln 10 = 2.30), few at 0.1
    assert entropy[100.0] > 2.2 > entropy[1.0] > entropy[0.1], entropy
    assert entropy[0.1] < 1.2, entropy


def test_crop_flip_is_seeded_and_only_moves_pixels():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) + 1
    a = crop_flip(x, torch.Generator().manual_seed(0))
    b = crop_flip(x, torch.Generator().manual_seed(0))
    assert torch.equal(a, b) and a.shape == x.shape
    for i in range(2):  # every value is a pixel of the same image (or zero padding)
        assert set(a[i].unique().tolist()) <= set(x[i].unique().tolist()) | {0.0}
    same = crop_flip(x, torch.Generator().manual_seed(1), pad=0)
    for i in range(2):
        assert torch.equal(same[i], x[i]) or torch.equal(same[i], x[i].flip(-1))


def test_a_snake_run_trains_a_narrow_vgg_on_cifar_files_with_augmentation(tmp_path):
    from snake_mpi.config import from_dict
    from snake_mpi.run import execute
    from snake_mpi.store import read_result
    from snake_mpi.transport.localcomm import ThreadWorld

    write_cifar(tmp_path / "data")
    cfg = from_dict(
        {
            "torch_threads": 1,
            "model": {"family": "vgg11", "width": 2, "middle_blocks": 4},
            "data": {
                "name": "cifar10",
                "path": str(tmp_path / "data"),
                "n_train": 100,
                "n_test": 20,
                "augment": True,
                "partition": "shards",
                "shards_per_node": 2,
            },
            "train": {"rounds": 1, "batch_size": 25},
            "probes": {"enabled": False},
        }
    )
    out = tmp_path / "vgg.h5"
    ThreadWorld(2).run(lambda c: execute(cfg, c, out), deadline_s=120)
    res = read_result(out)
    assert res.attrs["dataset"] == "cifar10" and res.attrs["model"] == "vgg11"
    hist = res.tables["ranks"]["label_histogram"]
    # 4 label-sorted shards of 25 over 10 classes: each node lacks several classes
    assert hist.sum() == 100 and (hist == 0).sum(axis=1).min() >= 2, hist
    assert res.rounds["samples"].sum() == 100
