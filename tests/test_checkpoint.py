"""Checkpoints without MPI: the tensor file (safetensors layout, atomic write, damaged files),
the checkpoint directory (manifest as commit point, pruning), the resume checks, a run
interrupted and resumed with ranks as threads (bit-identical to one never interrupted), and
every checkpoint file's bytes against the analytic count."""

from __future__ import annotations

import dataclasses
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from snake_mpi.analysis import analytic
from snake_mpi.blocks import block_nbytes, block_tensors
from snake_mpi.checkpoint import find_resume, tensorfile
from snake_mpi.checkpoint import manifest as mf
from snake_mpi.checkpoint.tensorfile import TensorFileError
from snake_mpi.config import ConfigError, load_config, to_toml
from snake_mpi.context import SchemeReport
from snake_mpi.run import execute, prepare_checkpoints, seeds_for
from snake_mpi.schemes.fedavg import sampled_clients
from snake_mpi.schemes.snake import plan_segments
from snake_mpi.store import partial_path, read_result
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"

# ------------------------------------------------------------------ the tensor file


def bf16_words(values: list[float]) -> np.ndarray:
    return torch.tensor(values, dtype=torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def sample_arrays() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "i64": np.arange(-4, 8, dtype=np.int64).reshape(2, 2, 3),
        "u8": rng.integers(0, 256, size=17, dtype=np.uint8),  # odd size: later offsets unaligned
        "bf16": bf16_words([1.0, -2.5, 3.140625, 0.0]),
        "scalar": np.array(7.25, dtype=np.float64),
        "empty": np.zeros((0, 4), dtype=np.float32),
        "f64_big_endian": np.arange(3, dtype=">f8"),
        "transposed": np.arange(6, dtype=np.int32).reshape(2, 3).T,
    }


