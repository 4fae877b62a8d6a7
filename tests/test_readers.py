"""Readers that must not crash or mislead: half-written and damaged result files, files locked
by a running job, directories given as a file, unreadable .npz files, text corpora with no
held-out files."""

from __future__ import annotations

import subprocess
import sys
import zlib

import h5py
import numpy as np
import pytest

from snake_mpi import cli
from snake_mpi.analysis.summary import format_summary
from snake_mpi.data.arrays import read_arrays
from snake_mpi.data.cifar10 import DataError
from snake_mpi.data.text import TEST_EVERY, Tokenizer, load_text
from snake_mpi.store import (
    IN_USE,
    ResultError,
    ResultFormatError,
    ResultInUseError,
    partial_path,
    read_result,
)
from test_store import ROUND_FIELDS, _round, _write, _writer


def _partial(tmp_path, name: str = "run.h5"):
    """A ``.partial`` file of a run that stopped after its last round (status "running")."""
    w, *_ = _write(tmp_path / name, complete=False)
    w.close_incomplete()
    return partial_path(tmp_path / name)


def _complete(tmp_path, name: str = "done.h5"):
    _write(tmp_path / name)
    return tmp_path / name


def _group_for_dataset(f: h5py.File) -> None:
    del f["rounds/loss"]
    f.create_group("rounds/loss")


def _dataset_for_group(f: h5py.File) -> None:
    del f["series/rank_0"]
    f["series/rank_0"] = np.arange(3)


def _rounds_as_dataset(f: h5py.File) -> None:
    del f["rounds"]
    f["rounds"] = np.zeros(3)


def _wrong_shape(f: h5py.File) -> None:
    del f["rounds/loss"]
    f["rounds/loss"] = np.arange(5.0)


def _wrong_dtype(f: h5py.File) -> None:
    del f["rounds/loss"]
    f.create_dataset(
        "rounds/loss", data=np.array([["a"] * 3] * 4, dtype=object), dtype=h5py.string_dtype()
    )


def _half_appended(f: h5py.File) -> None:  # the writer stopped inside append_round
    f["rounds/loss"].resize(f["rounds/loss"].shape[0] + 1, axis=0)


DAMAGE = {  # name -> (damage, the HDF5 path listed as unreadable, words of the reason)
    "group-for-dataset": (_group_for_dataset, "/rounds/loss", "a group where a dataset"),
    "dataset-for-group": (_dataset_for_group, "/series/rank_0", "a dataset where a group"),
    "rounds-is-a-dataset": (_rounds_as_dataset, "/rounds", "a dataset where a group"),
    "wrong-shape": (_wrong_shape, "/rounds/loss", "shape (5,), expected (n_rounds, 3)"),
    "wrong-dtype": (_wrong_dtype, "/rounds/loss", "expected a number"),
    "half-appended-row": (_half_appended, "/rounds", "differ in length (4 to 5 rows"),
}


@pytest.mark.parametrize("case", DAMAGE)
def test_a_half_written_partial_shows_what_is_readable_and_lists_the_rest(tmp_path, case):
    damage, where, words = DAMAGE[case]
    part = _partial(tmp_path)
    with h5py.File(part, "a") as f:
        damage(f)
    res = read_result(part, allow_incomplete=True)
    assert [w for w, _ in res.unreadable] == [where], res.unreadable
    assert words in res.unreadable[0][1]
    assert res.world_size == 3 and res.tables["blocks"]["params"].tolist() == [10, 20, 30]
    if where != "/rounds":
        assert res.n_rounds == 4 and set(res.rounds) >= set(ROUND_FIELDS) - {"loss"}
    text = format_summary(res)
    assert f"unreadable: {where}: " in text and "per rank" in text


@pytest.mark.parametrize("case", DAMAGE)
def test_the_same_damage_in_a_complete_file_is_a_format_error(tmp_path, case):
    damage, where, _ = DAMAGE[case]
    done = _complete(tmp_path)
    with h5py.File(done, "a") as f:
        damage(f)
    for allow in (False, True):
        with pytest.raises(ResultFormatError, match=f"done.h5: damaged result file: {where}: "):
            read_result(done, allow_incomplete=allow)


