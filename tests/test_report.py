"""snake-mpi report: a results directory becomes report.md and
report.html with the figures the issue names, the scaling table and the claims table."""

from __future__ import annotations

import re

import h5py
import numpy as np
import pytest

pytest.importorskip("matplotlib")

from conftest import REPO  # noqa: E402
from snake_mpi.analysis import claims, figures, report  # noqa: E402
from snake_mpi.analysis import runs as analysis_runs  # noqa: E402
from snake_mpi.config import load_config  # noqa: E402
from snake_mpi.run import execute  # noqa: E402
from snake_mpi.store import read_result  # noqa: E402
from snake_mpi.transport.localcomm import ThreadWorld  # noqa: E402

TINY = REPO / "tests" / "configs" / "tiny.toml"
RUNS = {  # file -> (ranks, overrides)
    "snake-n2": (2, ['scheme="snake"']),
    "snake-n3": (3, ['scheme="snake"']),
    "fedavg-n3": (3, ['scheme="fedavg"']),
}


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("runs")
    for name, (n, sets) in RUNS.items():
        cfg = load_config(TINY, ["probes.enabled=false", "train.rounds=2", *sets])
        ThreadWorld(n).run(lambda c, cfg=cfg, name=name: execute(cfg, c, d / f"{name}.h5"))
    (d / "broken.h5").write_bytes(b"not a result")
    (d / "ring_bw.csv").write_text(
        "# ring_bw: 2 ranks, mode token, test\nbytes,iterations,latency_us,bandwidth_MBps\n"
        "65536,100,10.0,6553.6\n262144,100,20.0,13107.2\n"
    )
    (d / "transfer.csv").write_text(
        "bytes,bare_GBps,comm_GBps,comm_token_GBps,ring_bw_GBps\n"
        "65536,5.0,2.0,1.5,6.5536\n262144,12.0,9.0,6.5536,13.1072\n"
    )
    head = (
        "blocks_per_hop,bytes,block_bytes,hops,limit_GBps,limit_set_by,bare_token_GBps,"
        "views_GBps,views_vs_limit,views_vs_bare,copy_GBps,copy_vs_limit,faults_per_hop_views,"
        "faults_per_hop_copy\n"
    )
    (d / "e2e.csv").write_text(
        head + "1,262144,262144,1000,33.96,ring_sendrecv,9.32,4.38,0.1291,0.4703,1.41,0.0414,0,0\n"
    )
    return d