def parse_by_hand(path: Path) -> tuple[dict, bytes]:
    """The header and the data of a safetensors file, read as the format's spec says."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    text = raw[8 : 8 + n]
    assert text.startswith(b"{") and text.rstrip(b" ").endswith(b"}")  # padding: spaces only
    assert (8 + n) % 8 == 0  # padded with spaces so that the data start 8-byte aligned
    return json.loads(text), raw[8 + n :]


def test_tensor_file_round_trip_keeps_values_dtypes_shapes_and_metadata(tmp_path):
    arrays = sample_arrays()
    meta = {"rank": "3", "note": "ünïcode | and, commas", "empty": ""}
    path = tmp_path / "a.safetensors"
    nbytes, sha = tensorfile.write(path, arrays, meta, bf16=frozenset({"bf16"}))
    assert nbytes == path.stat().st_size and sha == tensorfile.sha256_of(path)
    back, meta_back, bf16 = tensorfile.read(path)
    assert meta_back == meta and bf16 == frozenset({"bf16"})
    assert list(back) == list(arrays)
    for name, a in arrays.items():
        b = back[name]
        assert b.shape == a.shape, name
        assert b.dtype == a.dtype.newbyteorder("="), name
        np.testing.assert_array_equal(b, a, err_msg=name)
    assert back["scalar"].shape == () and back["empty"].shape == (0, 4)
    words = torch.from_numpy(back["bf16"].copy()).view(torch.bfloat16)
    assert words.tolist() == [1.0, -2.5, 3.140625, 0.0]


def test_tensor_file_without_metadata_or_arrays(tmp_path):
    tensorfile.write(tmp_path / "none.safetensors", {})
    assert tensorfile.read(tmp_path / "none.safetensors") == ({}, {}, frozenset())
    tensorfile.write(tmp_path / "meta.safetensors", {}, {"k": "v"})
    assert tensorfile.read(tmp_path / "meta.safetensors") == ({}, {"k": "v"}, frozenset())


def test_unstorable_dtypes_are_refused():
    with pytest.raises(ValueError, match="cannot be stored"):
        tensorfile.encode({"c": np.zeros(2, dtype=np.complex64)})
    with pytest.raises(ValueError, match="uint16"):
        tensorfile.encode({"w": np.zeros(2, dtype=np.float32)}, bf16=frozenset({"w"}))


def test_tensor_file_is_valid_safetensors(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "a.safetensors"
    tensorfile.write(path, arrays, {"rank": "0"}, bf16=frozenset({"bf16"}))
    header, data = parse_by_hand(path)
    assert header.pop("__metadata__") == {"rank": "0"}
    assert list(header) == list(arrays)
    codes = {
        "f32": "F32",
        "i64": "I64",
        "u8": "U8",
        "bf16": "BF16",
        "scalar": "F64",
        "empty": "F32",
        "f64_big_endian": "F64",
        "transposed": "I32",
    }
    end = 0
    for name, entry in header.items():
        assert set(entry) == {"dtype", "shape", "data_offsets"}
        assert entry["dtype"] == codes[name] and entry["shape"] == list(arrays[name].shape)
        begin, stop = entry["data_offsets"]
        assert begin == end, f"{name}: data_offsets leave a hole or overlap"
        assert stop - begin == arrays[name].nbytes
        end = stop
    assert end == len(data)  # the data are exactly the tensors, nothing after them
    le = arrays["f64_big_endian"].astype("<f8").tobytes()
    begin, stop = header["f64_big_endian"]["data_offsets"]
    assert data[begin:stop] == le  # stored little-endian whatever the array's byte order
    begin, stop = header["transposed"]["data_offsets"]
    assert data[begin:stop] == np.ascontiguousarray(arrays["transposed"]).tobytes()


def test_tensor_file_opens_with_the_safetensors_package(tmp_path):
    st = pytest.importorskip("safetensors.numpy")
    arrays = {k: v for k, v in sample_arrays().items() if k != "bf16"}  # numpy lacks bfloat16
    path = tmp_path / "a.safetensors"
    tensorfile.write(path, arrays, {"rank": "0"})
    loaded = st.load_file(str(path))
    assert set(loaded) == set(arrays)
    for name, a in arrays.items():
        np.testing.assert_array_equal(loaded[name], a, err_msg=name)
    safe_open = pytest.importorskip("safetensors").safe_open
    with safe_open(str(path), framework="numpy") as f:
        assert f.metadata() == {"rank": "0"}
    # bfloat16 words as torch reads them
    st_torch = pytest.importorskip("safetensors.torch")
    tensorfile.write(path, {"w": bf16_words([1.5, -0.25])}, bf16=frozenset({"w"}))
    w = st_torch.load_file(str(path))["w"]
    assert w.dtype == torch.bfloat16 and w.tolist() == [1.5, -0.25]


def write_sample(path: Path) -> bytes:
    tensorfile.write(path, {"a": np.arange(10, dtype=np.float32), "b": np.ones(3)}, {"m": "1"})
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 5, 8, 30, -1])
def test_a_truncated_file_raises_naming_it(tmp_path, keep):
    path = tmp_path / "t.safetensors"
    raw = write_sample(path)
    path.write_bytes(raw[: keep if keep >= 0 else len(raw) - 1])
    with pytest.raises(TensorFileError, match=str(path)):
        tensorfile.read(path)


def damaged_header(raw: bytes, change) -> bytes:
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    text = json.dumps(change(header)).encode()
    return struct.pack("<Q", len(text)) + text + raw[8 + n :]


def set_entry(name: str, key: str, value):
    def change(header: dict) -> dict:
        header[name][key] = value
        return header

    return change


@pytest.mark.parametrize(
    ("how", "message"),
    [
        (lambda raw: struct.pack("<Q", 10**6) + raw[8:], "header of 1000000 bytes"),
        (lambda raw: raw[:8] + b"\xff" + raw[9:], "not JSON"),
        (lambda raw: raw[:8] + b"[" + raw[9:], "not JSON"),
        (lambda raw: damaged_header(raw, lambda h: [1, 2]), "not a JSON object"),
        (lambda raw: damaged_header(raw, set_entry("a", "data_offsets", [0, 4000])), "outside"),
        (lambda raw: damaged_header(raw, set_entry("a", "data_offsets", [-8, 32])), "outside"),
        (lambda raw: damaged_header(raw, set_entry("a", "shape", [11])), "cut"),
        (lambda raw: damaged_header(raw, set_entry("a", "dtype", "F8_E4M3")), "unknown dtype"),
        (lambda raw: damaged_header(raw, set_entry("a", "shape", "ten")), "malformed"),
        (lambda raw: damaged_header(raw, lambda h: h | {"c": 5}), "malformed"),
        (lambda raw: damaged_header(raw, lambda h: h | {"__metadata__": [1]}), "__metadata__"),
    ],
)
def test_a_damaged_file_raises_naming_it(tmp_path, how, message):
    path = tmp_path / "d.safetensors"
    path.write_bytes(how(write_sample(path)))
    with pytest.raises(TensorFileError, match=message) as e:
        tensorfile.read(path)
    assert str(path) in str(e.value)


def test_a_missing_file_raises_naming_it(tmp_path):
    with pytest.raises(TensorFileError, match="cannot read") as e:
        tensorfile.read(tmp_path / "gone.safetensors")
    assert "gone.safetensors" in str(e.value)


def test_write_is_atomic_the_hook_sees_only_the_complete_temporary(tmp_path):
    path = tmp_path / "rank-00000.safetensors"
    arrays = {"x": np.arange(1000, dtype=np.int64)}
    seen = {}

    def hook():
        seen["names"] = sorted(p.name for p in tmp_path.iterdir())
        tmp = path.with_name(path.name + ".tmp")
        seen["tmp"], _, _ = tensorfile.read(tmp)  # complete and synced before the rename

    nbytes, sha = tensorfile.write(path, arrays, before_rename=hook)
    assert seen["names"] == ["rank-00000.safetensors.tmp"]
    np.testing.assert_array_equal(seen["tmp"]["x"], arrays["x"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rank-00000.safetensors"]
    assert (nbytes, sha) == (path.stat().st_size, tensorfile.sha256_of(path))


def test_a_write_that_dies_before_the_rename_leaves_the_old_file(tmp_path):
    path = tmp_path / "f.safetensors"
    tensorfile.write(path, {"x": np.zeros(3)})
    old = path.read_bytes()

    def die():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tensorfile.write(path, {"x": np.ones(3)}, before_rename=die)
    assert path.read_bytes() == old
    assert (tmp_path / "f.safetensors.tmp").exists()


class FakeRecorder:
    def __init__(self, round_: int, cum: int, written: int, elapsed: float) -> None:
        self.round, self.cum_bytes_sent, self.n_rounds_written = round_, cum, written
        self.elapsed = elapsed

    def elapsed_s(self) -> float:
        return self.elapsed

    def resume(self, *, cum_bytes_sent: int, n_rounds_written: int, elapsed_s: float) -> None:
        self.cum_bytes_sent, self.n_rounds_written = cum_bytes_sent, n_rounds_written
        self.elapsed = elapsed_s


def norm_model(seed: int):
    """Blocks with a 0-d buffer (batch norm's ``num_batches_tracked``) and bfloat16 weights."""
    from torch import nn

    from snake_mpi.blocks import BlockModel

    torch.manual_seed(seed)
    return BlockModel(
        [
            ("stem", nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6))),
            ("mid", nn.Linear(6, 6).to(torch.bfloat16)),
            ("mid2", nn.Linear(6, 6)),
            ("head", nn.Linear(6, 2)),
        ]
    )


def fake_ctx(model, seed: int):
    from types import SimpleNamespace

    from snake_mpi.transport.wire import CommStats

    stats = CommStats(bytes_sent=123, wait_s=0.5, control_bytes_sent=77)
    return SimpleNamespace(
        model=model,
        record=FakeRecorder(4, 9999, 5, 12.5),
        generator=torch.Generator().manual_seed(seed),
        comm=SimpleNamespace(rank=2, stats=stats),
        report=SchemeReport(capabilities=[1.0, 2.0], plan=[[0], [1, 2, 3]]),
        cfg=None,
    )