def _tree_signatures(data: bytes) -> list[int]:
    """Offsets of HDF5 B-tree nodes (group member indexes, chunk indexes)."""
    return [i for i in range(len(data)) if data.startswith(b"TREE", i)]


def test_a_partial_with_damaged_indexes_is_read_as_far_as_it_can_be(tmp_path):
    data = _partial(tmp_path).read_bytes()
    listed = set()
    for offset in _tree_signatures(data):
        bad = tmp_path / "bad.h5.partial"
        bad.write_bytes(data[:offset] + b"XXXX" + data[offset + 4 :])
        res = read_result(bad, allow_incomplete=True)  # never raises on a damaged index
        text = format_summary(res)
        listed |= {w for w, _ in res.unreadable}
        assert all(f"unreadable: {w}: " in text for w, _ in res.unreadable)
    assert {"/rounds/loss", "/rounds/bytes_sent", "/eval/accuracy", "/series/rank_1"} <= listed


def test_a_complete_file_with_a_damaged_index_is_a_format_error(tmp_path):
    data = _complete(tmp_path).read_bytes()
    refused = 0
    for offset in _tree_signatures(data):
        bad = tmp_path / "bad.h5"
        bad.write_bytes(data[:offset] + b"XXXX" + data[offset + 4 :])
        for allow in (False, True):
            try:
                res = read_result(bad, allow_incomplete=allow)
            except ResultFormatError as e:
                assert "bad.h5: damaged result file: /" in str(e)
                refused += 1
            else:
                assert res.unreadable == []  # an unused index: nothing lost
    assert refused >= 2 * (len(_tree_signatures(data)) - 2)


def test_a_truncated_partial_says_how_much_is_there(tmp_path):
    part = _partial(tmp_path)
    data = part.read_bytes()
    part.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFormatError, match=f"truncated HDF5 file: {len(data) // 2:,} of"):
        read_result(part, allow_incomplete=True)


