"""bench/limit.py on small fixtures: ring_bw's CSVs and mpi4py's pingpong output parsed, the
best of them taken as the limit per size and the benchmark that set it named (no MPI)."""

from __future__ import annotations

import math

import pytest

from bench import limit as lim

KIB, MIB = 1 << 10, 1 << 20


def ring_csv(mode: str, rows: dict[int, float]) -> str:
    """ring_bw's output: a comment, the header, bytes,iterations,latency_us,bandwidth_MBps."""
    lines = [
        f"# ring_bw: 2 ranks, mode {mode}, Open MPI v5.0.11",
        "bytes,iterations,latency_us,bandwidth_MBps",
    ]
    lines += [f"{n},4,{n / mbps:.3f},{mbps:.1f}" for n, mbps in rows.items()]
    return "\n".join(lines) + "\n"


def pingpong_txt(rows: dict[int, float]) -> str:
    """``python -m mpi4py.bench pingpong``'s output (MB/s of one-way bytes, MB = 1e6)."""
    lines = [
        "# MPI PingPong Test",
        "# Size [B]  Bandwidth [MB/s] | Time Mean [s] \u00b1 StdDev [s]  Samples",
    ]
    for n, mbps in rows.items():
        lines.append(f"{n:10d}{mbps:18.2f} | {n / mbps / 1e6:.7e} \u00b1 1.0000e-06       10")
    return "\n".join(lines) + "\n"


@pytest.fixture
def out(tmp_path):
    """An OUT_DIR as hop_vs_ring.sh leaves it: 1 KiB (not a limit size) .. 256 MiB, pingpong
    from 64 KiB, with two pingpong runs appended (the best per size counts)."""
    token = {1 * KIB: 900.0, 64 * KIB: 6000.0, 256 * KIB: 12000.0, MIB: 12500.0}
    token |= {4 * MIB: 13000.0, 16 * MIB: 13500.0, 64 * MIB: 7000.0, 256 * MIB: 6500.0}
    sendrecv = {1 * KIB: 1200.0, 64 * KIB: 21000.0, 256 * KIB: 34000.0, MIB: 24000.0}
    sendrecv |= {4 * MIB: 11000.0, 16 * MIB: 12000.0, 64 * MIB: 6800.0, 256 * MIB: 6200.0}
    run1 = {64 * KIB: 13500.0, 256 * KIB: 24000.0, MIB: 30000.0, 2 * MIB: 20000.0}
    run1 |= {4 * MIB: 15000.0, 16 * MIB: 13000.0, 64 * MIB: 8200.0, 256 * MIB: 6400.0}
    run2 = {64 * KIB: 14000.0, 256 * KIB: 23000.0, MIB: 31000.0, 4 * MIB: 14000.0}
    run2 |= {16 * MIB: 13500.0, 64 * MIB: 8000.0, 256 * MIB: float("nan")}
    (tmp_path / "ring_bw.csv").write_text(ring_csv("token", token))
    (tmp_path / "ring_bw_sendrecv.csv").write_text(ring_csv("sendrecv", sendrecv))
    (tmp_path / "pingpong.txt").write_text(
        "--------\nsome launcher warning\n" + pingpong_txt(run1) + pingpong_txt(run2)
    )
    # -a none (written memory): shown, never the limit, even where it is the fastest
    written = {64 * KIB: 40000.0, MIB: 17000.0, 64 * MIB: 3900.0}
    (tmp_path / "pingpong_written.txt").write_text(pingpong_txt(written))
    # token without single copies (OMPI_MCA_smsc=^cma): a candidate, the best at 256 MiB
    pipelined = {64 * KIB: 5000.0, 4 * MIB: 12000.0, 64 * MIB: 8100.0, 256 * MIB: 8300.0}
    (tmp_path / "ring_bw_pipelined.csv").write_text(ring_csv("token", pipelined))
    return tmp_path


def test_parsers_read_one_way_gb_per_s(out):
    token = lim.read_ring(out / "ring_bw.csv")
    assert token[1 * KIB] == pytest.approx(0.9) and token[256 * MIB] == pytest.approx(6.5)
    pingpong = lim.read_pingpong(out / "pingpong.txt")
    # MB/s as printed / 1e3, no factor 2 (mpi4py already halves the round trip); best of runs
    assert pingpong[64 * KIB] == pytest.approx(14.0)
    assert pingpong[MIB] == pytest.approx(31.0)
    assert pingpong[4 * MIB] == pytest.approx(15.0)
    assert pingpong[256 * MIB] == pytest.approx(6.4)  # the NaN of the second run is ignored


