"""The machine's limit for weight hops: the best of ring_bw (both modes, and token mode
without single copies) and mpi4py's pingpong.

bench/hop_vs_ring.sh runs, in one job, ``build/ring_bw --mode token`` and ``--mode sendrecv``
(C) and ``python -m mpi4py.bench pingpong`` (mpi4py's own benchmark), then this script, which
takes for each payload size (64 KiB .. 256 MiB, powers of 4) the highest one-way throughput of
the three as the limit and names the benchmark that set it. One benchmark alone is no limit:
on the development machine the pingpong beat ring_bw's token mode by 20-25 % at 64-256 MiB and
2-3x at 64 KiB - 1 MiB, because it measures a different pattern: its send buffer is
``numpy.empty``, never written, so the copies read the kernel's zero page; and it sends the
same unchanged buffer again and again, so small messages come from cache. ring_bw's token mode
forwards the buffer it has just received, as a Snake node does. Taking the best of all three,
and saying which, keeps the limit an upper bound.

A fourth candidate, where measured: ring_bw's token mode with Open MPI's single-copy mechanism
off (``OMPI_MCA_smsc=^cma``: every message by the shared-memory transport's copy-in/copy-out
pipeline, sender and receiver copying at once). On the development machine it beat the
default (single-copy, CMA) token by 20-28 % from 64 MiB, and lost 10-15 % at 4-32 MiB: the
transfer snake_mpi's hops make from ``comm.pipelined_min_bytes`` (a non-contiguous message
takes that pipeline), so the limit must include it. hop_vs_ring.sh writes it to
``ring_bw_pipelined.csv``; ``limit.csv`` carries it as its last column.

For comparison only (never the limit), the same pingpong over written memory: ``-a none``
makes mpi4py allocate ``bytearray`` buffers, which are zero-filled when made, so their pages
are real. hop_vs_ring.sh writes it to ``pingpong_written.txt``; the table and ``limit.csv``
show it last. Its distance below the default pingpong is mostly the zero-page effect, measured
with mpi4py's own benchmark (partly 4 KiB pages too: ``bytearray``s come from ``malloc``
without huge pages).

    python -m bench.limit OUT_DIR   # reads OUT_DIR/ring_bw.csv (token), ring_bw_sendrecv.csv,
                                    # pingpong.txt [, pingpong_written.txt,
                                    # ring_bw_pipelined.csv]; writes OUT_DIR/limit.csv
                                    # and prints it

``read_limit(path)`` reads ``limit.csv`` back as bytes -> (limit GB/s, benchmark that set it).
GB = 1e9 bytes throughout.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

SIZES = [(64 << 10) << (2 * k) for k in range(7)]  # 64 KiB, 256 KiB, ..., 256 MiB
SOURCES = ("ring_token", "ring_sendrecv", "pingpong")  # the first columns of limit.csv
PIPELINED = "ring_token_pipelined"  # a candidate too, its column last (added later)
CANDIDATES = (*SOURCES, PIPELINED)  # also the order that breaks a tie
WRITTEN = "pingpong_written"  # shown, not a candidate for the limit
HEADER = (
    "bytes,ring_token_GBps,ring_sendrecv_GBps,pingpong_GBps,limit_GBps,limit_set_by,"
    "pingpong_written_GBps,ring_token_pipelined_GBps"
)


def read_ring(path: str | Path) -> dict[int, float]:
    """ring_bw's CSV (``bytes,iterations,latency_us,bandwidth_MBps``, MB = 1e6 bytes; the
    bandwidth is one way: bytes per hop in token mode, per Sendrecv per rank in sendrecv mode)
    as bytes -> GB/s. Comment and header lines are skipped."""
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        if line[:1].isdigit():
            nbytes, _iters, _latency_us, mbps = line.split(",")
            out[int(nbytes)] = float(mbps) / 1e3
    return out


def read_pingpong(path: str | Path) -> dict[int, float]:
    """The output of ``python -m mpi4py.bench pingpong`` as bytes -> GB/s, one way.

    Each data row is ``SIZE  BANDWIDTH [| T_MEAN ± T_STDEV SAMPLES]``. mpi4py times every
    iteration (rank 0: ``Send`` then ``Recv``, i.e. one round trip) separately and halves it,
    so ``T_MEAN`` is the mean one-way time and ``BANDWIDTH = SIZE / T_MEAN / 1e6`` is already
    one-way bytes per second in MB (1e6 bytes): GB/s = MB/s / 1e3, no factor 2 and no 2**20.
    Several runs may be concatenated in the file (hop_vs_ring.sh appends 5): the best is
    kept for each size, as ring_bw keeps its best trial.
    """
    out: dict[int, float] = {}
    for line in Path(path).read_text().splitlines():
        fields = line.split()
        if len(fields) < 2 or not fields[0].isdigit():
            continue  # "# MPI PingPong Test", the column header, launcher chatter
        try:
            gbps = float(fields[1]) / 1e3
        except ValueError:
            continue
        nbytes = int(fields[0])
        if not math.isnan(gbps) and gbps > out.get(nbytes, -1.0):
            out[nbytes] = gbps
    return out


def choose(values: dict[str, float]) -> tuple[float, str]:
    """The highest of ``values`` (benchmark -> GB/s; NaN = not measured) and its benchmark;
    a tie goes to the first in ``CANDIDATES`` order. ``(nan, "none")`` if nothing was measured."""
    best, by = math.nan, "none"
    for name in CANDIDATES:
        v = values.get(name, math.nan)
        if not math.isnan(v) and (math.isnan(best) or v > best):
            best, by = v, name
    return best, by


def limit_rows(
    token: dict[int, float],
    sendrecv: dict[int, float],
    pingpong: dict[int, float],
    written: dict[int, float] | None = None,
    pipelined: dict[int, float] | None = None,
) -> list[tuple[int, dict[str, float], float, str]]:
    """One row per size in ``SIZES`` that at least one benchmark measured:
    (bytes, benchmark -> GB/s, limit GB/s, benchmark that set it). ``written``: the pingpong
    over written memory, carried in the values for the table but never the limit;
    ``pipelined``: ring_bw token without single copies, a candidate (NaN where not run)."""
    rows = []
    for nbytes in SIZES:
        values = {
            "ring_token": token.get(nbytes, math.nan),
            "ring_sendrecv": sendrecv.get(nbytes, math.nan),
            "pingpong": pingpong.get(nbytes, math.nan),
            PIPELINED: (pipelined or {}).get(nbytes, math.nan),
        }
        best, by = choose(values)
        values[WRITTEN] = (written or {}).get(nbytes, math.nan)
        if by != "none":
            rows.append((nbytes, values, best, by))
    return rows


def write_limit(path: str | Path, rows: list[tuple[int, dict[str, float], float, str]]) -> None:
    lines = [HEADER]
    for nbytes, values, best, by in rows:
        cells = ",".join(f"{values[name]:.4f}" for name in SOURCES)
        lines.append(
            f"{nbytes},{cells},{best:.4f},{by},{values[WRITTEN]:.4f},{values[PIPELINED]:.4f}"
        )
    Path(path).write_text("\n".join(lines) + "\n")


def read_limit(path: str | Path) -> dict[int, tuple[float, str]]:
    """``limit.csv`` as bytes -> (limit GB/s, the benchmark that set it: ``ring_token``,
    ``ring_sendrecv``, ``pingpong`` or ``ring_token_pipelined``). Files written before the
    written-memory and pipelined columns read too."""
    out: dict[int, tuple[float, str]] = {}
    lines = Path(path).read_text().splitlines()
    if not lines or lines[0].strip().split(",")[:6] != HEADER.split(",")[:6]:
        raise ValueError(f"{path}: not a limit.csv (header {HEADER!r} expected)")
    for line in lines[1:]:
        if line.strip():
            cells = line.split(",")
            out[int(cells[0])] = (float(cells[4]), cells[5])
    return out


def _label(nbytes: int) -> str:
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def format_table(rows: list[tuple[int, dict[str, float], float, str]]) -> str:
    lines = [
        "| payload | ring_bw token GB/s | ring_bw sendrecv GB/s | pingpong GB/s | limit GB/s "
        "| set by | pingpong over written memory GB/s (not a candidate) "
        "| ring_bw token, no single copy GB/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for nbytes, values, best, by in rows:
        cells = " | ".join(f"{values[name]:.2f}" for name in SOURCES)
        lines.append(
            f"| {_label(nbytes)} | {cells} | {best:.2f} | {by} | {values[WRITTEN]:.2f} "
            f"| {values[PIPELINED]:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="hop_vs_ring.sh's OUT_DIR (inputs and output)")
    p.add_argument("--token", type=Path, help="ring_bw --mode token CSV [OUT/ring_bw.csv]")
    p.add_argument(
        "--sendrecv", type=Path, help="ring_bw --mode sendrecv CSV [OUT/ring_bw_sendrecv.csv]"
    )
    p.add_argument("--pingpong", type=Path, help="mpi4py.bench pingpong output [OUT/pingpong.txt]")
    p.add_argument(
        "--written",
        type=Path,
        help="the pingpong with -a none (written memory), shown only [OUT/pingpong_written.txt "
        "if it exists]",
    )
    p.add_argument(
        "--pipelined",
        type=Path,
        help="ring_bw --mode token with OMPI_MCA_smsc=^cma, a candidate "
        "[OUT/ring_bw_pipelined.csv if it exists]",
    )
    p.add_argument("--csv", type=Path, help="where to write the table [OUT/limit.csv]")
    args = p.parse_args(argv)
    written = args.written or args.out / "pingpong_written.txt"
    pipelined = args.pipelined or args.out / "ring_bw_pipelined.csv"
    rows = limit_rows(
        read_ring(args.token or args.out / "ring_bw.csv"),
        read_ring(args.sendrecv or args.out / "ring_bw_sendrecv.csv"),
        read_pingpong(args.pingpong or args.out / "pingpong.txt"),
        read_pingpong(written) if args.written or written.exists() else None,
        read_ring(pipelined) if args.pipelined or pipelined.exists() else None,
    )
    if not rows:
        raise SystemExit("limit.py: no benchmark measured any size from 64 KiB to 256 MiB")
    write_limit(args.csv or args.out / "limit.csv", rows)
    print(format_table(rows))


if __name__ == "__main__":
    main()
