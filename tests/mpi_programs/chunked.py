"""Two ranks: payloads larger than comm.MAX_MESSAGE_BYTES (lowered to 1000 bytes here) travel
as several messages and arrive intact, however the receive is posted; prints one line per
transfer: ``ok,<how>,<payload bytes>,<bytes counted>``."""

import numpy as np

from snake_mpi import comm as comm_mod
from snake_mpi.comm import Comm
from snake_mpi.wire import KIND_MODEL

comm_mod.MAX_MESSAGE_BYTES = 1000
comm = Comm.world(deadline_s=30)
ids = np.array([0], dtype=np.int64)
hop = 0
for how in ("plain", "expect", "out"):
    for size in (0, 999, 1000, 1001, 4500):
        payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        if comm.rank == 0:
            comm.send_blocks(
                1,
                kind=KIND_MODEL,
                round=0,
                hop=hop,
                block_ids=ids,
                versions=ids,
                block_nbytes=np.array([size]),
                payload=payload,
            )
        else:
            kw = {}
            if how == "expect":
                comm.expect(0, kind=KIND_MODEL, round=0, hop=hop, payload_bytes=size)
            elif how == "out":
                kw["out"] = np.empty(5000, dtype=np.uint8)
            t = comm.recv_blocks(0, kind=KIND_MODEL, round=0, hop=hop, **kw)
            assert np.array_equal(t.payload, payload), (how, size)
            counted = comm.stats.take()["bytes_received"]
            print(f"ok,{how},{size},{counted}", flush=True)
        hop += 1
comm.barrier()