WRITER = """
import sys
import numpy as np
from snake_mpi.store import ResultWriter
w = ResultWriter(sys.argv[1], world_size=2, round_fields={"bytes_sent": "int64"},
                 eval_fields={}, attrs={}, config_toml="")
w.append_round({"bytes_sent": np.array([1, 2])})
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.fixture
def running_job(tmp_path):
    """A process that holds ``live.h5.partial`` open for writing, as a running job does."""
    out = tmp_path / "live.h5"
    proc = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(out)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout.readline().strip() == "ready"
        yield partial_path(out)
    finally:
        proc.stdin.close()
        proc.wait(timeout=60)


def test_a_file_locked_by_its_running_job_says_so(running_job, capsys, monkeypatch):
    monkeypatch.delenv("HDF5_USE_FILE_LOCKING", raising=False)
    with h5py.File(running_job, "r", locking=False):
        pass  # the file is there and is HDF5; only the lock is in the way
    try:
        h5py.File(running_job, "r").close()
    except OSError:
        pass
    else:
        pytest.skip("this file system does not enforce HDF5 file locks")
    res = read_result(running_job, allow_incomplete=True)
    assert res.in_use and res.status == "running" and res.n_rounds == 1
    assert cli.main(["show", str(running_job)]) == 0
    out = capsys.readouterr().out
    assert "in use by a running job" in out and "HDF5 file lock held" in out
    assert "truncated" not in out
    final = running_job.with_name("live.h5")
    running_job.rename(final)  # a complete-looking name: a strict reader says why it stops
    with pytest.raises(ResultInUseError) as err:
        read_result(final)
    assert err.value.reason == IN_USE


def test_show_on_a_directory_says_it_is_one(tmp_path, capsys):
    assert cli.main(["show", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "is a directory" in err and "no such file" not in err
    _complete(tmp_path)
    assert cli.main(["show", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert f"e.g. {tmp_path / 'done.h5'}" in err and f"snake-mpi compare {tmp_path}" in err
    with pytest.raises(ResultError, match="no such file"):
        read_result(tmp_path / "missing.h5")


def test_show_lists_unreadable_objects_and_exits_0(tmp_path, capsys):
    part = _partial(tmp_path)
    with h5py.File(part, "a") as f:
        _group_for_dataset(f)
    assert cli.main(["show", str(part)]) == 0
    out = capsys.readouterr().out
    assert "unreadable: /rounds/loss: a group where a dataset is expected" in out


def test_a_writer_stopped_mid_round_leaves_a_readable_partial(tmp_path):
    w = _writer(tmp_path / "run.h5")
    w.append_round(_round(0))
    w._f["rounds/bytes_sent"].resize(2, axis=0)  # the next append stopped after one field
    w._f.flush()
    w.close_incomplete()
    res = read_result(partial_path(tmp_path / "run.h5"), allow_incomplete=True)
    assert res.n_rounds == 1 and all(len(v) == 1 for v in res.rounds.values())
    assert "rows after the first 1 of bytes_sent are left out" in res.unreadable[0][1]


def test_random_bytes_as_npz_are_not_a_zip_not_a_pickle(tmp_path):
    p = tmp_path / "data.npz"
    p.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(DataError) as err:
        read_arrays(p)
    msg = str(err.value)
    assert "not a readable .npz file: not a zip archive" in msg
    assert "pickle" not in msg


def test_an_npz_with_object_arrays_says_so(tmp_path):
    p = tmp_path / "data.npz"
    obj = np.array([{"a": 1}], dtype=object)
    np.savez(p, x_train=obj, y_train=np.arange(1), x_test=obj, y_test=np.arange(1))
    with pytest.raises(DataError, match="holds object arrays") as err:
        read_arrays(p)
    assert "allow_pickle" not in str(err.value)


def test_a_corpus_with_no_held_out_file_says_how_they_are_chosen(tmp_path):
    names = [f"part{i}.txt" for i in range(40)]
    train_only = [n for n in names if zlib.crc32(n.encode()) % TEST_EVERY][:3]
    for n in train_only:
        (tmp_path / n).write_text("some text to train on\n" * 200)
    with pytest.raises(DataError) as err:
        load_text(str(tmp_path), n_train=4, n_test=4, seq_len=16, tokenizer=Tokenizer())
    msg = str(err.value)
    assert "no held-out text" in msg and f"(CRC-32) to 0 mod {TEST_EVERY}" in msg
    assert "0 of its 3" in msg and "point data.path at one file" in msg
    train = load_text(str(tmp_path), n_train=4, n_test=0, seq_len=16, tokenizer=Tokenizer())
    assert train.x_train.shape == (4, 16)


def test_show_on_a_partial_whose_writer_is_gone_says_stopped(tmp_path, capsys, monkeypatch):
    """A ``.partial`` says "running" inside; ``show`` tells from ``OUT.lock`` (host, pid)
    whether its run is still there: stopped without a lock or with a dead holder, running with
    a live one, and "running or stopped" where the holder is on another host."""
    import dataclasses
    import json

    from snake_mpi.outlock import Holder, lock_path

    partial = _partial(tmp_path)

    def status() -> str:
        assert cli.main(["show", str(partial)]) == 0
        out = capsys.readouterr().out.splitlines()
        return next(line for line in out if line.startswith("status")).split(None, 1)[1]

    assert status() == (
        "stopped, incomplete (the run that wrote it ended before finishing: no run.h5.lock is "
        "held; the file still says 'running')"
    )
    me = Holder.me()
    lock = lock_path(tmp_path / "run.h5")
    lock.write_text(json.dumps(dataclasses.asdict(me)))
    assert status() == f"running (its run holds run.h5.lock: {me.describe()})"
    dead = dataclasses.replace(me, pid=2**22 + 12345)  # above Linux's pid_max: no such process
    lock.write_text(json.dumps(dataclasses.asdict(dead)))
    assert status().startswith(
        f"stopped, incomplete (the run that wrote it ended before finishing: run.h5.lock is "
        f"left over: its process {dead.pid} is gone;"
    )
    elsewhere = dataclasses.replace(me, host="another-host")
    lock.write_text(json.dumps(dataclasses.asdict(elsewhere)))
    assert status().startswith("incomplete: running or stopped (run.h5.lock names host another-")


def test_show_out_while_only_its_partial_exists_points_at_it(tmp_path, capsys):
    partial = _partial(tmp_path)
    out = tmp_path / "run.h5"
    assert cli.main(["show", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no such file" in err
    assert f"{partial} is there (a run still writing it, or one that stopped)" in err
    assert f"`snake-mpi show {partial}`" in err