def test_state_capture_and_restore_round_trip_through_a_file(tmp_path):
    from snake_mpi.blocks import model_hash, release_blocks, released_blocks
    from snake_mpi.checkpoint import state

    model = norm_model(0)
    with torch.no_grad():
        model.blocks[0][1].running_mean.add_(1.5)
        model.blocks[0][1].num_batches_tracked.fill_(7)
        model.blocks[1].weight.mul_(3)
    model.versions[:] = [4, 5, 0, 4]
    release_blocks(model, [3])  # freed (keep = "own"): not written, freed again on restore
    ctx = fake_ctx(model, 11)
    torch.manual_seed(5)
    np.random.seed(6)
    arrays, meta, bf16 = state.capture(ctx, carried=True)
    assert state.saved_blocks(model) == [0, 1]  # block 2 at version 0, block 3 freed
    assert {n for n in arrays if n.startswith("block.")} == {f"block.0.{i}" for i in range(7)} | {
        "block.1.0",
        "block.1.1",
    }
    assert bf16 == {"block.1.0", "block.1.1"}
    path = tmp_path / "rank-00002.safetensors"
    tensorfile.write(path, arrays, meta, bf16=frozenset(bf16))
    header, _ = parse_by_hand(path)
    assert header["block.0.6"]["shape"] == [] and header["block.0.6"]["dtype"] == "I64"
    assert header["block.1.0"]["dtype"] == "BF16"
    import random

    random.seed(8)
    arrays, meta, bf16 = state.capture(ctx, carried=True)  # again, Python's state seeded
    tensorfile.write(path, arrays, meta, bf16=frozenset(bf16))
    expect_py = [random.random() for _ in range(3)]
    expect_torch = torch.rand(3)
    expect_np = np.random.random(3)
    expect_gen = torch.rand(3, generator=ctx.generator)

    fresh = norm_model(1)  # another init: everything written must come back
    ctx2 = fake_ctx(fresh, 99)
    ctx2.comm.stats.bytes_sent = 0
    ctx2.report = SchemeReport()
    back, meta2, bf16_2 = tensorfile.read(path)
    state.restore(ctx2, back, meta2, bf16_2)
    for b in (0, 1):
        for t, u in zip(block_tensors(fresh, b), block_tensors(model, b), strict=True):
            assert t.dtype == u.dtype and t.shape == u.shape and torch.equal(t, u)
    assert fresh.versions.tolist() == [4, 5, 0, 4] and released_blocks(fresh) == [3]
    assert torch.equal(torch.rand(3), expect_torch)
    np.testing.assert_array_equal(np.random.random(3), expect_np)
    assert [random.random() for _ in range(3)] == expect_py
    assert torch.equal(torch.rand(3, generator=ctx2.generator), expect_gen)
    assert model_hash(fresh) != model_hash(norm_model(1))  # (reseeds torch)
    assert (ctx2.comm.stats.bytes_sent, ctx2.comm.stats.wait_s) == (123, 0.5)
    assert ctx2.comm.stats.control_bytes_sent == 77
    assert ctx2.report == SchemeReport(capabilities=[1.0, 2.0])
    rec = ctx2.record
    assert (rec.cum_bytes_sent, rec.n_rounds_written, rec.elapsed) == (9999, 5, 12.5)
    assert meta2["carried"] == "1" and meta2["rank"] == "2" and meta2["round"] == "4"


def test_restore_refuses_a_checkpoint_of_another_model():
    from snake_mpi.checkpoint import state

    model = norm_model(0)
    model.versions[:] = 1
    arrays, meta, bf16 = state.capture(fake_ctx(model, 1), carried=False)
    other = norm_model(0)
    with pytest.raises(ValueError, match="block versions"):
        state.restore(fake_ctx(other, 1), arrays | {"versions": np.ones(5, np.int64)}, meta, bf16)
    wrong = arrays | {"block.2.0": np.zeros((6, 5), dtype=np.float32)}
    with pytest.raises(ValueError, match=r"checkpoint tensor block.2.0: torch.float32 x 30"):
        state.restore(fake_ctx(other, 1), wrong, meta, bf16)


# ------------------------------------------------------------------ the checkpoint directory


def make_checkpoint(directory: Path, k: int, *, commit: bool = True) -> Path:
    folder = mf.round_dir(directory, k)
    folder.mkdir(parents=True)
    tensorfile.write(folder / mf.rank_file(0), {"x": np.full(2, k)})
    if commit:
        mf.write_manifest(folder, {"format": mf.FORMAT, "rounds_done": k})
    return folder


def manifest_of_two(rounds_done: int = 3) -> dict:
    files = [
        {"rank": k, "name": mf.rank_file(k), "bytes": 10, "sha256": "ab" * 32, "write_s": 0.1}
        for k in range(2)
    ]
    return {"format": mf.FORMAT, "rounds_done": rounds_done, "world_size": 2,
            "config_toml": "", "files": files}  # fmt: skip


def test_manifest_round_trip_and_its_refusals(tmp_path):
    folder = tmp_path / "round-000003"
    folder.mkdir()
    m = manifest_of_two()
    mf.write_manifest(folder, m)
    assert mf.read_manifest(folder) == m
    assert sorted(p.name for p in folder.iterdir()) == ["manifest.json"]  # no .tmp left
    (folder / "manifest.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot be read"):
        mf.read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps(m | {"format": 99}))
    with pytest.raises(ValueError, match="not a snake-mpi checkpoint manifest"):
        mf.read_manifest(folder)
    (folder / "manifest.json").write_text(json.dumps({k: v for k, v in m.items() if k != "files"}))
    with pytest.raises(ValueError, match="lacks 'files'"):
        mf.read_manifest(folder)


def _entry(m: dict, i: int, **changes) -> dict:
    files = [dict(e) for e in m["files"]]
    files[i].update(changes)
    return m | {"files": files}