def test_limit_is_the_best_candidate_and_names_its_benchmark(out, capsys):
    lim.main([str(out)])
    limit = lim.read_limit(out / "limit.csv")
    assert sorted(limit) == [64 * KIB << (2 * k) for k in range(7)]  # 1 KiB, 2 MiB left out
    expected = {
        64 * KIB: (21.0, "ring_sendrecv"),
        256 * KIB: (34.0, "ring_sendrecv"),
        MIB: (31.0, "pingpong"),
        4 * MIB: (15.0, "pingpong"),
        16 * MIB: (13.5, "ring_token"),  # a tie with the pingpong goes to ring_bw token
        64 * MIB: (8.2, "pingpong"),
        256 * MIB: (8.3, "ring_token_pipelined"),
    }
    for nbytes, (gbps, by) in expected.items():
        assert limit[nbytes][0] == pytest.approx(gbps) and limit[nbytes][1] == by, nbytes
    lines = (out / "limit.csv").read_text().splitlines()
    assert lines[0] == (
        "bytes,ring_token_GBps,ring_sendrecv_GBps,pingpong_GBps,limit_GBps,limit_set_by,"
        "pingpong_written_GBps,ring_token_pipelined_GBps"
    )
    assert lines[1] == "65536,6.0000,21.0000,14.0000,21.0000,ring_sendrecv,40.0000,5.0000"
    assert lines[2].endswith(",nan,nan")  # 256 KiB: neither written pingpong nor pipelined
    printed = capsys.readouterr().out
    assert "| 64 MiB | 7.00 | 6.80 | 8.20 | 8.20 | pingpong | 3.90 | 8.10 |" in printed


def test_a_missing_benchmark_leaves_the_others(tmp_path):
    (tmp_path / "ring_bw.csv").write_text(ring_csv("token", {MIB: 12000.0, 4 * MIB: 13000.0}))
    (tmp_path / "ring_bw_sendrecv.csv").write_text(ring_csv("sendrecv", {MIB: 11000.0}))
    (tmp_path / "pingpong.txt").write_text(pingpong_txt({4 * MIB: 14000.0}))
    lim.main([str(tmp_path), "--csv", str(tmp_path / "l.csv")])
    limit = lim.read_limit(tmp_path / "l.csv")
    assert limit == {MIB: (12.0, "ring_token"), 4 * MIB: (14.0, "pingpong")}
    row = (tmp_path / "l.csv").read_text().splitlines()[1].split(",")
    assert math.isnan(float(row[3]))  # no pingpong at 1 MiB
    assert math.isnan(float(row[7]))  # ring_bw_pipelined.csv not there: not run
    best, by = lim.choose({})
    assert math.isnan(best) and by == "none"


def test_read_limit_reads_a_file_from_before_the_written_memory_column(tmp_path):
    old = tmp_path / "limit.csv"
    old.write_text(
        "bytes,ring_token_GBps,ring_sendrecv_GBps,pingpong_GBps,limit_GBps,limit_set_by\n"
        "65536,6.1000,21.5000,14.1200,21.5000,ring_sendrecv\n"
    )
    assert lim.read_limit(old) == {64 * KIB: (21.5, "ring_sendrecv")}


def test_read_limit_rejects_another_csv(out):
    with pytest.raises(ValueError, match="not a limit.csv"):
        lim.read_limit(out / "ring_bw.csv")
    small = out / "small"  # only sizes below 64 KiB: nothing to take a limit from
    small.mkdir()
    (small / "ring_bw.csv").write_text(ring_csv("token", {1 * KIB: 900.0}))
    (small / "ring_bw_sendrecv.csv").write_text(ring_csv("sendrecv", {1 * KIB: 1200.0}))
    (small / "pingpong.txt").write_text(pingpong_txt({32 * KIB: 9000.0}))
    with pytest.raises(SystemExit, match="no benchmark measured"):
        lim.main([str(small)])
    assert not (small / "limit.csv").exists()
