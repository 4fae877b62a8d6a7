"""Two ranks, emulated link: rank 0 sends payloads of several sizes to rank 1, which is already
waiting; both print how long each transfer took (CSV: rank,nbytes,seconds)."""

import sys
import time

import numpy as np

from snake_mpi.transport.mpi.comm import Comm
from snake_mpi.transport.wire import KIND_MODEL, LinkModel, Transfer, TransferSpec

link = LinkModel(bandwidth_bps=float(sys.argv[1]), latency_s=float(sys.argv[2]))
comm = Comm.world(deadline_s=60, link=link)
ids = np.array([0], dtype=np.int64)
for hop, size in enumerate([1_000, 50_000, 200_000]):
    payload = np.zeros(size, dtype=np.uint8)
    comm.barrier()
    if comm.rank == 1:
        time.sleep(0.05)  # rank 1 is waiting in its receive before rank 0 sends
    t0 = time.perf_counter()
    if comm.rank == 0:
        time.sleep(0.1)
        t0 = time.perf_counter()
        comm.send_blocks(1, Transfer(KIND_MODEL, 0, hop, ids, ids, np.array([size]), payload))
    else:
        t = comm.recv_blocks(0, TransferSpec(KIND_MODEL, 0, hop))
        t0 = time.perf_counter() - comm.stats.recv_s - comm.stats.link_emulated_s
    done = time.perf_counter()
    nbytes = size + 48 + 24
    print(f"{comm.rank},{nbytes},{done - t0:.6f}", flush=True)
    comm.stats.take()