MALFORMED = {
    "name-leaves-the-folder": (
        lambda m: _entry(m, 1, name="../../x"),
        "files[1] names '../../x'; rank 1's file is 'rank-00001.safetensors' in the "
        "checkpoint's own folder",
    ),
    "name-absolute": (lambda m: _entry(m, 0, name="/etc/passwd"), "files[0] names '/etc/passwd'"),
    "name-of-another-rank": (
        lambda m: _entry(m, 0, name=mf.rank_file(1)),
        "files[0] names 'rank-00001.safetensors'; rank 0's file is",
    ),
    "rounds-not-the-folder": (
        lambda m: m | {"rounds_done": 2},
        "says rounds_done = 2, but its folder is the checkpoint after round 3",
    ),
    "files-a-string": (lambda m: m | {"files": "rank-00000.safetensors"}, "files is not a list"),
    "rank-not-an-integer": (lambda m: _entry(m, 1, rank="1"), "files[1] has rank '1', not one"),
    "rank-out-of-range": (lambda m: _entry(m, 1, rank=7), "files[1] has rank 7, not one of 0..1"),
    "rank-twice": (
        lambda m: _entry(_entry(m, 1, rank=0), 1, name=mf.rank_file(0)),
        "files list ranks [0, 0], not each of 0..1 once",
    ),
    "bytes-a-string": (lambda m: _entry(m, 0, bytes="10"), "files[0] bytes = '10' is not a size"),
    "sha-not-hex": (lambda m: _entry(m, 0, sha256="zz"), "sha256 = 'zz' is not a SHA-256"),
    "rounds-a-float": (lambda m: m | {"rounds_done": 3.0}, "rounds_done = 3.0 is not a positive"),
    "world-zero": (lambda m: m | {"world_size": 0}, "world_size = 0 is not a positive integer"),
    "config-not-text": (lambda m: m | {"config_toml": 5}, "config_toml is not a string"),
    "attempts-a-string": (lambda m: m | {"attempts": "x"}, "attempts is not a list of records"),
}
"""Manifests a hand or a bug could write: each is refused with a ``ValueError`` naming why (a
checkpoint with one is skipped like a damaged one), never read past."""


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_manifest_is_refused_naming_why(tmp_path, name):
    edit, message = MALFORMED[name]
    folder = tmp_path / "round-000003"
    folder.mkdir()
    (folder / mf.MANIFEST).write_text(json.dumps(edit(manifest_of_two())))
    with pytest.raises(ValueError, match=re.escape(message)):
        mf.read_manifest(folder)


def test_names_of_folders_and_files(tmp_path):
    assert mf.round_dir(tmp_path, 7).name == "round-000007"
    assert mf.round_dir(tmp_path, 1234567).name == "round-1234567"
    assert mf.rank_file(12) == "rank-00012.safetensors"
    cfg = load_config(TINY)
    assert mf.checkpoint_dir(cfg, tmp_path / "r.h5") == tmp_path / "r.h5.ckpt"
    other = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, dir="/x/y"))
    assert mf.checkpoint_dir(other, tmp_path / "r.h5") == Path("/x/y")


def test_committed_lists_only_folders_with_a_manifest_newest_first(tmp_path):
    assert mf.committed(tmp_path / "nowhere") == [] and mf.round_dirs(tmp_path / "nowhere") == []
    for k in (2, 10, 4):
        make_checkpoint(tmp_path, k)
    make_checkpoint(tmp_path, 12, commit=False)
    (tmp_path / "round-7").mkdir()  # too few digits: not a checkpoint folder
    (tmp_path / "round-000009").write_text("a file, not a folder")
    (tmp_path / "notes").mkdir()
    assert [k for k, _ in mf.committed(tmp_path)] == [10, 4, 2]
    assert [k for k, _ in mf.round_dirs(tmp_path)] == [12, 10, 4, 2]


def test_prune_keeps_the_newest_committed_and_newer_uncommitted(tmp_path):
    for k in (1, 3, 5, 7):
        make_checkpoint(tmp_path, k)
    for k in (2, 6, 9):  # killed while writing: 2 and 6 are older than the newest committed
        make_checkpoint(tmp_path, k, commit=False)
    gone = mf.prune(tmp_path, keep=2)
    assert sorted(p.name for p in gone) == ["round-000001", "round-000002", "round-000003"] + [
        "round-000006"
    ]
    assert [k for k, _ in mf.round_dirs(tmp_path)] == [9, 7, 5]
    assert [k for k, _ in mf.committed(tmp_path)] == [7, 5]
    assert mf.prune(tmp_path, keep=2) == []
    assert [p.name for p in mf.prune(tmp_path, keep=1)] == ["round-000005"]


def test_prune_without_a_committed_checkpoint_deletes_nothing(tmp_path):
    make_checkpoint(tmp_path, 4, commit=False)
    assert mf.prune(tmp_path, keep=1) == []
    assert [k for k, _ in mf.round_dirs(tmp_path)] == [4]


def test_remove_stale_temporaries(tmp_path):
    kept = make_checkpoint(tmp_path, 2)
    (kept / "rank-00001.safetensors.tmp").write_bytes(b"half")
    (kept / "manifest.json.tmp").write_bytes(b"{")
    make_checkpoint(tmp_path, 3, commit=False)
    gone = mf.remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in gone) == [
        "manifest.json.tmp",
        "rank-00001.safetensors.tmp",
        "round-000003",
    ]
    assert sorted(p.name for p in kept.iterdir()) == ["manifest.json", "rank-00000.safetensors"]
    assert [k for k, _ in mf.round_dirs(tmp_path)] == [2]


def test_clear_removes_the_checkpoints_and_the_directory_only_when_empty(tmp_path):
    d = tmp_path / "r.h5.ckpt"
    make_checkpoint(d, 1)
    make_checkpoint(d, 2, commit=False)
    mf.clear(d)
    assert not d.exists()
    make_checkpoint(d, 1)
    (d / "mine.txt").write_text("not ours")
    mf.clear(d)
    assert sorted(p.name for p in d.iterdir()) == ["mine.txt"]
    mf.clear(tmp_path / "never-made")  # nothing to do