def test_the_report_has_every_figure_table_and_claim(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert report.main([str(results_dir), "--out", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    assert "from 3 complete result file(s)" in md and "broken.h5" in md  # listed, left out
    for fig in ("bytes", "memory", "time", "acc", "scaling"):
        png = out / "figures" / f"w1_{fig}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", fig
        assert f"figures/w1_{fig}.png" in md and f"figures/w1_{fig}.png" in html
    assert (out / "figures" / "hops.png").exists()
    # the scaling table: snake at N = 2 and 3 with the analytic bytes beside the measured (tiny.toml
    # has ends = "owner", named by its tag)
    snake = "| snake-p2p+ends-owner"
    rows = [ln.split("|")[1:-1] for ln in md.splitlines() if ln.startswith(f"{snake} s")]
    assert [r[1].strip() for r in rows] == ["2", "3"]
    for r, name in zip(rows, ("snake-n2", "snake-n3"), strict=True):
        res = read_result(results_dir / f"{name}.h5")
        measured = res.rounds["bytes_sent"].sum(axis=1).mean() / 2**20
        assert r[2].strip() == r[3].strip() == f"{measured:.3f}"
    # the claims: Snake with 2 data holders against FedAvg with 2 clients (3 ranks), the same
    # table compare prints; Snake with 3 data holders has no partner
    runs = [read_result(results_dir / f"{name}.h5") for name in RUNS]
    table = claims.format_claims(claims.paper_claims(runs, analysis_runs.default_target(runs)))
    for line in table.splitlines()[2:]:
        assert line in md, line
    fed = read_result(results_dir / "fedavg-n3.h5").rounds["bytes_sent"].sum(axis=1).mean()
    sent = read_result(results_dir / "snake-n2.h5").rounds["bytes_sent"].sum(axis=1).mean()
    row = f"{snake} N=2 (2 data holders, 2 rounds) vs fedavg N=3 (2 data holders, 2 rounds)"
    row += " | bytes per round"
    assert f"{row} / FedAvg's | " in md and f"| {sent / fed:.3f} [1 seed] |" in md
    assert f"{snake} N=3 (3 data holders, 2 rounds) | against FedAvg |" in md
    assert "| 262,144 | 13.11 | 12.00 | 9.00 | 6.55 | 0.500 |" in md  # hop table: token/ring
    e2e = "| 1 | 262,144 | 33.96 (ring_sendrecv) | 9.32 | 4.38 | 0.129 | 0.470 | 1.41 | 0 / 0 |"
    assert e2e in md  # the end-to-end hop table, with the benchmark that set the limit
    assert "<table>" in html and "<img src='figures/w1_bytes.png'" in html


def test_no_results_is_exit_1(tmp_path, capsys):
    assert report.main([str(tmp_path), "--out", str(tmp_path / "r")]) == 1
    assert "no complete result files" in capsys.readouterr().err


def test_csv_reader_ignores_comments(tmp_path):
    p = tmp_path / "x.csv"
    p.write_text("# c\na,b\n1,2\n3,4\n")
    got = figures.read_csv(p)
    assert np.array_equal(got["a"], [1, 3]) and np.array_equal(got["b"], [2, 4])


def test_only_bad_files_is_exit_1_with_every_reason(results_dir, tmp_path, capsys):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "broken.h5").write_bytes(b"not a result")
    bad_toml = d / "bad-toml.h5"
    bad_toml.write_bytes((results_dir / "fedavg-n3.h5").read_bytes())
    with h5py.File(bad_toml, "a") as f:
        f.attrs["config_toml"] = "scheme = [unclosed"
    with h5py.File(d / "bare.h5", "w") as f:
        f.attrs.update(schema_version=1, status="complete", world_size=3)
    (d / "dead.h5.partial").write_bytes(b"")
    assert report.main([str(d), "--out", str(tmp_path / "r")]) == 1
    err = capsys.readouterr().err
    for name, reason in (
        ("bad-toml.h5", "config_toml attribute is not a valid run configuration"),
        ("bare.h5", "damaged result file: /rounds: missing"),
        ("broken.h5", "not an HDF5 file"),
        ("dead.h5.partial", "incomplete result"),
    ):
        assert f"snake-mpi report: skipped {d / name}: {reason}" in err, err
    assert "no complete result files found" in err and "4 file(s) skipped" in err
    assert "Traceback" not in err and not (tmp_path / "r" / "report.md").exists()
    good = d / "fedavg-n3.h5"
    good.write_bytes((results_dir / "fedavg-n3.h5").read_bytes())
    assert report.main([str(d), "--out", str(tmp_path / "r")]) == 0
    md = (tmp_path / "r" / "report.md").read_text()
    assert "from 1 complete result file(s)" in md and "| bad-toml.h5 | config_toml" in md


def test_the_page_shows_what_differs_where_it_ran_and_only_the_keys_that_apply(
    results_dir, tmp_path
):
    from snake_mpi.analysis.runs import COLUMNS

    out = tmp_path / "report"
    assert report.main([str(results_dir), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    # only the keys of an MLP on synthetic vectors: no language-model or image keys
    line = next(ln for ln in md.splitlines() if ln.startswith("Model: "))
    assert line.startswith('Model: family = "mlp"; width = 32; middle_blocks = 4. Data: ')
    for key in ("preset", "checkpoint", "dtype", "seq_len", "tokenizer", "augment", "alpha"):
        assert key not in line, line
    # provenance: what every run shares on one line, what differs in a table
    assert "Provenance (every run): " in md and "MPI: in-process (threads)" in md
    assert "git commit: " in md and "torch threads/rank: 1" in md
    assert "oversubscribed" in md  # on the line (all runs alike) or a column (they differ)
    # the comparison as three narrow tables that hold every column between them
    for what in ("bytes", "memory and time", "accuracy"):
        assert f"Comparison: {what}." in md
    heads = [ln for ln in md.splitlines() if ln.startswith("| run |")]
    for name, _ in COLUMNS:
        assert name in {"scheme", "N"} or any(f"| {name} |" in h for h in heads), name
    for table in re.findall(r"<table>(.*?)</table>", html, re.S):
        assert table.split("</tr>")[0].count("<th") <= 10
    # the memory figure's caption names the process baseline it leaves out
    assert "Not drawn: the process baseline, RSS before the model was built, " in md


def test_oversubscription_compares_threads_per_host_with_the_cpus_its_ranks_may_use():
    from types import SimpleNamespace

    def res(hosts, masks):
        return SimpleNamespace(tables={"ranks": {"host": hosts, "cpu_affinity": masks}})

    over = report.oversubscription
    # 4 unbound ranks on a 2-CPU host, 1 thread each: oversubscribed
    assert over(res(["vm"] * 4, ["0-1"] * 4), 1) == "yes (vm: 4 x 1 threads on 2 CPUs)"
    # 4 ranks bound to a core each on a 4-CPU host: not
    assert over(res(["n1"] * 4, ["0", "1", "2", "3"]), 1) == "no"
    # ... but 2 threads each are
    assert over(res(["n1"] * 4, ["0", "1", "2", "3"]), 2).startswith("yes (n1: 4 x 2")
    # two hosts, only one over
    got = over(res(["a", "a", "b"], ["0-3", "0-3", "0"]), 2)
    assert got == "yes (b: 1 x 2 threads on 1 CPUs)"
    assert over(SimpleNamespace(tables={"ranks": {"host": ["a"]}}), 1) == "not recorded"


def test_workload_keys_follow_the_model_family_and_the_data():
    lm = load_config(REPO / "bench" / "configs" / "llm" / "tiny-snake.toml")
    model, data = report.workload_keys(lm)
    assert model == ["family", "preset", "dtype"]
    assert "seq_len" in data and "n_classes" not in data and "noise" not in data
    cnn = load_config(TINY, ['data.partition="dirichlet"', "data.sample_shape=[3, 32, 32]"])
    model, data = report.workload_keys(cnn)
    assert model == ["family", "width", "middle_blocks"]
    assert {"alpha", "augment", "noise"} <= set(data) and "seq_len" not in data


def test_byte_units_show_small_states():
    assert figures.byte_unit(1688 * 2**10) == (2**20, "MiB")
    assert figures.byte_unit(500 * 2**10) == (2**10, "KiB")
    assert figures.byte_unit(3 * 2**30) == (2**30, "GiB")
