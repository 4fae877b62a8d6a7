"""snake-mpi export / export.to_frame: the long table, checked against the
files it was made from and against docs/results-schema.md ("Long-format export")."""

from __future__ import annotations

import csv
import gzip
import math
import re
import shutil
import sys

import h5py
import pytest

from conftest import REPO
from snake_mpi import cli
from snake_mpi.analysis import export
from snake_mpi.config import load_config
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"
SCHEMA = REPO / "docs" / "results-schema.md"
RUNS = {  # file -> (ranks, overrides)
    "snake": (3, ['scheme="snake"']),
    "fedavg": (3, ['scheme="fedavg"', "fedavg.clients_per_round=1"]),
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for name, (n, sets) in RUNS.items():
        cfg = load_config(TINY, ["probes.enabled=false", "train.rounds=2", *sets])
        ThreadWorld(n).run(lambda c, cfg=cfg, name=name: execute(cfg, c, d / f"{name}.h5"))
    return d


def keyed(rows: list[tuple]) -> dict[tuple, tuple]:
    """(file, source, round, rank, metric) -> row; the key must be unique (pivotable)."""
    at = {c: export.COLUMNS.index(c) for c in ("file", "source", "round", "rank", "metric")}
    out = {}
    for row in rows:
        key = tuple(row[i] for i in at.values())
        assert key not in out, f"duplicate key {key}"
        out[key] = row
    return out


def col(row: tuple, name: str):
    return row[export.COLUMNS.index(name)]


def same(a, b) -> bool:
    """Equal, NaN equal to NaN, None to NaN (pandas' empty)."""
    if a is None or b is None:
        return (a is None or a != a) and (b is None or b != b)
    if isinstance(a, float) or isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or float(a) == float(b)
    return a == b


def test_every_figure_of_the_file_is_a_row_with_the_right_keys(results_dir):
    skipped = []
    rows = list(export.rows([results_dir], on_skip=lambda p, why: skipped.append((p, why))))
    assert not skipped
    by_key = keyed(rows)
    assert all(len(r) == len(export.COLUMNS) for r in rows)
    for name, (n, _) in RUNS.items():
        path = results_dir / f"{name}.h5"
        res = read_result(path)
        f = str(path)
        mine = [r for r in rows if col(r, "file") == f]
        run = {c: col(mine[0], c) for c in export.RUN_COLUMNS}
        n_run = len(export.RUN_COLUMNS)
        assert all(r[:n_run] == tuple(run.values()) for r in mine)
        assert run["scheme"] == name and run["ranks"] == n == res.world_size
        assert run["mode"] == ("p2p" if name == "snake" else "")
        assert run["data_holders"] == (n if name == "snake" else n - 1)
        assert run["seed"] == 3 and run["model_family"] == "mlp" and run["train_rounds"] == 2
        assert run["fedavg_clients_per_round"] == (1 if name == "fedavg" else None)
        assert run["split_cut"] is None and run["data_alpha"] is None
        # /rounds: every value of every field, round and rank
        sent = res.rounds["bytes_sent"]
        assert sent.shape == (2, n) and sent.sum() > 0
        for field, arr in res.rounds.items():
            for r in range(res.n_rounds):
                for k in range(n):
                    row = by_key[(f, "rounds", r, k, field)]
                    assert same(col(row, "value"), arr[r, k].item()), (field, r, k)
        n_round_rows = sum(col(r, "source") == "rounds" for r in mine)
        assert n_round_rows == res.n_rounds * n * len(res.rounds)
        # /eval: by its round and the rank that evaluated
        ev = res.evaluation
        assert len(ev["accuracy"]) == 2
        for i in range(len(ev["accuracy"])):
            key = (f, "eval", int(ev["round"][i]), int(ev["rank"][i]))
            assert col(by_key[(*key, "accuracy")], "value") == ev["accuracy"][i].item()
            assert col(by_key[(*key, "cum_bytes_sent")], "value") == ev["cum_bytes_sent"][i]
            assert (*key, "round") not in by_key and (*key, "rank") not in by_key
        # /ranks: whole-run figures at round -1; label_histogram one metric per class
        ranks = res.tables["ranks"]
        for k in range(n):
            row = by_key[(f, "ranks", -1, k, "peak_rss_bytes")]
            assert col(row, "value") == ranks["peak_rss_bytes"][k] > 0
            for c in range(ranks["label_histogram"].shape[1]):
                row = by_key[(f, "ranks", -1, k, f"label_histogram_{c}")]
                assert col(row, "value") == ranks["label_histogram"][k, c]
            assert (f, "ranks", -1, k, "host") not in by_key  # text is left out
        sync = {r for r in mine if col(r, "source") == "final_sync"}
        if name == "snake":
            for k in range(n):
                row = by_key[(f, "final_sync", -1, k, "bytes_sent")]
                assert col(row, "value") == res.arrays["final_sync/bytes_sent"][k]
        else:
            assert not sync


def documented_columns() -> list[str]:
    text = SCHEMA.read_text().split("## Long-format export", 1)[1].split("\n## ", 1)[0]
    names = []
    for line in text.splitlines():
        if line.startswith("| `"):
            names += re.findall(r"`([^`]+)`", line.split("|")[1])
    return names


def test_the_columns_are_documented_in_order():
    assert documented_columns() == list(export.COLUMNS)
    assert set(export.COLUMN_KINDS) == set(export.COLUMNS)


def test_the_cli_writes_a_csv_with_the_documented_header(results_dir, tmp_path, capsys):
    out = tmp_path / "sub" / "table.csv"
    assert cli.main(["export", str(results_dir), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    expected = list(export.rows([results_dir]))
    assert f"wrote {len(expected)} rows from 2 result file(s) to {out}" in captured.out
    with out.open(newline="") as fh:
        reader = csv.DictReader(fh)
        got = list(reader)
    assert reader.fieldnames == documented_columns()
    assert len(got) == len(expected)
    for line, row in zip(got, expected):
        for name, value in zip(export.COLUMNS, row):
            cell = line[name]
            if value is None:
                assert cell == "", name
            elif export.COLUMN_KINDS[name] == "str":
                assert cell == value, name
            else:
                assert same(float(cell), value), (name, cell, value)
                if isinstance(value, int):
                    assert cell == str(value)  # integers stay integers in CSV
    gz = tmp_path / "table.csv.gz"
    assert cli.main(["export", str(results_dir / "snake.h5"), "--out", str(gz)]) == 0
    with gzip.open(gz, "rt", newline="") as fh:
        gz_rows = list(csv.DictReader(fh))
    assert gz_rows == [r for r in got if r["file"] == str(results_dir / "snake.h5")]
    assert not list(tmp_path.glob(".tmp*")) and not list(out.parent.glob(".tmp*"))


def test_to_frame_has_the_same_rows(results_dir):
    pd = pytest.importorskip("pandas", reason="pandas (the analysis extra) is not installed")
    res = read_result(results_dir / "snake.h5")
    frame = export.to_frame([res])
    assert isinstance(frame, pd.DataFrame)
    assert list(frame.columns) == list(export.COLUMNS)
    assert str(frame["value"].dtype) == "float64" and str(frame["round"].dtype) == "int64"
    assert str(frame["split_cut"].dtype) == "Int64"
    expected = list(export.result_rows(res))
    assert len(frame) == len(expected)
    for got, row in zip(frame.itertuples(index=False), expected):
        for name, a, b in zip(export.COLUMNS, got, row):
            assert same(None if a is pd.NA else a, b), (name, a, b)
    table = frame[frame.source == "rounds"].pivot_table(
        index=["round", "rank"], columns="metric", values="value"
    )
    assert table["bytes_sent"].tolist() == res.rounds["bytes_sent"].ravel().tolist()


def test_to_frame_without_pandas_names_the_extra(results_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # import pandas raises ImportError
    with pytest.raises(ImportError, match=r"snake-mpi\[analysis\]"):
        export.to_frame([read_result(results_dir / "fedavg.h5")])


def test_incomplete_and_unreadable_files_are_skipped_and_named(results_dir, tmp_path, capsys):
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copy(results_dir / "fedavg.h5", d / "fedavg.h5")
    (d / "dead.h5.partial").write_bytes((results_dir / "fedavg.h5").read_bytes()[:4096])
    (d / "broken.h5").write_bytes(b"not a result")
    shutil.copy(results_dir / "snake.h5", d / "badcfg.h5")
    with h5py.File(d / "badcfg.h5", "r+") as f:
        f.attrs["config_toml"] = "scheme = 'snake'\nnot_a_key = 1\n"
    out = tmp_path / "t.csv"
    assert cli.main(["export", str(d), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    for name, reason in (
        ("badcfg.h5", "config_toml attribute is not a valid run configuration"),
        ("broken.h5", ""),
        ("dead.h5.partial", "incomplete result"),
    ):
        assert f"snake-mpi export: skipped {d / name}: {reason}" in err, err
    with out.open(newline="") as fh:
        assert {r["file"] for r in csv.DictReader(fh)} == {str(d / "fedavg.h5")}
    # nothing exportable: exit 1, the reason, and no table written
    out2 = tmp_path / "none.csv"
    argv = ["export", str(d / "dead.h5.partial"), str(d / "missing.h5"), "--out", str(out2)]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert f"skipped {d / 'dead.h5.partial'}: incomplete result" in err
    assert f"skipped {d / 'missing.h5'}: no such file" in err
    assert "no complete result files to export" in err
    assert not out2.exists() and not list(tmp_path.glob(".tmp*"))


def test_usage_errors_exit_2(results_dir, tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(results_dir)])  # --out is required
    assert e.value.code == 2
    with pytest.raises(SystemExit) as e:
        cli.main(["export", str(results_dir), "--out", str(tmp_path / "t.xlsx")])
    assert e.value.code == 2
    assert "unknown suffix" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        cli.main(["--help"])
    assert e.value.code == 0 and "export" in capsys.readouterr().out


def test_parquet_needs_pyarrow_and_says_so(results_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    out = tmp_path / "t.parquet"
    assert cli.main(["export", str(results_dir), "--out", str(out)]) == 1
    assert "needs the package pyarrow" in capsys.readouterr().err
    assert not out.exists()


def test_parquet_has_the_same_rows(results_dir, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet", reason="pyarrow is not installed")
    out = tmp_path / "t.parquet"
    assert cli.main(["export", str(results_dir), "--out", str(out)]) == 0
    table = pq.read_table(out)
    assert table.column_names == list(export.COLUMNS)
    expected = list(export.rows([results_dir]))
    got = table.to_pylist()
    assert len(got) == len(expected)
    for line, row in zip(got, expected):
        for name, value in zip(export.COLUMNS, row):
            assert same(line[name], value), (name, line[name], value)