# ------------------------------------------------------------------ the resume checks


def tiny(*sets: str):
    return load_config(TINY, ["probes.enabled=false", *sets])


def test_config_difference_names_the_first_differing_key():
    a = tiny()
    assert mf.config_difference(a, tiny()) is None
    diff = mf.config_difference(a, tiny("train.lr=0.5", "seed=9"))
    assert diff == "seed = 3 in the checkpoint, 9 now"  # seed is declared before train
    assert mf.config_difference(a, tiny("train.lr=0.5")) == (
        "train.lr = 0.05 in the checkpoint, 0.5 now"
    )
    assert mf.config_difference(a, tiny('snake.ends="all"')) == (
        'snake.ends = "owner" in the checkpoint, "all" now'
    )
    assert mf.config_difference(a, tiny("data.sample_shape=[4, 4]")) == (
        "data.sample_shape = [16] in the checkpoint, [4, 4] now"
    )
    assert "comm.gpu_transfer" in (
        mf.config_difference(a, tiny('comm.gpu_transfer="staged"')) or ""
    )


def test_config_difference_ignores_what_a_resume_may_change():
    a = tiny()
    b = tiny(
        "debug.fail_rank=1",
        "debug.fail_round=2",
        'debug.fail_kind="exit"',
        "probes.enabled=true",
        "probes.interval_s=1.0",
        "torch_threads=4",
        "comm.deadline_s=17",
        "checkpoint.every=3",
        "checkpoint.keep=5",
        'checkpoint.dir="/elsewhere"',
    )
    assert a != b
    assert mf.config_difference(a, b) is None
    assert mf.config_difference(a, dataclasses.replace(b, seed=4)).startswith("seed = 3")


def manifest_for(cfg, world_size: int) -> dict:
    return {
        "format": mf.FORMAT,
        "rounds_done": 1,
        "world_size": world_size,
        "config_toml": to_toml(cfg),
        "files": [],
    }


def test_check_same_run(tmp_path):
    cfg = tiny()
    mf.check_same_run(manifest_for(cfg, 3), tmp_path, cfg, 3)
    mf.check_same_run(manifest_for(tiny("checkpoint.every=7"), 3), tmp_path, cfg, 3)
    with pytest.raises(ConfigError) as e:
        mf.check_same_run(manifest_for(cfg, 3), tmp_path, cfg, 4)
    assert str(e.value) == (
        f"the checkpoint {tmp_path} was taken on 3 ranks, this run has 4; resume on the same "
        "number of ranks, or run without --resume"
    )
    with pytest.raises(ConfigError, match=r"is of another run: train.rounds = 3 in the checkpoint"):
        mf.check_same_run(manifest_for(cfg, 3), tmp_path, tiny("train.rounds=5"), 3)
    bad = manifest_for(cfg, 3) | {"config_toml": "scheme = [1"}
    with pytest.raises(ConfigError, match="holds a config this version rejects"):
        mf.check_same_run(bad, tmp_path, cfg, 3)


def test_check_rank_file(tmp_path):
    folder = tmp_path / "round-000001"
    folder.mkdir()
    path = folder / mf.rank_file(1)
    nbytes, sha = tensorfile.write(path, {"x": np.arange(4)})
    m = {"files": [{"rank": 1, "name": path.name, "bytes": nbytes, "sha256": sha}]}
    assert mf.check_rank_file(m, folder, 1) is None
    assert (
        mf.check_rank_file(m, folder, 0) == f"{folder / 'manifest.json'} lists no file for rank 0"
    )
    m2 = {"files": [dict(m["files"][0], bytes=nbytes + 1)]}
    assert mf.check_rank_file(m2, folder, 1) == (
        f"{path} has {nbytes} bytes, the manifest says {nbytes + 1}"
    )
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0xFF  # same size, one bit pattern changed
    path.write_bytes(bytes(raw))
    assert mf.check_rank_file(m, folder, 1) == (
        f"{path}: SHA-256 differs from the manifest's (the file is damaged)"
    )
    path.unlink()
    assert mf.check_rank_file(m, folder, 1) == f"{path} is missing"


# ------------------------------------------------------------------ interrupted and resumed

ROUNDS = 4


def checkpointers(n, cfg, out, *, resume):
    """Every rank's ``Checkpointer`` as ``run.main`` makes it (``prepare_checkpoints``, with
    ``resume`` the collective search for a checkpoint every rank can use), ranks as threads
    agreeing over a world of their own (as ``run.main`` agrees outside the run's
    communicator); no SIGUSR1 handler."""

    def prepare(comm):
        def agree(code: int) -> list[int]:
            return [int(c) for c in comm.allgather_row(np.array([code]))[:, 0]]

        return prepare_checkpoints(cfg, out, n, comm.rank, agree, resume=resume)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("snake_mpi.checkpoint.install_stop_handler", lambda: None)
        return ThreadWorld(n).run(prepare, deadline_s=60)


def run_world(n, cfg, out, *, resume=False):
    """A run with ranks as threads, taking checkpoints in ``OUT.ckpt`` (``resume``: after the
    newest usable one there)."""
    points = checkpointers(n, cfg, out, resume=resume)
    ctxs = ThreadWorld(n).run(
        lambda comm: execute(cfg, comm, out, checkpoints=points[comm.rank]), deadline_s=60
    )
    return points, ctxs


def with_fault(cfg, rank: int, round_: int):
    """``cfg`` whose rank ``rank`` raises ``InjectedFault`` as round ``round_`` (0-based)
    starts."""
    return dataclasses.replace(
        cfg, debug=dataclasses.replace(cfg.debug, fail_rank=rank, fail_round=round_)
    )


