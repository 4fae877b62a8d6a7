"""Hop throughput of the comm layer and of model hops against bare mpi4py and the limit.

Also the probes' overhead, and with ``--device cuda`` the GPU transfer paths.

Run under MPI with 2 ranks (more ranks only add idle processes that compete for cores):

    mpirun -n 2 python -m bench.transfer [--max-mib 256] [--trials 5] [--skip-probes]
        [--limit-csv OUT/limit.csv] [--csv transfer.csv] [--skip-e2e] [--e2e-blocks 4]
        [--e2e-csv e2e.csv]

or all of it with the limit, in one job: ``bench/hop_vs_ring.sh OUT`` (ring_bw, mpi4py's
pingpong, bench/limit.py, then this script with ``--limit-csv OUT/limit.csv``). GB = 1e9 bytes.

Part 1, the comm layer, in the manner of the OSU micro-benchmarks: for each payload size from
64 KiB to 256 MiB (powers of 4, up to ``--max-mib``), rank 0 sends ``reps`` messages to rank 1
after a warm-up and a barrier, rank 1 sends a one-byte acknowledgement at the end, and rank 0's
elapsed time gives the one-way throughput. The same bytes go once as a bare ``Send``/``Recv``
into a preallocated buffer and once as ``Comm.send_blocks``/``recv_blocks`` (header + payload,
deadline polling, byte accounting), interleaved, best of ``trials``: the ratio comm/bare
(target >= 0.9 from 4 MiB up). Then the same buffer back and forth through the comm layer
(token: rank 0 -> 1 -> 0 ..., one transfer in flight, as ring_bw --mode token passes it), and
with ``--limit-csv`` (bench/limit.py's limit.csv) its share of the machine's limit and the
benchmark that set the limit. ``--csv``: bytes, bare, comm, token, ring_bw's token-mode GB/s
(from limit.csv) and the limit; which benchmark set it is a comment line (the report reads
every other cell as a number).

Part 2, end to end (``--skip-e2e`` skips it): model -> model hops through the schemes' own
``schemes.common.send_blocks``/``receive_blocks``. For each size S both ranks build a
``BlockModel`` of a tiny stem, one middle ``nn.Linear`` (fp32, no bias) of exactly S bytes,
and a tiny head, and the middle block goes back and forth (token, one transfer in flight):

- ``views``: the model flat (``blocks.flat_storage``); the block buffers go to MPI as they are
  and each rank posts its next receive right after its own send (``common.post_blocks``,
  as Snake does), landing in the model's block buffers; both by the rank's hop plan
  (``Hops``: header and persistent requests made once), as Snake hops go;
- ``general``: the same, with hop plans off (``Hops.plans = False``): every hop through
  ``Comm.send_blocks``/``post``/``recv_blocks``;
- ``pipelined``: views by hop plans on a communicator with ``comm.pipelined_min_bytes`` set
  (``--pipelined-min-bytes``, 64 MiB): blocks of that size and more go as swapped halves,
  which Open MPI's shared memory moves by its two-core copy pipeline instead of its single
  copy (CMA). ``views``, ``general`` and ``copy`` use the default (0: every block one plain
  message);
- ``copy``: the model not flat, as hops worked before flat storage (``comm.hop_buffers =
  "copy"``): packed into a new array per send (``flatten``), received into a new array and
  copied back (``unflatten``), no receive posted ahead;
- ``bare``: a bare mpi4py ``Send``/``Recv`` of a preallocated S-byte buffer (allocated as a
  block buffer is: 2 MiB-aligned huge pages from 4 MiB), each rank forwarding the buffer it has
  just received (ring_bw --mode token), for reference.

The modes are interleaved per trial, best of ``trials``; a hop's GB/s is S / seconds per hop.
Before timing, one round trip per mode checks the bytes (rank 0's pattern arrives in rank 1's
model, rank 1's in rank 0's) and the byte counts (``comm.stats``: exactly one header and S
bytes per hop). The minor page faults per hop of the timed loops are reported per mode (a hop
that allocates and fills fresh pages costs one per 4 KiB even where RSS falls back after it),
and after the timed trials one more loop per mode, not timed, samples the resident set size
after every hop (as ``psutil.Process().memory_info().rss`` reads it): its growth (max - first,
worst rank) per mode in MiB. (Sampled inside the timed loops, as before 2026-12-03, the reads
slowed the hops they sat between: views 10.0 against 10.6 GB/s at 4 MiB.) Targets:
views >= 0.9 of the limit from 4 MiB up, >= 0.5 below (flagged; without a limit, against the
bare token). A second row set carries ``--e2e-blocks`` K middle blocks of S/K bytes each per
hop (a segment of several decoder layers, as an OPT segment travels). ``--e2e-csv``: every
column, with each copy hop's pack + unpack time.

Part 3, with ``--device cuda`` only: the same payload sizes from GPU memory on rank 0 to GPU
memory on rank 1 over each transfer path (``staged``: device -> pinned host buffer -> MPI ->
pinned buffer -> device; ``direct``: device buffers to MPI, only where the library reports
CUDA support), against a bare mpi4py ``Send``/``Recv`` of the same bytes between host buffers.

    mpirun -n 2 python -m bench.transfer --device cuda --max-mib 256 --trials 3

Part 4 (``--skip-probes`` skips it): the same Snake run (the demo's workload, 2 rounds) with
the memory sampler on and off, alternating, and the wall-time overhead of the probes (target
<= 2 %). With ``--device cuda`` the runs train on the GPU and "on" includes the GPU probe (NVML
samples, torch peaks, the energy counter).
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

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
import torch  # noqa: E402
from mpi4py import MPI  # noqa: E402 - after the device is chosen
from torch import nn  # noqa: E402
from torch.nn.utils import skip_init  # noqa: E402

from bench import limit  # noqa: E402
from snake_mpi.blocks import (  # noqa: E402
    BlockModel,
    block_empty,
    block_nbytes,
    flat_storage,
    flatten,
    unflatten,
)
from snake_mpi.device import PATH_HOST  # noqa: E402
from snake_mpi.schemes.common import post_blocks, receive_blocks, send_blocks  # noqa: E402
from snake_mpi.transport.hops import Hops  # noqa: E402
from snake_mpi.transport.mpi.comm import Comm  # noqa: E402
from snake_mpi.transport.payloads import HopBuffers  # noqa: E402
from snake_mpi.transport.wire import (  # noqa: E402
    KIND_MODEL,
    Transfer,
    TransferSpec,
    header_nbytes,
)

REPO = Path(__file__).resolve().parents[1]


def host_buffer(nbytes: int) -> np.ndarray:
    """The bare transfers' buffer: allocated as a block buffer is (``blocks.block_empty``: 2 MiB
    aligned with huge pages from 4 MiB, as ring_bw's buffers are) and written once, so the
    bare reference moves the same kind of memory as the model hops and as ring_bw."""
    buf = block_empty(nbytes, torch.device("cpu")).numpy()
    buf[:] = 1
    return buf


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
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, i, 0, alloc=lambda k, b=buf: b[:k]))
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
            comm.recv_blocks(1, TransferSpec(KIND_MODEL, i, 1, alloc=lambda k, b=buf: b[:k]))
        elif comm.rank == 1:
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, i, 0, alloc=lambda k, b=buf: b[:k]))
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

    from snake_mpi.transport.mpi.world import cuda_support

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
        host_buf = host_buffer(s)
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


def _label(nbytes: int) -> str:
    if nbytes >= 1 << 30:
        return f"{nbytes >> 30} GiB"
    return f"{nbytes >> 20} MiB" if nbytes >= 1 << 20 else f"{nbytes >> 10} KiB"


def _sizes(max_mib: int) -> list[int]:
    """64 KiB, 256 KiB, 1 MiB, ... up to ``max_mib`` MiB (powers of 4)."""
    out, s = [], 64 << 10
    while s <= max_mib << 20:
        out.append(s)
        s *= 4
    return out


def read_limits(path: str | None) -> tuple[dict[int, tuple[float, str]], dict[int, float]]:
    """bench/limit.py's ``limit.csv`` (written by bench/hop_vs_ring.sh): bytes -> (limit GB/s,
    the benchmark that set it), and bytes -> ring_bw's token-mode GB/s (the ``ring_bw_GBps``
    column of ``--csv``, which the report divides by). Empty without a path."""
    if not path:
        return {}, {}
    limits = limit.read_limit(path)
    col = limit.HEADER.split(",").index("ring_token_GBps")
    ring = {}
    for line in Path(path).read_text().splitlines()[1:]:
        if line.strip():
            cells = line.split(",")
            ring[int(cells[0])] = float(cells[col])
    return limits, ring


def transfer_table(max_mib: int, trials: int, limit_csv: str | None, csv_out: str | None) -> None:
    """Part 1: one way (bare mpi4py and comm) and back and forth (comm, token) per size; the
    token throughput against the machine's limit where ``limit_csv`` gives it."""
    world = MPI.COMM_WORLD
    limits, ring = read_limits(limit_csv)
    rows = []
    comm = Comm.world(deadline_s=600)
    if world.Get_rank() == 0:
        library = MPI.Get_library_version().replace("\x00", "").splitlines()[0].strip()
        print(f"# hop throughput, 2 ranks, {library}")
        print(f"# limit: {limit_csv or '- (no --limit-csv)'}")
        print(
            f"{'size':>10} {'reps':>5} {'bare GB/s':>10} {'comm GB/s':>10} {'ratio':>6} "
            f"{'token GB/s':>10} {'limit GB/s':>10} {'set by':>13} {'token/limit':>11}"
        )
    for nbytes in _sizes(max_mib):
        buf = host_buffer(nbytes)
        reps = _reps(nbytes)
        bare_once(world, buf, 2)  # warm-up: connection set-up, page faults
        comm_once(comm, world, buf, 2)
        token_once(comm, world, buf, 2)
        bare, mine, hops = [], [], []
        for _ in range(trials):
            bare.append(bare_once(world, buf, reps))
            mine.append(comm_once(comm, world, buf, reps))
            hops.append(token_once(comm, world, buf, max(2, reps // 2)))
        if world.Get_rank() == 0:
            b, c = nbytes / min(bare) / 1e9, nbytes / min(mine) / 1e9
            t = nbytes / min(hops) / 1e9
            lim, by = limits.get(nbytes, (float("nan"), "-"))
            flag = "" if nbytes < 4 << 20 or c / b >= 0.9 else "  < 0.9 target (comm/bare)"
            vs = f"{t / lim:>11.3f}" if by != "-" else f"{'-':>11}"
            print(
                f"{_label(nbytes):>10} {reps:>5} {b:>10.2f} {c:>10.2f} {c / b:>6.3f} "
                f"{t:>10.2f} {lim:>10.2f} {by:>13} {vs}{flag}",
                flush=True,
            )
            rows.append((nbytes, b, c, t, ring.get(nbytes, float("nan")), lim, by))
    if csv_out and world.Get_rank() == 0:
        # the columns snake_mpi.analysis.report reads (bytes .. ring_bw_GBps, ring_bw's token
        # mode, from limit.csv) stay as they were; limit_GBps is new. Every cell is a number
        # (the report parses them all as floats): which benchmark set the limit is a comment.
        set_by = " ".join(f"{r[0]}:{r[6]}" for r in rows)
        with open(csv_out, "w") as f:
            f.write(f"# limit from {limit_csv or '-'}; set by (bytes:benchmark) {set_by}\n")
            f.write("bytes,bare_GBps,comm_GBps,comm_token_GBps,ring_bw_GBps,limit_GBps\n")
            for nbytes, b, c, t, r, lim, _by in rows:
                f.write(f"{nbytes},{b:.4f},{c:.4f},{t:.4f},{r:.4f},{lim:.4f}\n")


# ---------------------------------------------------------------- part 2: end to end


def e2e_target(nbytes: int) -> float:
    """The issue's target for views / limit: 0.9 from 4 MiB up, 0.5 below (it names 64 KiB;
    256 KiB and 1 MiB are held to the same floor)."""
    return 0.9 if nbytes >= 4 << 20 else 0.5


class _Record:
    """What the hop functions use of a run's ``Record``: ``add(key, seconds)``, summed here."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = {}

    def add(self, key: str, value: float) -> None:
        self.sums[key] = self.sums.get(key, 0.0) + value


class RssTrace:
    """This process's resident set size after each hop of a timed loop, in bytes: the number
    ``psutil.Process().memory_info().rss`` gives (on Linux both read ``/proc/self/statm``),
    read with one ``pread`` of a file kept open, under 1 us a sample (psutil takes about 6 us,
    which a 64 KiB hop of 10-20 us would feel). psutil where there is no /proc."""

    _fd: int | None = None

    def __init__(self, n: int) -> None:
        self.values = np.zeros(n, dtype=np.int64)
        self.n = 0
        if RssTrace._fd is None:
            try:
                RssTrace._fd = os.open("/proc/self/statm", os.O_RDONLY)
            except OSError:
                RssTrace._fd = -1
        self._page = os.sysconf("SC_PAGE_SIZE")

    def __call__(self) -> None:
        fd = RssTrace._fd
        if fd is not None and fd >= 0:
            rss = int(os.pread(fd, 64, 0).split()[1]) * self._page
        else:  # pragma: no cover - not Linux
            import psutil

            rss = psutil.Process().memory_info().rss
        self.values[self.n] = rss
        self.n += 1

    def growth(self) -> int:
        """Bytes the RSS grew over the loop: the largest sample less the first."""
        v = self.values[: self.n]
        return int(v.max() - v[0]) if self.n else 0


def _minor_faults() -> int:
    """Minor page faults of this process so far: a hop that allocates and fills fresh pages
    costs one per 4 KiB page, even where RSS falls back after the hop."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def linear_of(nbytes: int) -> nn.Linear:
    """An fp32 ``nn.Linear`` without bias whose weight is exactly ``nbytes`` bytes (up to 1024
    inputs), not initialised (``skip_init``: no Kaiming draw of 256 MiB per size)."""
    n = nbytes // 4
    cols = min(1024, n)
    if n * 4 != nbytes or n % cols:
        raise ValueError(f"no fp32 Linear of exactly {nbytes} bytes with {cols} inputs")
    return skip_init(nn.Linear, cols, n // cols, bias=False)


def e2e_model(nbytes: int, k: int) -> BlockModel:
    """A tiny stem, ``k`` middle blocks, each an ``nn.Linear`` of ``nbytes / k`` bytes (``k`` = 1:
    one large layer; more: a segment of several decoder layers, as an OPT segment travels),
    a tiny head. Every byte zero, so every page is touched as a trained model's are."""
    blocks: list[tuple[str, nn.Module]] = [("stem", nn.Linear(4, 4, bias=False))]
    blocks += [(f"layer{j}", linear_of(nbytes // k)) for j in range(k)]
    blocks.append(("head", nn.Linear(4, 4, bias=False)))
    model = BlockModel(blocks)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


def e2e_ctx(comm: Comm, hops: Hops, nbytes: int, k: int, *, flat: bool) -> SimpleNamespace:
    """What ``send_blocks``/``post_blocks``/``receive_blocks`` read of a scheme's ``Context``."""
    model = e2e_model(nbytes, k)
    if flat:
        flat_storage(model)
    if hops.buffers.in_place(model) != flat:
        raise AssertionError(f"in place = {hops.buffers.in_place(model)} for flat = {flat}")
    return SimpleNamespace(model=model, comm=comm, hops=hops, record=_Record())


def post_hop(ctx: SimpleNamespace, source: int, round_: int, hop: int, ids: list[int]) -> None:
    """Post the receive of the next hop as Snake does (keep = "all": into the model)."""
    post_blocks(ctx, source, KIND_MODEL, round_, hop, ids)


def model_token(
    ctx: SimpleNamespace,
    world: MPI.Comm,
    reps: int,
    r0: int,
    *,
    ahead: bool,
    rss: RssTrace | None = None,
    between: Callable[[], None] | None = None,
) -> float:
    """Seconds per hop of ``ctx.model``'s middle blocks going back and forth (rank 0 -> 1 ->
    0 ..., ``reps`` round trips of rounds ``r0`` ..., one transfer in flight) through the
    schemes' own ``send_blocks``/``receive_blocks``. ``ahead``: each rank posts its next
    receive (``common.post_blocks``) right after its own send, as
    Snake does where the order of hops is known; the bytes land in the model's block buffers.
    ``rss``: sampled after every hop this rank takes part in. ``between``: run on rank 1
    after each receive, before it sends back (the checks)."""
    comm = ctx.comm
    peer = 1 - comm.rank
    ids = ctx.model.middle_ids
    if ahead and comm.rank == 1:
        post_hop(ctx, 0, r0, 0, ids)
    world.Barrier()
    t0 = MPI.Wtime()
    for r in range(r0, r0 + reps):
        if comm.rank == 0:
            send_blocks(ctx, peer, KIND_MODEL, r, 0, ids)
            if ahead:
                post_hop(ctx, peer, r, 1, ids)
            if rss is not None:
                rss()
            receive_blocks(ctx, peer, KIND_MODEL, r, 1)
            if rss is not None:
                rss()
        else:
            receive_blocks(ctx, peer, KIND_MODEL, r, 0)
            if rss is not None:
                rss()
            if between is not None:
                between()
            send_blocks(ctx, peer, KIND_MODEL, r, 1, ids)
            if ahead and r + 1 < r0 + reps:
                post_hop(ctx, peer, r + 1, 0, ids)
            if rss is not None:
                rss()
    return (MPI.Wtime() - t0) / (2 * reps)


def bare_token(world: MPI.Comm, buf: np.ndarray, reps: int, rss: RssTrace | None = None) -> float:
    """Seconds per hop of a bare mpi4py ``Send``/``Recv`` of a preallocated buffer going back
    and forth, each rank forwarding the buffer it has just received (ring_bw --mode token)."""
    rank = world.Get_rank()
    peer = 1 - rank
    world.Barrier()
    t0 = MPI.Wtime()
    for _ in range(reps):
        if rank == 0:
            world.Send([buf, MPI.BYTE], peer, 9)
            if rss is not None:
                rss()
            world.Recv([buf, MPI.BYTE], peer, 9)
        else:
            world.Recv([buf, MPI.BYTE], peer, 9)
            if rss is not None:
                rss()
            world.Send([buf, MPI.BYTE], peer, 9)
        if rss is not None:
            rss()
    return (MPI.Wtime() - t0) / (2 * reps)


def check_hop(ctx: SimpleNamespace, world: MPI.Comm, r0: int, *, ahead: bool, k: int) -> None:
    """One round trip that proves the hops: rank 0 writes a pattern into its middle blocks,
    rank 1 finds it in its own after the hop (and zeros elsewhere before), writes a second
    pattern, and rank 0 finds that after the hop back; and every hop counted exactly one
    header of ``k`` blocks and the blocks' bytes (``comm.stats``)."""
    model, comm = ctx.model, ctx.comm
    ids = model.middle_ids
    sizes = np.array([block_nbytes(model, b) for b in ids], dtype=np.int64)
    total = int(sizes.sum())
    there = np.resize(np.arange(251, dtype=np.uint8), total)
    back = np.resize(np.arange(241, 0, -1, dtype=np.uint8), total)
    unflatten(model, ids, there if comm.rank == 0 else np.zeros(total, np.uint8), sizes)
    st = comm.stats
    before = (st.bytes_sent, st.bytes_received, st.messages_sent, st.messages_received)
    seen: list[bool] = []

    def on_rank1() -> None:
        seen.append(np.array_equal(flatten(model, ids)[0], there))
        unflatten(model, ids, back, sizes)

    model_token(ctx, world, 1, r0, ahead=ahead, between=on_rank1)
    hop_bytes = header_nbytes(k) + total
    after = (st.bytes_sent, st.bytes_received, st.messages_sent, st.messages_received)
    counted = tuple(a - b for a, b in zip(after, before, strict=True))
    ok = counted == (hop_bytes, hop_bytes, 1, 1)
    ok &= seen == [True] if comm.rank == 1 else np.array_equal(flatten(model, ids)[0], back)
    oks = np.zeros(world.Get_size(), dtype=np.uint8)  # every rank's verdict, as bytes
    world.Allgather([np.array([ok], dtype=np.uint8), MPI.BYTE], [oks, MPI.BYTE])
    if not oks.all():
        raise AssertionError(
            f"rank {comm.rank}: hop check failed ({'views' if ahead else 'copy'}, {k} block(s) "
            f"of {total} bytes): counted {counted}, expected ({hop_bytes}, {hop_bytes}, 1, 1); "
            f"bytes arrived: {seen or 'see rank 1'}; ranks ok {oks.tolist()}"
        )


PIPELINED_MIN_BYTES = 64 << 20  # the pipelined mode's comm.pipelined_min_bytes by default
E2E_MODES = ("bare", "views", "general", "copy", "pipelined")
AHEAD = ("views", "general", "pipelined")


def e2e_rows(
    world: MPI.Comm, comm: Comm, piped: Comm, nbytes: int, k: int, trials: int, r0: int
) -> tuple[dict[str, float], int]:
    """One size, ``k`` blocks per hop: GB/s per mode (best of ``trials``, interleaved), RSS
    growth (MiB, an untimed loop after the trials, worst rank), minor faults per hop (fewest
    over trials, worst rank), the copying mode's pack + unpack time per hop; and the next free
    round number."""
    hop = Hops(comm, HopBuffers(PATH_HOST))
    general = Hops(comm, HopBuffers(PATH_HOST), plans=False)
    halves = Hops(piped, HopBuffers(PATH_HOST))
    ctxs = {
        "views": e2e_ctx(comm, hop, nbytes, k, flat=True),
        "general": e2e_ctx(comm, general, nbytes, k, flat=True),
        "copy": e2e_ctx(comm, hop, nbytes, k, flat=False),
        "pipelined": e2e_ctx(piped, halves, nbytes, k, flat=True),
    }
    buf = host_buffer(nbytes)
    reps = max(4, _reps(nbytes) // 2)  # round trips: 2 reps hops per loop
    bare_token(world, buf, 2)  # warm-up: connection set-up, page faults, first allocations
    for mode, ctx in ctxs.items():
        model_token(ctx, world, 2, r0, ahead=mode in AHEAD)
        check_hop(ctx, world, r0 + 2, ahead=mode in AHEAD, k=k)
        r0 += 3
    secs: dict[str, list[float]] = {m: [] for m in E2E_MODES}
    growth = dict.fromkeys(E2E_MODES, 0)
    faults = dict.fromkeys(E2E_MODES, float("inf"))
    pack = dict.fromkeys(E2E_MODES, float("inf"))
    for trial in range(trials + 1):
        for mode in E2E_MODES:
            # the last pass samples the RSS after every hop and is not timed: reading it
            # (psutil, /proc) costs more than a small hop and evicts the caches a hop runs in
            rss = RssTrace(2 * reps) if trial == trials else None
            f0 = _minor_faults()
            if mode == "bare":
                s = bare_token(world, buf, reps, rss)
            else:
                ctxs[mode].record.sums.clear()
                s = model_token(ctxs[mode], world, reps, r0, ahead=mode in AHEAD, rss=rss)
                r0 += reps
                pack[mode] = min(pack[mode], ctxs[mode].record.sums.get("pack_s", 0.0) / reps)
            if rss is not None:
                growth[mode] = rss.growth()
                continue
            secs[mode].append(s)
            faults[mode] = min(faults[mode], (_minor_faults() - f0) / (2 * reps))
    mine = np.array(
        [growth[m] for m in E2E_MODES] + [faults[m] for m in E2E_MODES], dtype=np.float64
    )
    worst = np.empty_like(mine)
    world.Allreduce(mine, worst, op=MPI.MAX)
    packs = np.array([pack["views"], pack["copy"]], dtype=np.float64)
    both = np.empty_like(packs)
    world.Allreduce(packs, both, op=MPI.SUM)  # a hop: the sender's pack + the receiver's unpack
    out = {f"{m}_GBps": nbytes / min(secs[m]) / 1e9 for m in E2E_MODES}
    for i, m in enumerate(E2E_MODES):
        out[f"rss_growth_{m}_MiB"] = worst[i] / (1 << 20)
        out[f"faults_per_hop_{m}"] = worst[len(E2E_MODES) + i]
    out["views_pack_us"], out["copy_pack_us"] = both[0] / 2 * 1e6, both[1] / 2 * 1e6
    out["hops"] = 2 * reps
    hop.free()
    halves.free()
    del ctxs, buf
    gc.collect()
    return out, r0


E2E_COLUMNS = (
    "blocks_per_hop,bytes,block_bytes,hops,limit_GBps,limit_set_by,bare_token_GBps,views_GBps,"
    "views_vs_limit,views_vs_bare,copy_GBps,copy_vs_limit,rss_growth_views_MiB,rss_growth_copy_MiB,"
    "rss_growth_bare_MiB,faults_per_hop_views,faults_per_hop_copy,faults_per_hop_bare,"
    "views_pack_us_per_hop,copy_pack_us_per_hop,target,below_target,general_GBps,general_vs_bare,"
    "pipelined_GBps,pipelined_vs_views,pipelined_min_bytes"
)


def e2e_table(
    max_mib: int,
    trials: int,
    blocks: int,
    limit_csv: str | None,
    csv_out: str | None,
    pipelined: int = PIPELINED_MIN_BYTES,
) -> None:
    """Part 2: model -> model hops through the schemes' own send_blocks/receive_blocks, in
    place (views) and copied (copy), against a bare mpi4py token and the machine's limit."""
    world = MPI.COMM_WORLD
    rank = world.Get_rank()
    limits, _ = read_limits(limit_csv)
    comm = Comm.world(deadline_s=600)  # as a run's by default: every block one plain message
    piped = Comm.world(deadline_s=600)
    piped.use_pipelined_copy(pipelined, host=True)  # as run.py sets comm.pipelined_min_bytes
    lines = [E2E_COLUMNS]
    r0 = 0
    for k in sorted({1, blocks}):
        if rank == 0:
            what = "one nn.Linear block" if k == 1 else f"{k} nn.Linear blocks (a segment)"
            print(
                f"# end to end, 2 ranks: {what} per hop, model -> model by send_blocks/"
                "receive_blocks, back and forth; GB/s = bytes / seconds per hop; best of "
                f"{trials}; limit: {limit_csv or '- (no --limit-csv; flags vs bare token)'}"
            )
            print(
                "# GB/s: limit, bare (mpi4py token), views (in place, hop plans), general (in "
                "place, no hop plans), copy (flatten/unflatten), piped (views with "
                f"comm.pipelined_min_bytes = {pipelined}: blocks that large as swapped halves); "
                "v/lim, v/bare, c/lim: ratios; RSS+: growth over an untimed loop of hops after "
                "the timed ones (MiB, worst rank); faults: minor page faults per timed hop"
            )
            print(
                f"{'size':>10} {'hops':>5} {'limit':>6} {'set by':>13} {'bare':>6} "
                f"{'views':>6} {'v/lim':>6} {'v/bare':>6} {'general':>7} {'g/bare':>6} "
                f"{'copy':>6} {'c/lim':>6} {'piped':>6} {'p/v':>6} "
                f"{'RSS+ v/c':>9} {'faults v/c':>12}"
            )
        for nbytes in _sizes(max_mib):
            if nbytes % (4 * k):
                continue
            g, r0 = e2e_rows(world, comm, piped, nbytes, k, trials, r0)
            if rank != 0:
                continue
            lim, by = limits.get(nbytes, (float("nan"), "-"))
            known = by != "-"
            ref = lim if known else g["bare_GBps"]
            target = e2e_target(nbytes)
            below = g["views_GBps"] / ref < target
            flag = f"  < {target} target{'' if known else ' (vs bare)'}" if below else ""

            def ratio(x: float, known: bool = known, lim: float = lim) -> str:
                return f"{x / lim:>6.3f}" if known else f"{'-':>6}"

            rss = f"{g['rss_growth_views_MiB']:.1f}/{g['rss_growth_copy_MiB']:.1f}"
            flt = f"{g['faults_per_hop_views']:.1f}/{g['faults_per_hop_copy']:.1f}"
            lim_cell = f"{lim:>6.2f}" if known else f"{'-':>6}"
            vb = g["views_GBps"] / g["bare_GBps"]
            pv = g["pipelined_GBps"] / g["views_GBps"]
            print(
                f"{_label(nbytes):>10} {g['hops']:>5} {lim_cell} {by:>13} {g['bare_GBps']:>6.2f} "
                f"{g['views_GBps']:>6.2f} {ratio(g['views_GBps'])} {vb:>6.3f} "
                f"{g['general_GBps']:>7.2f} {g['general_GBps'] / g['bare_GBps']:>6.3f} "
                f"{g['copy_GBps']:>6.2f} {ratio(g['copy_GBps'])} {g['pipelined_GBps']:>6.2f} "
                f"{pv:>6.3f} {rss:>9} {flt:>12}{flag}",
                flush=True,
            )
            lines.append(
                f"{k},{nbytes},{nbytes // k},{g['hops']},{lim:.4f},{by},{g['bare_GBps']:.4f},"
                f"{g['views_GBps']:.4f},{g['views_GBps'] / lim:.4f},{vb:.4f},{g['copy_GBps']:.4f},"
                f"{g['copy_GBps'] / lim:.4f},{g['rss_growth_views_MiB']:.2f},"
                f"{g['rss_growth_copy_MiB']:.2f},{g['rss_growth_bare_MiB']:.2f},"
                f"{g['faults_per_hop_views']:.2f},{g['faults_per_hop_copy']:.2f},"
                f"{g['faults_per_hop_bare']:.2f},{g['views_pack_us']:.2f},"
                f"{g['copy_pack_us']:.2f},{target},{int(below)},{g['general_GBps']:.4f},"
                f"{g['general_GBps'] / g['bare_GBps']:.4f},{g['pipelined_GBps']:.4f},{pv:.4f},"
                f"{pipelined}"
            )
    if csv_out and rank == 0:
        Path(csv_out).write_text("\n".join(lines) + "\n")


def probe_overhead(pairs: int, device: str = "cpu") -> None:
    """Wall time of the same Snake run with the sampler on and off (alternating, ``pairs`` each)."""
    from snake_mpi import run
    from snake_mpi.config import load_config
    from snake_mpi.transport.mpi.world import cuda_support, local_rank_by_split

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
        "--limit-csv",
        help="bench/limit.py's limit.csv from the same job (bench/hop_vs_ring.sh): the token "
        "and end-to-end hops as a share of the machine's limit, and which benchmark set it",
    )
    p.add_argument("--csv", help="write the hop-throughput table as CSV here (for the report)")
    p.add_argument("--skip-e2e", action="store_true", help="skip part 2 (model -> model hops)")
    p.add_argument(
        "--e2e-blocks",
        type=int,
        default=4,
        help="part 2's second row set: this many middle blocks per hop (1: one row set only)",
    )
    p.add_argument("--e2e-csv", help="write part 2's table as CSV here")
    p.add_argument(
        "--pipelined-min-bytes",
        type=int,
        default=PIPELINED_MIN_BYTES,
        help="part 2's pipelined mode: its comm.pipelined_min_bytes [%(default)s]",
    )
    p.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cpu",
        help="cuda: also the transfer paths from GPU memory (part 3); probe runs on the GPU",
    )
    p.add_argument("--paths-csv", help="write part 3's table as CSV here")
    args = p.parse_args()
    if MPI.COMM_WORLD.Get_size() < 2:
        raise SystemExit("run under MPI with 2 ranks: mpirun -n 2 python -m bench.transfer")
    t0 = time.perf_counter()
    if args.e2e_blocks < 1:
        raise SystemExit("--e2e-blocks must be at least 1")
    transfer_table(args.max_mib, args.trials, args.limit_csv, args.csv)
    if not args.skip_e2e:
        e2e_table(
            args.max_mib,
            args.trials,
            args.e2e_blocks,
            args.limit_csv,
            args.e2e_csv,
            args.pipelined_min_bytes,
        )
    if args.device == "cuda":
        device_paths_table(args.max_mib, args.trials, args.paths_csv)
    if not args.skip_probes:
        probe_overhead(args.probe_pairs, args.device)
    if MPI.COMM_WORLD.Get_rank() == 0:
        print(f"# done in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
