"""snake-mpi compare: the side-by-side table, its figures checked against the files."""

from __future__ import annotations

import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest

from conftest import REPO
from snake_mpi.analysis import claims, compare, runs
from snake_mpi.config import load_config
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

SMALL = REPO / "tests" / "configs" / "small.toml"
RUNS = {  # label -> (ranks, overrides)
    "snake-p2p": (4, ['scheme="snake"']),
    "snake-cs": (4, ['scheme="snake"', 'snake.mode="cs"']),
    "fedavg": (4, ['scheme="fedavg"']),
    "split": (4, ['scheme="split"']),
    "splitfed": (4, ['scheme="splitfed"']),
    "centralised": (1, ['scheme="centralised"']),
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for name, (n, sets) in RUNS.items():
        cfg = load_config(SMALL, ["probes.enabled=false", "train.rounds=3", *sets])
        ThreadWorld(n).run(lambda c, cfg=cfg, name=name: execute(cfg, c, d / f"{name}.h5"))
    return d


def markdown_rows(text: str) -> dict[str, dict[str, str]]:
    lines = []
    for line in text.splitlines():  # the first table only (the claims table follows)
        if line.startswith("| "):
            lines.append(line)
        elif lines and not line.startswith("|"):
            break
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        values = [c.strip() for c in line.strip("|").split("|")]
        rows[values[0]] = dict(zip(head, values, strict=True))
    return rows


def test_the_table_has_every_scheme_and_its_figures_match_the_files(results_dir, capsys):
    assert compare.main([str(results_dir), "--markdown", "--target", "0.7"]) == 0
    out = capsys.readouterr().out
    assert "target accuracy 0.7000" in out
    rows = markdown_rows(out)
    assert set(rows) == set(RUNS)
    for name in RUNS:
        res = read_result(results_dir / f"{name}.h5")
        row = rows[name]
        sent = res.rounds["bytes_sent"]
        assert row["MiB/round"] == f"{sent.sum(axis=1).mean() / 2**20:.3f}"
        assert row["= analytic"] == "exact"
        peak = res.tables["ranks"]["peak_rss_bytes"]
        assert row["peak RSS MiB max"] == f"{peak.max() / 2**20:.1f}"
        assert row["train state KiB max"] == f"{res.rounds['train_state_bytes'].max() / 1024:.1f}"
        acc = res.evaluation["accuracy"]
        assert row["final acc"] == f"{acc[-1]:.4f}" and row["best acc"] == f"{acc.max():.4f}"
        hit = np.flatnonzero(acc >= 0.7)
        if hit.size:
            assert row["rounds to target"] == str(res.evaluation["round"][hit[0]] + 1)
            cum = res.evaluation["cum_bytes_sent"][hit[0]]
            assert row["MiB to target"] == f"{cum / 2**20:.3f}"
            assert cum == sent[: hit[0] + 1].sum()
        else:
            assert row["rounds to target"] == "—"
    assert float(rows["centralised"]["MiB/round"]) == 0.0
    # the paper's comparison: Snake moves fewer bytes per round than FedAvg on this workload
    assert float(rows["snake-p2p"]["MiB/round"]) < float(rows["fedavg"]["MiB/round"])


def test_different_workloads_are_refused_unless_asked(results_dir, tmp_path, capsys):
    cfg = load_config(SMALL, ["probes.enabled=false", "train.rounds=2", "model.width=32"])
    other = tmp_path / "narrow.h5"
    ThreadWorld(3).run(lambda c: execute(cfg, c, other))
    runs = [str(results_dir / "fedavg.h5"), str(other)]
    assert compare.main(runs) == 2
    err = capsys.readouterr().err
    assert "different workload" in err and "width = 32" in err and "--allow-mixed" in err
    assert compare.main([*runs, "--allow-mixed"]) == 0


def test_incomplete_files_are_listed_not_read(results_dir, tmp_path, capsys):
    partial = tmp_path / "dead.h5.partial"
    partial.write_bytes((results_dir / "fedavg.h5").read_bytes()[:4096])  # a truncated file
    assert compare.main([str(results_dir / "fedavg.h5"), str(partial)]) == 0
    captured = capsys.readouterr()
    assert f"skipped {partial}" in captured.err
    assert compare.main([str(partial)]) == 1


def test_the_command_and_the_cli_function_print_the_same_table(results_dir):
    script = subprocess.run(
        [sys.executable, "-m", "snake_mpi.cli", "compare", str(results_dir), "--markdown"],
        capture_output=True,
        text=True,
        check=True,
    )
    from snake_mpi.cli import main as cli_main

    assert cli_main(["compare", str(results_dir), "--markdown"]) == 0
    assert "| snake-p2p |" in script.stdout


def test_the_scheme_configs_share_the_demo_workload():
    configs = sorted((REPO / "bench" / "configs" / "schemes").glob("*.toml"))
    assert {c.stem for c in configs} == set(RUNS)
    demo = load_config(REPO / "bench" / "configs" / "demo.toml")
    for path in configs:
        cfg = load_config(path)
        assert (cfg.model, cfg.data, cfg.train) == (demo.model, demo.data, demo.train), path
        assert path.stem.startswith(cfg.scheme)


def test_the_paper_claims_table_divides_snake_by_fedavg_with_as_many_data_holders(
    results_dir, capsys, tmp_path
):
    out_md = tmp_path / "table.md"
    assert compare.main([str(results_dir), "--out", str(out_md)]) == 0
    text = capsys.readouterr().out
    assert compare.CLAIMS_HEADING in text and compare.CLAIMS_HEADING in out_md.read_text()
    fed = read_result(results_dir / "fedavg.h5")
    cs = read_result(results_dir / "snake-cs.h5")  # rank 0 is the controller: 3 data holders
    ratio = cs.rounds["bytes_sent"].sum(1).mean() / fed.rounds["bytes_sent"].sum(1).mean()
    verdict = "holds" if ratio <= claims.BYTES_TOLERANCE else "does not hold"
    pair = "snake-cs N=4 (3 data holders, 3 rounds) vs fedavg N=4 (3 data holders, 3 rounds)"
    line = f"| {pair} | bytes per round / FedAvg's | "
    row = next(ln for ln in text.splitlines() if ln.startswith(line))
    assert f"| {ratio:.3f} [1 seed] | about 0.5 (≤ 0.6) | {verdict} (indicative: 1 seed" in row
    assert row.endswith("| snake-cs.h5, fedavg.h5 |")
    acc = next(ln for ln in text.splitlines() if ln.startswith(f"| {pair} | final accuracy"))
    assert "not judged: runs too short: snake-cs.h5: accuracy 3 evaluation(s)" in acc
    # Snake P2P has 4 data holders, this FedAvg 3 clients: no pair, and the table says so
    assert (
        "| snake-p2p N=4 (4 data holders, 3 rounds) | against FedAvg | — | — | — | — | not "
        "judged: no fedavg run with 4 data holders and a seed in common (there are: fedavg N=4 "
        "(3 data holders, 3 rounds) seeds 5) | snake-p2p.h5 |"
    ) in text


def test_accuracy_plots_are_written_as_png(results_dir, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="the analysis extra (matplotlib) is not installed")
    plots = tmp_path / "plots"
    assert compare.main([str(results_dir), "--plots", str(plots)]) == 0
    for name in ("rounds", "bytes", "time"):
        png = plots / f"accuracy_vs_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def hand_made(good, d):
    """Files with the schema's attributes and status "complete" but groups, columns or a
    readable config missing: name -> the reason compare gives."""

    def copy(name, edit):
        p = d / name
        shutil.copy(good, p)
        with h5py.File(p, "a") as f:
            edit(f)

    with h5py.File(d / "bare.h5", "w") as f:
        f.attrs.update(schema_version=1, status="complete", world_size=4, config_toml="")
    copy("no-ranks.h5", lambda f: f.__delitem__("ranks"))
    copy("no-eval-round.h5", lambda f: f.__delitem__("eval/round"))
    copy("bad-toml.h5", lambda f: f.attrs.__setitem__("config_toml", "scheme = [unclosed"))
    copy("bad-config.h5", lambda f: f.attrs.__setitem__("config_toml", "colour = 1\n"))
    copy("no-config.h5", lambda f: f.attrs.__delitem__("config_toml"))

    def short_column(f):
        del f["ranks/peak_rss_bytes"]
        f["ranks/peak_rss_bytes"] = [1, 2]

    copy("short-column.h5", short_column)
    return {
        "bare.h5": "damaged result file: /rounds: missing",
        "no-ranks.h5": "lacks /ranks/peak_rss_bytes, /ranks/data_samples",
        "no-eval-round.h5": "lacks /eval/round",
        "bad-toml.h5": "config_toml attribute is not a valid run configuration: Invalid value",
        "bad-config.h5": "config_toml attribute is not a valid run configuration: ",
        "no-config.h5": "no config_toml attribute",
        "short-column.h5": "/ranks/peak_rss_bytes is int64 of shape (2,), expected 4 numbers",
    }


def test_hand_made_files_with_parts_missing_are_skipped_with_the_reason(
    results_dir, tmp_path, capsys
):
    why = hand_made(results_dir / "fedavg.h5", tmp_path)
    (tmp_path / "fedavg.h5").write_bytes((results_dir / "fedavg.h5").read_bytes())
    assert compare.main([str(tmp_path), "--markdown", "--allow-mixed"]) == 0
    captured = capsys.readouterr()
    assert set(markdown_rows(captured.out)) == {"fedavg"}
    skipped = [ln for ln in captured.err.splitlines() if ln.startswith("compare: skipped")]
    assert [ln.split()[2].rstrip(":") for ln in skipped] == [str(tmp_path / n) for n in sorted(why)]
    for name, reason in why.items():
        assert f"compare: skipped {tmp_path / name}: {reason}" in captured.err
    results, left_out = runs.scan([tmp_path])
    assert [r.path.name for r in results] == ["fedavg.h5"] and len(left_out) == len(why)
    assert compare.main([str(tmp_path / n) for n in why]) == 1
    assert "no complete result files" in capsys.readouterr().err