SAME_ROUND_FIELDS = (
    "bytes_sent",
    "bytes_received",
    "messages_sent",
    "messages_received",
    "train_state_bytes",
    "trainable_params",
    "model_at_rest_bytes",
    "loss",
    "kd_loss",
    "turn_accuracy",
    "samples",
    "steps",
)
"""The figures of a round that do not depend on timing or on the host."""

SCHEMES = {
    # name: (ranks, sets, the ranks that took the next round's first hop in at the checkpoint)
    "p2p": (3, [], {0}),  # node 0 took in the wrap hop
    "p2p-own-full": (3, ['snake.keep="own"', 'snake.transfer="full"'], {0}),
    "cs-own": (3, ['snake.mode="cs"', 'snake.keep="own"'], set()),
    "fedavg": (3, ['scheme="fedavg"'], set()),
    "fedavg-sampled": (4, ['scheme="fedavg"', "fedavg.clients_per_round=1"], set()),
    "split": (3, ['scheme="split"'], {1}),  # client 1 took in the relay
    "splitfed": (3, ['scheme="splitfed"'], set()),
    "centralised": (1, ['scheme="centralised"'], set()),
}
"""Every scheme (a real SIGKILL under mpirun: tests/test_mpi_resume.py, for some)."""


@pytest.mark.parametrize("name", list(SCHEMES))
def test_an_interrupted_run_resumes_to_the_same_models_and_rounds(tmp_path, name):
    n, sets, carried_in = SCHEMES[name]
    whole_model = name not in ("split", "splitfed")  # no rank of theirs holds a whole model
    cfg = tiny(
        *sets,
        f"train.rounds={ROUNDS}",
        "checkpoint.every=1",
        "checkpoint.keep=2",
        f"eval.after_each_turn={str(whole_model).lower()}",
    )
    whole = tmp_path / "whole.h5"
    run_world(n, cfg, whole)
    assert not mf.checkpoint_dir(cfg, whole).exists()  # a completed run clears them

    out = tmp_path / "cut.h5"
    ckpt = mf.checkpoint_dir(cfg, out)
    with pytest.raises(RuntimeError):  # rank 0 fails as round 3 starts; the others see it
        run_world(n, with_fault(cfg, 0, 2), out)
    assert [k for k, _ in mf.committed(ckpt)] == [2, 1]  # checkpoint.keep = 2
    assert read_result(partial_path(out), allow_incomplete=True).n_rounds == 2

    points, _ = run_world(n, cfg, out, resume=True)
    assert all(p.resume is not None and p.first_round == 2 for p in points)
    carried = {k for k, p in enumerate(points) if p.resume is not None and p.resume.carried}
    assert carried == carried_in
    assert not ckpt.exists()
    a, b = read_result(whole), read_result(out)
    assert list(b.tables["ranks"]["model_sha256"]) == list(a.tables["ranks"]["model_sha256"])
    for field in SAME_ROUND_FIELDS:
        np.testing.assert_array_equal(a.rounds[field], b.rounds[field], err_msg=field)
    for field in ("round", "rank", "accuracy", "loss", "cum_bytes_sent", "class_accuracy"):
        np.testing.assert_array_equal(a.evaluation[field], b.evaluation[field], err_msg=field)
    assert np.isfinite(b.rounds["turn_accuracy"]).any() == whole_model
    for field in ("control_bytes_sent", "model_end_held_bytes", "data_samples"):
        ranks_a, ranks_b = a.tables["ranks"][field], b.tables["ranks"][field]
        np.testing.assert_array_equal(ranks_a, ranks_b, err_msg=field)
    for key in ("final_sync/bytes_sent", "final_sync/bytes_received"):
        if key in a.arrays:
            np.testing.assert_array_equal(a.arrays[key], b.arrays[key], err_msg=key)
    assert b.n_rounds == a.n_rounds == ROUNDS
    assert (a.rounds["checkpoint_bytes"][1:] > 0).all()
    assert (b.rounds["checkpoint_bytes"][1:] > 0).all()  # round 3's: from the manifest
    attempts = b.tables["attempts"]
    assert list(attempts["attempt"]) == [0, 1]
    assert list(attempts["start_round"]) == [0, 2] and list(attempts["end_round"]) == [2, ROUNDS]
    assert list(attempts["resumed_from_round"]) == [0, 2]


def cut_after_three_rounds(tmp_path, n: int = 3):
    """A run never interrupted (``whole``) and the same run failing as round 4 starts
    (``out``), checkpointed after rounds 1, 2 and 3: ``(cfg, whole, out, checkpoint dir)``."""
    cfg = tiny(f"train.rounds={ROUNDS}", "checkpoint.every=1", "checkpoint.keep=3")
    whole, out = tmp_path / "whole.h5", tmp_path / "cut.h5"
    run_world(n, cfg, whole)
    with pytest.raises(RuntimeError):
        run_world(n, with_fault(cfg, 0, 3), out)
    return cfg, whole, out, mf.checkpoint_dir(cfg, out)


def test_a_damaged_newest_checkpoint_is_skipped_for_the_one_before(tmp_path, capsys):
    n = 3
    cfg, whole, out, ckpt = cut_after_three_rounds(tmp_path, n)
    assert [k for k, _ in mf.committed(ckpt)] == [3, 2, 1]
    damaged = mf.round_dir(ckpt, 3) / mf.rank_file(2)
    raw = bytearray(damaged.read_bytes())
    raw[-3] ^= 0x01
    damaged.write_bytes(bytes(raw))
    capsys.readouterr()
    points, _ = run_world(n, cfg, out, resume=True)
    assert all(p.first_round == 2 for p in points)
    err = capsys.readouterr().err
    assert f"rank 2: checkpoint {mf.round_dir(ckpt, 3)} skipped: {damaged}: SHA-256" in err
    a, b = read_result(whole), read_result(out)
    assert list(b.tables["ranks"]["model_sha256"]) == list(a.tables["ranks"]["model_sha256"])
    np.testing.assert_array_equal(a.rounds["loss"], b.rounds["loss"])
    assert list(b.tables["attempts"]["start_round"]) == [0, 2]
    assert list(b.tables["attempts"]["end_round"]) == [3, ROUNDS]  # the .partial had 3 rounds


