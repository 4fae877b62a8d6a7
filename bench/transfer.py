"""Hop throughput of snake_mpi's comm layer against bare mpi4py, and the probes' overhead.

Run under MPI with 2 ranks (more ranks only add idle processes that compete for cores):

    mpirun -n 2 python bench/transfer.py [--max-mib 256] [--skip-probes]

Part 1, in the manner of the OSU micro-benchmarks: for each payload size from 64 KiB to
256 MiB, rank 0 sends ``reps`` messages to rank 1 after a warm-up and a barrier, rank 1 sends a
one-byte acknowledgement at the end, and rank 0's elapsed time gives the one-way throughput.
The same bytes go once as a bare ``Send``/``Recv`` into a preallocated buffer and once as
``Comm.send_blocks``/``recv_blocks`` (header + payload, deadline polling, byte accounting),
interleaved, best of ``trials``. Prints the ratio comm/bare (target >= 0.9 from 4 MiB up).

Part 2: the same Snake run (the demo's workload, 2 rounds) with the memory sampler on and off,
alternating, and prints the wall-time overhead of the probes (target <= 2 %). With
``--device cuda`` the runs train on the GPU and "on" includes the GPU probe (NVML samples,
torch peaks, the energy counter).

Part 3, with ``--device cuda`` only: the same payload sizes from GPU memory on rank 0 to GPU
memory on rank 1 over each transfer path (``staged``: device -> pinned host buffer -> MPI ->
pinned buffer -> device; ``direct``: device buffers to MPI, only where the library reports
CUDA support), against a bare mpi4py ``Send``/``Recv`` of the same bytes between host buffers.

    mpirun -n 2 python bench/transfer.py --device cuda --max-mib 256 --trials 3
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _gpu_before_mpi() -> None:
    """With ``--device cuda``, make the rank's GPU current before mpi4py initialises MPI (as
    ``snake-mpi run`` does), so that no CUDA context lands on another GPU."""
    if not any(a == "cuda" or a.endswith("=cuda") for a in sys.argv[1:]):
        return
    import torch

    from snake_mpi.device import local_rank_from_env

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        torch.cuda.set_device((local_rank_from_env()[0] or 0) % n)


_gpu_before_mpi()
from mpi4py import MPI  # noqa: E402 - after the device is chosen

from snake_mpi.transport.comm import Comm  # noqa: E402
from snake_mpi.transport.wire import KIND_MODEL, Transfer, TransferSpec  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _reps(nbytes: int) -> int:
    return max(4, min(1000, (1 << 30) // max(nbytes, 1)))


def bare_once(world: MPI.Comm, buf: np.ndarray, reps: int) -> float:
    """Seconds per message for a bare mpi4py Send/Recv of ``buf``."""
    ack = np.zeros(1, dtype=np.uint8)
    rank = world.Get_rank()
    world.Barrier()
    t0 = MPI.Wtime()
    for _ in range(reps):
        if rank == 0:
            world.Send([buf, MPI.BYTE], 1, 7)
        elif rank == 1:
            world.Recv([buf, MPI.BYTE], 0, 7)
    if rank == 1:
        world.Send([ack, MPI.BYTE], 0, 8)
    elif rank == 0:
        world.Recv([ack, MPI.BYTE], 1, 8)
    return (MPI.Wtime() - t0) / reps


def comm_once(comm: Comm, world: MPI.Comm, buf: np.ndarray, reps: int) -> float:
    """Seconds per message for the same bytes through ``Comm.send_blocks``/``recv_blocks``."""
    ack = np.zeros(1, dtype=np.uint8)
    ids = np.array([0], dtype=np.int64)
    sizes = np.array([buf.nbytes], dtype=np.int64)
    world.Barrier()
    t0 = MPI.Wtime()
    for i in range(reps):
        if comm.rank == 0:
            comm.send_blocks(1, Transfer(KIND_MODEL, i, 0, ids, ids, sizes, buf))
        elif comm.rank == 1:
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, i, 0, out=buf))
    if comm.rank == 1:
        world.Send([ack, MPI.BYTE], 0, 8)
    elif comm.rank == 0:
        world.Recv([ack, MPI.BYTE], 1, 8)
    return (MPI.Wtime() - t0) / reps


def token_once(comm: Comm, world: MPI.Comm, buf: np.ndarray, reps: int) -> float:
    """Seconds per hop when the payload goes back and forth (rank 0 -> 1 -> 0 ...), one
    transfer in flight at a time: Snake's peer-to-peer pattern on two nodes, and ring_bw's
    ``--mode token``."""
    ids = np.array([0], dtype=np.int64)
    sizes = np.array([buf.nbytes], dtype=np.int64)
    peer = 1 - comm.rank

    def send(i: int) -> None:
        comm.send_blocks(peer, Transfer(KIND_MODEL, i, comm.rank, ids, ids, sizes, buf))

    world.Barrier()
    t0 = MPI.Wtime()
    for i in range(reps):
        if comm.rank == 0:
            send(i)
            comm.recv_blocks(1, TransferSpec(KIND_MODEL, i, 1, out=buf))
        elif comm.rank == 1:
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, i, 0, out=buf))
            send(i)
    return (MPI.Wtime() - t0) / (2 * reps)


def path_once(comm: Comm, world: MPI.Comm, path: str, dev_buf, pinned, reps: int) -> float:
    """Seconds per message from rank 0's device buffer to rank 1's over ``path``: what
    ``payloads.HopBuffers`` does per hop (copy through the pinned buffer, or hand the device
    buffer to MPI after synchronising), timed to the data's arrival in device memory."""
    import torch

    ack = np.zeros(1, dtype=np.uint8)
    n = dev_buf.numel()
    ids = np.array([0], dtype=np.int64)
    sizes = np.array([n], dtype=np.int64)
    host = pinned.numpy() if pinned is not None else None
    world.Barrier()
    t0 = MPI.Wtime()
    for i in range(reps):
        if comm.rank == 0:
            if path == "staged":
                pinned.copy_(dev_buf)
                payload = host
            else:
                torch.cuda.current_stream().synchronize()
                payload = dev_buf
            comm.send_blocks(1, Transfer(KIND_MODEL, i, 0, ids, ids, sizes, payload))
        elif comm.rank == 1:
            into = host if path == "staged" else dev_buf
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, i, 0, alloc=lambda k, b=into: b[:k]))
            if path == "staged":
                dev_buf.copy_(pinned)
            torch.cuda.current_stream().synchronize()
    if comm.rank == 1:
        world.Send([ack, MPI.BYTE], 0, 8)
    elif comm.rank == 0:
        world.Recv([ack, MPI.BYTE], 1, 8)
    return (MPI.Wtime() - t0) / reps


