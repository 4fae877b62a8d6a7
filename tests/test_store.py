"""Result files: round trip, the .partial/status rule, clear errors for bad files, summary."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from snake_mpi.analysis.summary import format_summary
from snake_mpi.store import (
    SCHEMA_VERSION,
    IncompleteResultError,
    ResultError,
    ResultFormatError,
    ResultWriter,
    partial_path,
    read_result,
    scan_results,
)

WS = 3
ROUND_FIELDS = {
    "bytes_sent": "int64",
    "bytes_received": "int64",
    "compute_s": "float64",
    "send_s": "float64",
    "wait_s": "float64",
    "round_s": "float64",
    "peak_rss_bytes": "int64",
    "train_state_bytes": "int64",
    "model_at_rest_bytes": "int64",
    "loss": "float64",
}
EVAL_FIELDS = {"round": "int64", "rank": "int64", "accuracy": "float64", "loss": "float64"}
CONFIG = 'scheme = "snake"\n\n[train]\nrounds = 4\n'


def _round(r: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(r)
    row = {
        name: (rng.integers(0, 10**9, WS) if dt == "int64" else rng.random(WS))
        for name, dt in ROUND_FIELDS.items()
    }
    row["loss"][1] = np.nan
    return row


def _writer(path, **kw) -> ResultWriter:
    return ResultWriter(
        path,
        world_size=WS,
        round_fields=ROUND_FIELDS,
        eval_fields=EVAL_FIELDS,
        attrs={"scheme": "snake", "model": "cnn", "dataset": "synthetic", "lr": 0.1},
        config_toml=CONFIG,
        **kw,
    )


def _write(path, n_rounds: int = 4, *, complete: bool = True):
    w = _writer(path)
    w.write_provenance(
        {"hosts": "h1,h1,h2", "git_commit": "a" * 40, "mpi_library_version": "MPI X\nline 2\x00"}
    )
    rounds = [_round(r) for r in range(n_rounds)]
    evals = []
    for r, row in enumerate(rounds):
        ev = None
        if r != 1:  # round 1 not evaluated
            ev = {"round": r, "rank": r % WS, "accuracy": 0.5 + r / 10, "loss": 1.0 / (r + 1)}
            evals.append(ev)
        w.append_round(row, ev)
    blocks = {
        "name": np.array(["stem", "mid.0", "héad"], dtype=object),
        "role": np.array(["stem", "middle", "head"], dtype=object),
        "params": np.array([10, 20, 30], dtype=np.int64),
        "owner": np.array([-1, 1, -2], dtype=np.int64),
    }
    w.write_table("blocks", blocks)
    w.write_table("ranks", {"host": np.array(["h1", "h1", "h2"]), "x": np.arange(WS)})
    w.write_array("ranks/label_histogram", np.ones((WS, 4), dtype=np.int64))
    w.write_array("final_sync/bytes_sent", np.array([5, 6, 7]), attrs={"unit": "bytes"})
    series = {
        k: {"t_s": np.linspace(0, 1, 5 + k), "rss_bytes": np.arange(5 + k, dtype=np.int64)}
        for k in range(WS)
    }
    for k, s in series.items():
        w.write_series(k, s)
    if complete:
        assert w.complete() == path
    return w, rounds, evals, blocks, series


def test_round_trip(tmp_path):
    path = tmp_path / "run.h5"
    _, rounds, evals, blocks, series = _write(path)
    assert path.exists() and not partial_path(path).exists()
    res = read_result(path)
    assert res.status == "complete" and res.attrs["schema_version"] == SCHEMA_VERSION
    assert res.world_size == WS and res.n_rounds == 4 and res.scheme == "snake"
    assert res.attrs["model"] == "cnn" and res.attrs["lr"] == 0.1
    assert res.config_toml == CONFIG
    for name, dt in ROUND_FIELDS.items():
        got = res.rounds[name]
        assert got.shape == (4, WS) and got.dtype == np.dtype(dt)
        np.testing.assert_array_equal(got, np.stack([r[name] for r in rounds]))
    assert list(res.evaluation["round"]) == [0, 2, 3]
    np.testing.assert_array_equal(res.evaluation["accuracy"], [e["accuracy"] for e in evals])
    assert list(res.tables["blocks"]["name"]) == ["stem", "mid.0", "héad"]
    assert all(isinstance(s, str) for s in res.tables["blocks"]["role"])
    np.testing.assert_array_equal(res.tables["blocks"]["owner"], blocks["owner"])
    assert list(res.tables["ranks"]["host"]) == ["h1", "h1", "h2"]
    assert res.tables["ranks"]["label_histogram"].shape == (WS, 4)
    np.testing.assert_array_equal(res.arrays["final_sync/bytes_sent"], [5, 6, 7])
    assert set(res.series) == set(range(WS))
    for k in range(WS):
        for name, arr in series[k].items():
            np.testing.assert_array_equal(res.series[k][name], arr)
    assert res.provenance["git_commit"] == "a" * 40
    assert isinstance(res.provenance["hosts"], str)
    assert res.provenance["mpi_library_version"] == "MPI X\nline 2"  # NUL dropped


def test_partial_until_complete(tmp_path):
    path = tmp_path / "run.h5"
    w, *_ = _write(path, complete=False)
    part = partial_path(path)
    assert part.exists() and not path.exists()
    with pytest.raises(IncompleteResultError, match="run.h5.partial"):
        read_result(part)
    w.close_incomplete()
    w.close_incomplete()
    with pytest.raises(IncompleteResultError):
        read_result(part)
    res = read_result(part, allow_incomplete=True)
    assert res.status == "running" and res.n_rounds == 4
    ok = tmp_path / "ok.h5"
    _write(ok)
    results, skipped = scan_results([tmp_path])
    assert [r.path for r in results] == [ok]
    assert [p for p, _ in skipped] == [part]
    assert "incomplete" in skipped[0][1]


def test_status_running_without_partial_name_is_incomplete(tmp_path):
    path = tmp_path / "run.h5"
    w, *_ = _write(path, complete=False)
    w.close_incomplete()
    partial_path(path).rename(path)
    with pytest.raises(IncompleteResultError, match="status 'running'"):
        read_result(path)


def test_stale_partial_is_replaced_and_final_untouched(tmp_path):
    path = tmp_path / "run.h5"
    partial_path(path).write_bytes(b"junk from a dead run")
    path.write_bytes(b"old")
    w = _writer(path)
    assert path.read_bytes() == b"old"
    w.append_round(_round(0))
    w.complete()
    assert read_result(path).n_rounds == 1


def test_append_round_missing_field_names_it(tmp_path):
    w = _writer(tmp_path / "run.h5")
    row = _round(0)
    del row["wait_s"]
    with pytest.raises(KeyError, match="wait_s"):
        w.append_round(row)
    row = _round(0)
    with pytest.raises(KeyError, match="accuracy"):
        w.append_round(row, {"round": 0, "rank": 0, "loss": 1.0})
    row["bytes_sent"] = np.zeros(WS + 1)
    with pytest.raises(ValueError, match="bytes_sent"):
        w.append_round(row)
    w.close_incomplete()


def test_truncated_file_gives_format_error(tmp_path):
    good = tmp_path / "good.h5"
    _write(good)
    data = good.read_bytes()
    bad = tmp_path / "truncated.h5"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ResultFormatError, match="truncated.h5"):
        read_result(bad)


def test_foreign_hdf5_and_text_give_format_error(tmp_path):
    foreign = tmp_path / "foreign.h5"
    with h5py.File(foreign, "w") as f:
        f["x"] = np.arange(3)
    with pytest.raises(ResultFormatError, match="foreign.h5.*schema_version"):
        read_result(foreign)
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5\n")
    with pytest.raises(ResultFormatError, match="notes.h5"):
        read_result(text)
    newer = tmp_path / "newer.h5"
    with h5py.File(newer, "w") as f:
        f.attrs["schema_version"] = SCHEMA_VERSION + 1
        f.attrs["status"] = "complete"
    with pytest.raises(ResultFormatError, match="newer"):
        read_result(newer)
    with pytest.raises(ResultError, match="missing.h5"):
        read_result(tmp_path / "missing.h5")
    results, skipped = scan_results([foreign, text, newer])
    assert results == [] and [p for p, _ in skipped] == [foreign, text, newer]


def test_format_summary(tmp_path):
    path = tmp_path / "run.h5"
    _, rounds, *_ = _write(path)
    text = format_summary(read_result(path))
    assert "rounds" in text and " 4\n" in text.split("per round")[0]
    assert "snake" in text and "cnn" in text and "h1 x2, h2 x1" in text
    assert "MPI X" in text and "line 2" not in text and "a" * 12 in text
    rank_part = text.split("per rank")[1]
    for k in range(WS):
        assert any(line.split()[:1] == [str(k)] for line in rank_part.splitlines())
    sent = sum(int(r["bytes_sent"].sum()) for r in rounds)
    received = sum(int(r["bytes_received"].sum()) for r in rounds)
    assert f"{sent:,}" in text and f"{received:,}" in text
    total_line = next(line for line in rank_part.splitlines() if line.strip().startswith("total"))
    assert f"{sent:,}" in total_line
    assert "final sync: sent 18 bytes" in text


def test_format_summary_tolerates_missing_fields(tmp_path):
    path = tmp_path / "bare.h5"
    w = ResultWriter(
        path,
        world_size=2,
        round_fields={"bytes_sent": "int64"},
        eval_fields={},
        attrs={},
        config_toml="",
    )
    w.append_round({"bytes_sent": np.array([1, 2])})
    w.complete()
    text = format_summary(read_result(path))
    assert "sent bytes" in text and "accuracy" not in text
    w = _writer(tmp_path / "empty.h5")
    w.complete()
    assert "no rounds recorded" in format_summary(read_result(tmp_path / "empty.h5"))


def test_format_summary_shows_checkpoints_and_attempts(tmp_path):
    fields = {"round_s": "float64", "checkpoint_s": "float64", "checkpoint_bytes": "int64"}

    def write(name, nbytes, secs, attempts=None):
        w = ResultWriter(
            tmp_path / name,
            world_size=2,
            round_fields=fields,
            eval_fields={},
            attrs={"scheme": "snake"},
            config_toml="",
        )
        for k in range(len(nbytes)):
            row = {"round_s": np.ones(2), "checkpoint_s": np.array(secs[k])}
            w.append_round(row | {"checkpoint_bytes": np.array(nbytes[k])})
        if attempts is not None:
            w.write_table("attempts", attempts)
        w.complete()
        return format_summary(read_result(tmp_path / name))

    # checkpoints after rounds 2 and 4 (rows 2 and 4); the stop flag agreed every round
    nbytes = [[0, 0], [0, 0], [1000, 1200], [0, 0], [3000, 3100], [0, 0]]
    secs = [[0.0, 0.0], [0.01, 0.5], [0.25, 0.75], [0.01, 0.5], [0.125, 1.0], [0.01, 0.5]]
    attempts = {
        "attempt": np.array([0, 1]),
        "slurm_job_id": np.array(["77", "77"], dtype=object),
        "slurm_restart_count": np.array([0, 1]),
        "start_round": np.array([0, 4]),
        "end_round": np.array([5, 6]),
        "resumed_from_round": np.array([0, 4]),
        "started_unix_s": np.array([1.0, 2.0]),
    }
    text = write("ckpt.h5", nbytes, secs, attempts)
    part = text.split("checkpoints: ")[1]
    assert part.startswith("2 taken (after rounds 2, 4)")
    assert "checkpoint_s per rank: max 3.250 s (rank 1), rank 0 0.405 s" in part
    lines = part.split("attempts:")[0].splitlines()
    assert lines[2].split() == ["after", "round", "files", "min", "bytes/rank", "max"] + [
        "bytes/rank",
        "total",
        "bytes",
        "rank",
        "0",
        "s",
        "max",
        "s",
    ]
    assert lines[4].split() == ["2", "2/2", "1,000", "1,200", "2,200", "0.250", "0.750"]
    assert lines[5].split() == ["4", "2/2", "3,000", "3,100", "6,100", "0.125", "1.000"]
    rank_part = text.split("per rank")[1].split("checkpoints:")[0]
    assert "checkpoint_s" in rank_part.splitlines()[1]
    assert "attempts: 2 (resumed 1 time(s) from a checkpoint)" in text
    rows = text.split("attempts: 2")[1].splitlines()
    assert rows[3].split() == ["0", "77", "0", "1-5", "5", "-"]
    assert rows[4].split() == ["1", "77", "1", "5-6", "2", "after", "round", "4"]
    assert "memory series and whole-run memory figures are of the last attempt" in text

    # checkpoints off: no checkpoint figures; a run of one attempt says so in a line
    zeros = [[0, 0]] * 3
    one = {k: v[:1] for k, v in attempts.items()} | {"end_round": np.array([3])}
    text = write("off.h5", zeros, [[0.0, 0.0]] * 3, one)
    assert "checkpoint" not in text
    assert "attempts: 1 (never interrupted; rounds 1-3)" in text