EDITS = {
    name: MALFORMED[name]
    for name in ("name-leaves-the-folder", "rounds-not-the-folder", "files-a-string",
                 "rank-not-an-integer")
}  # fmt: skip


@pytest.mark.parametrize("name", list(EDITS))
def test_a_newest_checkpoint_with_a_bad_manifest_is_skipped_and_removed(tmp_path, capsys, name):
    """The red team's manifests: a file name that leaves the folder (the check hashed it, the
    resume read the real rank file unverified), a round count that is not the folder's (the
    run resumed at round 3 with round 6's model), a malformed entry (a traceback). Each is
    skipped for the one before, removed, and the result equals an uninterrupted run's."""
    n = 3
    cfg, whole, out, ckpt = cut_after_three_rounds(tmp_path, n)
    newest = mf.round_dir(ckpt, 3)
    edit, message = EDITS[name]
    (newest / mf.MANIFEST).write_text(json.dumps(edit(mf.read_manifest(newest))))
    capsys.readouterr()
    points, _ = run_world(n, cfg, out, resume=True)
    assert all(p.first_round == 2 for p in points)
    captured = capsys.readouterr()
    assert f"checkpoint {newest} skipped: " in captured.err and message in captured.err
    assert "Traceback" not in captured.err + captured.out
    assert f"removed the unusable checkpoint {newest}" in captured.out
    a, b = read_result(whole), read_result(out)
    assert list(b.tables["ranks"]["model_sha256"]) == list(a.tables["ranks"]["model_sha256"])
    np.testing.assert_array_equal(a.rounds["loss"], b.rounds["loss"])
    assert list(b.tables["attempts"]["start_round"]) == [0, 2]


def test_a_measured_plan_is_kept_on_resume_not_measured_again(tmp_path):
    n = 3
    cfg = tiny(f"train.rounds={ROUNDS}", "checkpoint.every=2", 'snake.capability="measure"')
    out = tmp_path / "cut.h5"
    with pytest.raises(RuntimeError):
        run_world(n, with_fault(cfg, 0, 3), out)
    ((k, folder),) = mf.committed(mf.checkpoint_dir(cfg, out))
    assert k == 2
    saved = [tensorfile.read(folder / mf.rank_file(r))[0] for r in range(n)]
    for arrays in saved[1:]:  # every rank kept the same measurement
        for key in ("info.block_time_s", "info.block_time_spread", "info.capabilities"):
            np.testing.assert_array_equal(arrays[key], saved[0][key], err_msg=key)
    _, ctxs = run_world(n, cfg, out, resume=True)
    res = read_result(out)
    np.testing.assert_array_equal(
        res.arrays["assignment/block_time_s"], saved[0]["info.block_time_s"]
    )
    np.testing.assert_array_equal(
        res.arrays["assignment/capability"], saved[0]["info.capabilities"]
    )
    times = saved[0]["info.block_time_s"]
    mids = ctxs[0].model.middle_ids
    plan = plan_segments(
        ctxs[0].model,
        cfg.snake,
        n,
        costs=list(times[:, mids].mean(axis=0)),
        capabilities=list(saved[0]["info.capabilities"]),
    )
    assert all(c.report.plan == plan for c in ctxs)


def test_find_resume_refuses_a_checkpoint_of_another_run(tmp_path):
    cfg = tiny(f"train.rounds={ROUNDS}", "checkpoint.every=1")
    out = tmp_path / "cut.h5"
    ckpt = mf.checkpoint_dir(cfg, out)
    with pytest.raises(RuntimeError):
        run_world(3, with_fault(cfg, 0, 2), out)
    said: list[str] = []

    def find(cfg, n, agree, partial):
        return find_resume(ckpt, cfg, n, 0, agree, partial=partial, say=said.append)

    def same(n):
        return lambda code: [code] * n

    with pytest.raises(ConfigError, match="is of another run: train.lr"):
        find(tiny(f"train.rounds={ROUNDS}", "train.lr=0.1"), 3, same(3), partial_path(out))
    with pytest.raises(ConfigError, match="taken on 3 ranks, this run has 2"):
        find(cfg, 2, same(2), partial_path(out))
    with pytest.raises(ConfigError, match="must be on a file system every rank shares"):
        find(cfg, 3, lambda code: [code, 0, 2], partial_path(out))
    calls: list[int] = []

    def rank_2_refuses(code: int) -> list[int]:  # the counts agree; then rank 2 says "2"
        calls.append(code)
        return [code] * 3 if len(calls) == 1 else [code, 0, 2]

    with pytest.raises(ConfigError, match="another rank found the checkpoint is of another"):
        find(cfg, 3, rank_2_refuses, partial_path(out))
    assert calls == [2, 0]
    assert said == []
    # rank 0 without the .partial its rounds come from: no usable checkpoint
    assert find(cfg, 3, same(3), tmp_path / "gone.h5.partial") is None
    assert len(said) == 2 and all("is gone" in s for s in said)
    point = find(cfg, 3, same(3), partial_path(out))
    assert point is not None and point.rounds_done == 2 and point.rows.n_rounds == 2


# ------------------------------------------------------------------ the analytic byte count


def capture_every_checkpoint(tmp_path, n, *sets):
    """A run with a checkpoint after every round, none pruned nor cleared at the end."""
    cfg = tiny(*sets, f"train.rounds={ROUNDS}", "checkpoint.every=1", "checkpoint.keep=100")
    out = tmp_path / "r.h5"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(mf, "clear", lambda _directory: None)
        _, ctxs = run_world(n, cfg, out)
    found = sorted(mf.committed(mf.checkpoint_dir(cfg, out)))
    assert [k for k, _ in found] == list(range(1, ROUNDS))
    return cfg, ctxs, found