def device_paths_table(max_mib: int, trials: int, csv_out: str | None) -> None:
    """Part 3: hop throughput of each transfer path from GPU memory vs bare host mpi4py."""
    import torch

    from snake_mpi.transport.comm import cuda_support

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    support, how = cuda_support()
    paths = ["staged"] + (["direct"] if support else [])
    comm = Comm.world(deadline_s=600)
    if rank == 0:
        print(f"# device paths, 2 ranks on {torch.cuda.get_device_name()}; CUDA-aware MPI: "
              f"{support} ({how}){'' if support else '; direct skipped'}")  # fmt: skip
        heads = "".join(f" {p + ' GB/s':>12} {p + '/bare':>12}" for p in paths)
        print(f"{'size':>10} {'reps':>5} {'bare GB/s':>10}{heads}")
    rows = []
    s = 64 << 10
    while s <= max_mib << 20:
        host_buf = np.ones(s, dtype=np.uint8)
        dev_buf = torch.ones(s, dtype=torch.uint8, device="cuda")
        pinned = torch.empty(s, dtype=torch.uint8, pin_memory=True)
        reps = max(4, _reps(s) // 4)
        bare_once(world, host_buf, 2)
        for p in paths:
            path_once(comm, world, p, dev_buf, pinned, 2)
        best = {"bare": [], **{p: [] for p in paths}}
        for _ in range(trials):
            best["bare"].append(bare_once(world, host_buf, reps))
            for p in paths:
                best[p].append(path_once(comm, world, p, dev_buf, pinned, reps))
        if rank == 0:
            gbps = {k: s / min(v) / 1e9 for k, v in best.items()}
            label = f"{s >> 20} MiB" if s >= 1 << 20 else f"{s >> 10} KiB"
            cells = "".join(f" {gbps[p]:>12.2f} {gbps[p] / gbps['bare']:>12.3f}" for p in paths)
            print(f"{label:>10} {reps:>5} {gbps['bare']:>10.2f}{cells}", flush=True)
            rows.append((s, gbps))
        del dev_buf, pinned
        s *= 4
    if csv_out and rank == 0:
        with open(csv_out, "w") as f:
            f.write("bytes,bare_GBps," + ",".join(f"{p}_GBps" for p in paths) + "\n")
            for nbytes, g in rows:
                f.write(f"{nbytes},{g['bare']:.4f}," + ",".join(f"{g[p]:.4f}" for p in paths))
                f.write("\n")


def read_ring(path: str | None) -> dict[int, float]:
    """ring_bw's CSV (``bytes,iterations,latency_us,bandwidth_MBps``) as bytes -> GB/s."""
    if not path:
        return {}
    out = {}
    for line in Path(path).read_text().splitlines():
        if line and line[0].isdigit():
            nbytes, _iters, _lat, mbps = line.split(",")
            out[int(nbytes)] = float(mbps) / 1e3
    return out


def transfer_table(max_mib: int, trials: int, ring_csv: str | None, csv_out: str | None) -> None:
    world = MPI.COMM_WORLD
    ring = read_ring(ring_csv)
    rows = []
    comm = Comm.world(deadline_s=600)
    sizes = []
    s = 64 << 10
    while s <= max_mib << 20:
        sizes.append(s)
        s *= 4
    if world.Get_rank() == 0:
        library = MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
        print(f"# hop throughput, 2 ranks, {library}")
        ring_head = f" {'token GB/s':>10} {'ring_bw GB/s':>12} {'token/ring':>10}" if ring else ""
        print(
            f"{'size':>10} {'reps':>5} {'bare GB/s':>10} {'comm GB/s':>10} {'ratio':>6}{ring_head}"
        )
    for nbytes in sizes:
        buf = np.ones(nbytes, dtype=np.uint8)
        reps = _reps(nbytes)
        bare_once(world, buf, 2)  # warm-up: connection set-up, page faults
        comm_once(comm, world, buf, 2)
        bare, mine, hops = [], [], []
        for _ in range(trials):
            bare.append(bare_once(world, buf, reps))
            mine.append(comm_once(comm, world, buf, reps))
            if ring:
                hops.append(token_once(comm, world, buf, max(2, reps // 2)))
        if world.Get_rank() == 0:
            b, c = nbytes / min(bare) / 1e9, nbytes / min(mine) / 1e9
            label = f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"
            flag = "" if nbytes < 4 << 20 or c / b >= 0.9 else "  < 0.9 target"
            r = ring.get(nbytes, float("nan"))
            t = nbytes / min(hops) / 1e9 if hops else float("nan")
            ring_cells = f" {t:>10.2f} {r:>12.2f} {t / r:>10.3f}" if ring else ""
            print(
                f"{label:>10} {reps:>5} {b:>10.2f} {c:>10.2f} {c / b:>6.3f}{ring_cells}{flag}",
                flush=True,
            )
            rows.append((nbytes, b, c, t, r))
    if csv_out and world.Get_rank() == 0:
        with open(csv_out, "w") as f:
            f.write("bytes,bare_GBps,comm_GBps,comm_token_GBps,ring_bw_GBps\n")
            for nbytes, b, c, t, r in rows:
                f.write(f"{nbytes},{b:.4f},{c:.4f},{t:.4f},{r:.4f}\n")


def probe_overhead(pairs: int, device: str = "cpu") -> None:
    """Wall time of the same Snake run with the sampler on and off (alternating, ``pairs`` each)."""
    from snake_mpi import run
    from snake_mpi.config import load_config
    from snake_mpi.transport.comm import cuda_support, local_rank_by_split

    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    tmp = Path(tempfile.mkdtemp(prefix="snake-bench-")) if rank == 0 else None
    tmp_name = world.bcast(str(tmp) if tmp else None, root=0)  # a path string, not weights
    times: dict[bool, list[float]] = {True: [], False: []}
    base = [  # the demo's workload, shortened: seconds per run, so the sampler has time to cost
        "train.rounds=2",
        "train.local_epochs=1",
        "torch_threads=1",
        "probes.interval_s=0.1",  # the default sampling period
        f'device="{device}"',
    ]
    for i in range(-1, pairs):  # i = -1: a warm-up pair (imports, page faults), not counted
        for enabled in (True, False) if i % 2 == 0 else (False, True):
            cfg = load_config(
                REPO / "bench" / "configs" / "demo.toml",
                [*base, f"probes.enabled={str(enabled).lower()}"],
            )
            out = Path(tmp_name) / f"probe-{enabled}-{i}.h5"
            world.Barrier()
            t0 = MPI.Wtime()
            placement = run.place_before_mpi(cfg) or run.place_after_mpi(cfg, local_rank_by_split())
            route = run.transfer_route(cfg, placement, cuda_support)
            with contextlib.redirect_stdout(io.StringIO()):  # the runs' own progress lines
                run.execute(cfg, Comm.world(deadline_s=600), out, placement=placement, route=route)
            world.Barrier()
            if i >= 0:
                times[enabled].append(MPI.Wtime() - t0)
    if rank == 0:
        on, off = np.median(times[True]), np.median(times[False])
        print(
            f"# probe overhead on {device}: {pairs} runs each, "
            f"sampler interval {cfg.probes.interval_s:g} s"
        )
        print(f"sampler on  {on:.3f} s (median; runs {', '.join(f'{t:.3f}' for t in times[True])})")
        print(
            f"sampler off {off:.3f} s (median; runs {', '.join(f'{t:.3f}' for t in times[False])})"
        )
        spread = 100 * (max(times[False]) - min(times[False])) / off
        print(f"overhead    {100 * (on - off) / off:+.2f} % (target <= 2 %)")
        print(f"noise       {spread:.2f} % (spread of the sampler-off runs, for scale)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-mib", type=int, default=256, help="largest payload in MiB")
    p.add_argument("--trials", type=int, default=5, help="interleaved trials per size (best taken)")
    p.add_argument("--probe-pairs", type=int, default=8, help="runs with the sampler on, and off")
    p.add_argument("--skip-probes", action="store_true")
    p.add_argument(
        "--ring-csv",
        help="ring_bw --mode token's CSV from the same job: adds the hop throughput with one "
        "transfer in flight, back and forth (token), ring_bw's, and their ratio",
    )
    p.add_argument("--csv", help="write the hop-throughput table as CSV here (for the report)")
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: also the transfer paths from GPU memory (part 3); probe runs on the GPU",
    )
    p.add_argument("--paths-csv", help="write part 3's table as CSV here")
    args = p.parse_args()
    if MPI.COMM_WORLD.Get_size() < 2:
        raise SystemExit("run under MPI with 2 ranks: mpirun -n 2 python bench/transfer.py")
    t0 = time.perf_counter()
    transfer_table(args.max_mib, args.trials, args.ring_csv, args.csv)
    if args.device == "cuda":
        device_paths_table(args.max_mib, args.trials, args.paths_csv)
    if not args.skip_probes:
        probe_overhead(args.probe_pairs, args.device)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"# done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
