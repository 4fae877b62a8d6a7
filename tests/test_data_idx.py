"""The IDX loader (``data.name = "idx"``, the MNIST family) on files the tests write, plain and
gzipped: bit-exact reading, padding, seeded subsets, and every kind of damage refused with a
``DataError`` naming the file. Then the real Fashion-MNIST (Debian's ``dataset-fashion-mnist``,
installed as ``make fashion-mnist`` does, as root; skipped with the reason where it cannot be
had): its known statistics, and a short Snake run of the CNN on it."""

from __future__ import annotations

import gzip
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, run_in_threads
from snake_mpi import cli
from snake_mpi.config import DataConfig, load_config
from snake_mpi.data import DataError, check_data, load_dataset
from snake_mpi.data import idx as idx_mod
from snake_mpi.data.idx import load_idx, pixel_stats, read_idx

IMAGES, LABELS = idx_mod.FILES["train"]
TEST_IMAGES, TEST_LABELS = idx_mod.FILES["test"]
TINY = REPO / "tests" / "configs" / "idx-tiny.toml"
FASHION_CONFIG = REPO / "bench" / "configs" / "fashion_mnist.toml"


def idx_bytes(a: np.ndarray) -> bytes:
    """``a`` (uint8) as an IDX file: 0000, type 0x08, dimension count, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, a.ndim]) + np.array(a.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(a, dtype=np.uint8).tobytes()


def write_idx_dir(root: Path, *, gz: bool, n_train=40, n_test=20, side=28, classes=10, seed=0):
    """An MNIST-family directory of random images and labels; returns what it holds."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth = {}
    for split, n, (images, labels) in (
        ("train", n_train, (IMAGES, LABELS)),
        ("test", n_test, (TEST_IMAGES, TEST_LABELS)),
    ):
        x = rng.integers(0, 256, (n, side, side), dtype=np.uint8)
        y = rng.integers(0, classes, n, dtype=np.uint8)
        for name, a in ((images, x), (labels, y)):
            raw = idx_bytes(a)
            if gz:
                (root / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (root / name).write_bytes(raw)
        truth[split] = (x, y)
    return truth


def cfg(path: Path, **kw) -> DataConfig:
    return DataConfig(name="idx", path=str(path), sample_shape=kw.pop("sample_shape", (1, 28, 28)),
                      n_train=kw.pop("n_train", 40), n_test=kw.pop("n_test", 20), **kw)  # fmt: skip


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gzip"])
def test_reader_is_bit_exact_on_plain_and_gzipped_files(tmp_path, gz):
    truth = write_idx_dir(tmp_path, gz=gz)
    got = read_idx(tmp_path)
    for split in ("train", "test"):
        np.testing.assert_array_equal(got[split][0], truth[split][0])
        np.testing.assert_array_equal(got[split][1], truth[split][1])
    check_data(cfg(tmp_path))
    data = load_dataset(cfg(tmp_path), seed=0)
    assert data.x_train.shape == (40, 1, 28, 28) and data.x_test.shape == (20, 1, 28, 28)
    assert data.y_train.dtype == torch.int64 and data.n_classes == 10
    # every training sample drawn: standardised by the training file's own statistics
    assert abs(float(data.x_train.mean())) < 1e-4 and abs(float(data.x_train.std()) - 1) < 1e-2
    mean, std = pixel_stats(truth["train"][0])
    x = truth["train"][0].astype(np.float64) / 255
    assert mean == pytest.approx(x.mean()) and std == pytest.approx(x.std())


def test_a_gzipped_file_is_known_by_its_content_and_the_plain_file_wins(tmp_path):
    truth = write_idx_dir(tmp_path, gz=True)
    (tmp_path / f"{IMAGES}.gz").rename(tmp_path / IMAGES)  # gzip bytes under the plain name
    np.testing.assert_array_equal(read_idx(tmp_path)["train"][0], truth["train"][0])
    other = write_idx_dir(tmp_path / "other", gz=False, seed=1)
    (tmp_path / LABELS).write_bytes(idx_bytes(other["train"][1]))  # beside LABELS.gz
    np.testing.assert_array_equal(read_idx(tmp_path)["train"][1], other["train"][1])


def test_subsets_are_seeded_and_the_same_for_the_same_seed(tmp_path):
    write_idx_dir(tmp_path, gz=False, n_train=200, n_test=50)
    a = load_dataset(cfg(tmp_path, n_train=64, n_test=16), seed=3)
    b = load_dataset(cfg(tmp_path, n_train=64, n_test=16), seed=3)
    c = load_dataset(cfg(tmp_path, n_train=64, n_test=16), seed=4)
    assert a.x_train.shape[0] == 64 and a.x_test.shape[0] == 16
    assert bool((a.x_train == b.x_train).all()) and bool((a.y_test == b.y_test).all())
    assert not bool((a.x_train == c.x_train).all())
    with pytest.raises(DataError, match=r"data.n_train = 201 but the IDX files .* hold 200"):
        load_dataset(cfg(tmp_path, n_train=201, n_test=16), seed=3)


def test_padding_centres_the_image_in_a_border_of_zero_pixels(tmp_path):
    truth = write_idx_dir(tmp_path, gz=True)
    d = cfg(tmp_path, pad_to=32, sample_shape=(1, 32, 32))
    check_data(d)
    data = load_dataset(d, seed=0)  # every sample drawn: in the files' order
    assert data.x_train.shape == (40, 1, 32, 32) and data.x_test.shape == (20, 1, 32, 32)
    mean, std = pixel_stats(truth["train"][0])
    x = data.x_train[:, 0].numpy() * std + mean  # back to [0, 1]
    np.testing.assert_allclose(x[:, 2:30, 2:30], truth["train"][0] / 255, atol=1e-5)
    x[:, 2:30, 2:30] = 0
    assert np.abs(x).max() < 1e-5  # the border: black, as the images' own background


@pytest.mark.parametrize(
    "sets, match",
    [
        ({"sample_shape": (1, 32, 32)}, r"sample_shape must be \[1, 28, 28\] \(or \[1, 32, 32\]"),
        ({"sample_shape": (3, 28, 28)}, r"one-channel 28x28 images"),
        ({"pad_to": 32}, r"padded to 32x32: data.sample_shape must be \[1, 32, 32\]"),
        ({"pad_to": 20, "sample_shape": (1, 20, 20)}, r"pad_to = 20 is smaller than the 28x28"),
        ({"pad_to": -1}, r"pad_to must be 0"),
    ],
)
def test_a_shape_that_does_not_fit_the_files_is_refused(tmp_path, sets, match):
    write_idx_dir(tmp_path, gz=False)
    with pytest.raises(DataError, match=match):
        check_data(cfg(tmp_path, **sets))


def damage(root: Path, name: str, change) -> None:
    """Rewrite the plain file ``name`` in ``root`` as ``change(bytes)``."""
    (root / name).write_bytes(change((root / name).read_bytes()))


@pytest.mark.parametrize(
    "name, change, match",
    [
        (IMAGES, lambda b: b"\x08\x03" + b[2:], r"bad magic number 0803"),
        (LABELS, lambda b: b[:2] + b"\x0d" + b[3:], r"IDX type 0x0d, the MNIST family"),
        (IMAGES, lambda b: b[:3] + b"\x02" + b[4:], r"2 dimension\(s\), an images file has 3"),
        (LABELS, lambda b: idx_bytes(np.zeros((40, 2), np.uint8)), r"a labels file has 1"),
        (IMAGES, lambda b: b[:-100], r"truncated"),
        (IMAGES, lambda b: b[:10], r"shorter than its 16-byte header"),
        (TEST_LABELS, lambda b: b + b"\0", r"trailing bytes"),
        (IMAGES, lambda b: b"", r"\(empty file\)"),
        (LABELS, lambda b: idx_bytes(np.zeros(39, np.uint8)), r"holds 40 images but .* 39 labels"),
        (TEST_LABELS, lambda b: b[:-1] + b"\x0a", r"label 10 at item 19 is outside \[0, 10\)"),
        (TEST_IMAGES, lambda b: idx_bytes(np.zeros((20, 28, 27), np.uint8)), r"test images 28x27"),
        (IMAGES, lambda b: b[:4] + np.array([0, 28, 28], ">i4").tobytes(), r"must be positive"),
    ],
    ids=[
        "bad-magic", "bad-type", "images-dims", "labels-dims", "truncated", "short-header",
        "trailing", "empty", "count-mismatch", "label-range", "split-sizes", "zero-dim",
    ],
)  # fmt: skip
def test_damaged_files_are_refused_naming_the_file(tmp_path, name, change, match):
    write_idx_dir(tmp_path, gz=False)
    damage(tmp_path, name, change)
    with pytest.raises(DataError, match=match) as e:
        check_data(cfg(tmp_path))
    said = str(tmp_path) if "test images" in match else str(tmp_path / name)  # or the split's
    assert said in str(e.value)


@pytest.mark.parametrize(
    "change",
    [lambda b: b[: len(b) // 2], lambda b: b[:20] + bytes(x ^ 0xFF for x in b[20:60]) + b[60:]],
    ids=["truncated-gzip", "corrupt-gzip"],
)
def test_a_damaged_gzip_is_refused_naming_the_file(tmp_path, change):
    write_idx_dir(tmp_path, gz=True)
    gz_name = f"{IMAGES}.gz"
    damage(tmp_path, gz_name, change)
    with pytest.raises(DataError, match=r"damaged or truncated gzip") as e:
        check_data(cfg(tmp_path))
    assert str(tmp_path / gz_name) in str(e.value)


def test_a_missing_file_or_directory_says_where_the_data_come_from(tmp_path, monkeypatch):
    write_idx_dir(tmp_path, gz=False)
    (tmp_path / TEST_IMAGES).unlink()
    with pytest.raises(DataError, match=rf"has no {TEST_IMAGES} \(nor {TEST_IMAGES}.gz\)"):
        check_data(cfg(tmp_path))
    with pytest.raises(DataError, match=r"data.path .*nowhere does not exist.*make fashion-mnist"):
        check_data(cfg(tmp_path / "nowhere"))
    monkeypatch.setattr(idx_mod, "DEBIAN_DIR", tmp_path / "no-package")
    monkeypatch.delenv(idx_mod.ENV_VAR, raising=False)
    with pytest.raises(DataError, match=r"the default data.path .*no-package does not exist"):
        check_data(DataConfig(name="idx", sample_shape=(1, 28, 28)))
    good = tmp_path / "good"
    write_idx_dir(good, gz=True)
    monkeypatch.setenv(idx_mod.ENV_VAR, str(good))  # data.path empty: $IDX_DIR
    check_data(DataConfig(name="idx", sample_shape=(1, 28, 28)))
    monkeypatch.setenv(idx_mod.ENV_VAR, str(tmp_path / "gone"))
    with pytest.raises(DataError, match=r"\$IDX_DIR .*gone does not exist"):
        check_data(DataConfig(name="idx", sample_shape=(1, 28, 28)))


def test_validate_exits_2_with_the_file_named(tmp_path, capsys):
    write_idx_dir(tmp_path, gz=False)
    damage(tmp_path, LABELS, lambda b: b[:-3])
    sets = [f"data.path={tmp_path}", "data.n_train=40", "data.n_test=20"]
    argv = ["validate", str(FASHION_CONFIG), *[a for s in sets for a in ("--set", s)]]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / LABELS}: 37 bytes of data" in err and "(truncated)" in err


# -- the real Fashion-MNIST ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fashion_mnist() -> Path:
    """Debian's Fashion-MNIST directory, installed first as ``make fashion-mnist`` does (as root
    with apt-get) where it is missing; else the test is skipped with the reason."""
    here = idx_mod.DEBIAN_DIR
    if (here / f"{IMAGES}.gz").is_file():
        return here
    if os.geteuid() != 0:
        pytest.skip("no Fashion-MNIST; installing it (make fashion-mnist, apt-get) needs root")
    if shutil.which("apt-get") is None:
        pytest.skip("no Fashion-MNIST and no apt-get to install dataset-fashion-mnist")
    if shutil.which("make") is None:
        pytest.skip("no Fashion-MNIST and no make to run `make fashion-mnist`")
    got = subprocess.run(["make", "-s", "-C", str(REPO), "fashion-mnist"],
                         capture_output=True, text=True, timeout=900)  # fmt: skip
    if got.returncode != 0:
        pytest.skip(f"could not install Fashion-MNIST: {got.stderr[-800:]}")
    return Path(got.stdout.strip().splitlines()[-1])


# the apt-get install must not overlap another test's (tests/conftest.py XDIST_GROUPS)
real = pytest.mark.xdist_group("system")


@real
def test_fashion_mnist_has_its_known_statistics(fashion_mnist, monkeypatch):
    monkeypatch.delenv(idx_mod.ENV_VAR, raising=False)
    assert fashion_mnist == idx_mod.DEBIAN_DIR  # the default data.path
    data = read_idx("")
    (x, y), (x_test, y_test) = data["train"], data["test"]
    assert x.shape == (60_000, 28, 28) and x_test.shape == (10_000, 28, 28)
    assert pixel_stats(x)[0] * 255 == pytest.approx(72.94, abs=0.005)
    assert np.bincount(y).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    padded = load_idx("", sample_shape=(1, 32, 32), n_classes=10, pad_to=32, n_train=500,
                      n_test=100, seed=0)  # fmt: skip
    assert padded.x_train.shape == (500, 1, 32, 32)


@real
def test_the_bench_config_validates_on_fashion_mnist(fashion_mnist, capsys, monkeypatch):
    monkeypatch.delenv(idx_mod.ENV_VAR, raising=False)
    assert cli.main(["validate", str(FASHION_CONFIG), "--np", "4"]) == 0
    assert "data read and checked" in capsys.readouterr().out
    vgg = ["model.family=vgg11", "data.pad_to=32", "data.sample_shape=[1,32,32]"]
    argv = ["validate", str(FASHION_CONFIG), "--np", "4"]
    assert cli.main([*argv, *[a for s in vgg for a in ("--set", s)]]) == 0


@real
def test_a_short_snake_run_of_the_cnn_on_fashion_mnist_learns(fashion_mnist, tmp_path, monkeypatch):
    from snake_mpi.store import read_result

    monkeypatch.delenv(idx_mod.ENV_VAR, raising=False)
    out = tmp_path / "fmnist.h5"
    run_in_threads(load_config(TINY, []), 2, out)
    res = read_result(out)
    assert 'name = "idx"' in res.config_toml
    assert res.evaluation["accuracy"][-1] > 0.2, res.evaluation["accuracy"]  # chance: 0.10