ANALYTIC = {
    "p2p-all": (3, []),
    "p2p-own": (3, ['snake.keep="own"']),
    "p2p-own-frozen": (4, ['snake.keep="own"', 'snake.ends="frozen"']),
    "p2p-all-ends-all-full": (3, ['snake.ends="all"', 'snake.transfer="full"']),
    "p2p-measured": (3, ['snake.capability="measure"']),
    "cs-all": (3, ['snake.mode="cs"']),
    "cs-own-frozen": (4, ['snake.mode="cs"', 'snake.keep="own"', 'snake.ends="frozen"']),
    "fedavg": (3, ['scheme="fedavg"']),
    "fedavg-sampled": (5, ['scheme="fedavg"', "fedavg.clients_per_round=1"]),
    "centralised": (1, ['scheme="centralised"']),
}


@pytest.mark.parametrize("name", list(ANALYTIC))
def test_checkpoint_files_hold_the_analytic_block_bytes_and_bounded_overhead(tmp_path, name):
    n, sets = ANALYTIC[name]
    cfg, ctxs, found = capture_every_checkpoint(tmp_path, n, *sets)
    model = ctxs[0].model
    sizes = [block_nbytes(model, b) for b in range(model.n_blocks)]
    tensors = [len(block_tensors(model, b)) for b in range(model.n_blocks)]
    schedule = None
    if cfg.scheme == "fedavg":
        seeds, _ = seeds_for(cfg.seed, n)
        schedule = sampled_clients(seeds["sampling"], n - 1, cfg.fedavg.clients_per_round, ROUNDS)
    for k, folder in found:
        held = analytic.checkpoint_blocks(
            model.n_blocks,
            k,
            scheme=cfg.scheme,
            world_size=n,
            plan=ctxs[0].report.plan,
            mode=cfg.snake.mode,
            keep=cfg.snake.keep,
            schedule=schedule,
        )
        expected = analytic.checkpoint_block_bytes(
            sizes,
            k,
            scheme=cfg.scheme,
            world_size=n,
            plan=ctxs[0].report.plan,
            mode=cfg.snake.mode,
            keep=cfg.snake.keep,
            schedule=schedule,
        )
        manifest = mf.read_manifest(folder)
        for rank in range(n):
            path = folder / mf.rank_file(rank)
            arrays, _, _ = tensorfile.read(path)
            stored = {int(a.split(".")[1]) for a in arrays if a.startswith("block.")}
            assert stored == held[rank], (k, rank)
            block_bytes = sum(a.nbytes for name, a in arrays.items() if name.startswith("block."))
            assert block_bytes == expected[rank], (k, rank)
            size = path.stat().st_size
            assert size == manifest["files"][rank]["bytes"]
            bound = analytic.checkpoint_overhead_max_bytes(
                int(expected[rank]),
                sum(tensors[b] for b in held[rank]),
                model.n_blocks,
                n,
                measured=cfg.snake.capability == "measure" and cfg.scheme == "snake",
            )
            overhead = size - block_bytes
            assert 0 <= overhead <= bound, (k, rank, overhead, bound)
            # tight: the bound exceeds what the file holds by its digit slack only
            assert bound - overhead < 1024 + 48 * sum(tensors[b] for b in held[rank])


def test_the_analytic_rule_by_hand():
    plan = [[0, 1], [2], [3, 4, 5]]  # 6 blocks, ends = "owner"
    everything = set(range(6))
    p2p = analytic.checkpoint_blocks(6, 1, scheme="snake", world_size=3, plan=plan)
    assert p2p == [everything, {0, 1, 2}, everything]  # node 0 took the wrap hop in
    assert (
        analytic.checkpoint_blocks(6, 2, scheme="snake", world_size=3, plan=plan)
        == [everything] * 3
    )
    own = analytic.checkpoint_blocks(6, 3, scheme="snake", world_size=3, plan=plan, keep="own")
    assert own == [everything, {2}, {3, 4, 5}]
    frozen = [[1], [2], [3, 4]]  # ends = "frozen": stem and head never trained, never written
    cs = analytic.checkpoint_blocks(6, 1, scheme="snake", world_size=4, plan=frozen, mode="cs")
    assert cs == [{1, 2, 3, 4}, {1}, {1, 2}, {1, 2, 3, 4}]
    fed = analytic.checkpoint_blocks(6, 2, scheme="fedavg", world_size=4, schedule=[[2], [3], [1]])
    assert fed == [everything, set(), everything, everything]
    assert analytic.checkpoint_block_bytes(
        [1, 2, 3, 4, 5, 6], 1, scheme="snake", world_size=3, plan=plan
    ).tolist() == [21, 6, 21]
    assert analytic.checkpoint_blocks(6, 1, scheme="centralised", world_size=1) == [everything]
    with pytest.raises(ValueError, match="world of 4"):
        analytic.checkpoint_blocks(6, 1, scheme="snake", world_size=4, plan=plan)
    with pytest.raises(ValueError, match="split"):
        analytic.checkpoint_blocks(6, 1, scheme="split", world_size=3)


def test_the_overhead_bound_counts_the_random_states_this_torch_and_numpy_write():
    import random

    assert torch.get_rng_state().numel() == 5056 and torch.Generator().get_state().numel() == 5056
    assert np.random.get_state()[1].nbytes == 624 * 4
    assert len(random.getstate()[1]) == 625
    assert analytic.CHECKPOINT_RNG_BYTES == 5056 * 2 + 624 * 4 + 625 * 8
    small = analytic.checkpoint_overhead_max_bytes(1000, 2, 3, 2)
    assert analytic.CHECKPOINT_RNG_BYTES < small < analytic.CHECKPOINT_RNG_BYTES + 1500
    more = analytic.checkpoint_overhead_max_bytes(1000, 3, 3, 2)
    assert 60 < more - small < 120  # one more tensor: one header entry
    measured = analytic.checkpoint_overhead_max_bytes(1000, 2, 3, 2, measured=True)
    assert measured - small >= 2 * 8 * 2 * 3
