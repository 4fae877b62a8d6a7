"""Two ranks: payloads larger than comm.MAX_MESSAGE_BYTES (lowered to 1000 bytes here) travel
as several messages and arrive intact, however the receive is posted (and into whatever buffer:
a new array, an ``alloc`` callback's numpy view or torch tensor, as the staged and
direct GPU paths use them; torch tensors go through mpi4py's DLPack as device tensors do);
prints one line per transfer: ``ok,<how>,<payload bytes>,<bytes counted>``."""

import numpy as np
import torch

from snake_mpi.transport.mpi import comm as comm_mod
from snake_mpi.transport.mpi.comm import Comm
from snake_mpi.transport.wire import KIND_MODEL, Transfer, TransferSpec

comm_mod.MAX_MESSAGE_BYTES = 1000
comm = Comm.world(deadline_s=30)
ids = np.array([0], dtype=np.int64)
hop = 0
HOWS = ("plain", "post", "alloc", "post-alloc", "tensor")
for how in HOWS:
    for size in (0, 999, 1000, 1001, 4500):
        payload = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8)
        sent = torch.from_numpy(payload.copy()) if how == "tensor" else payload
        if comm.rank == 0:
            comm.send_blocks(1, Transfer(KIND_MODEL, 0, hop, ids, ids, np.array([size]), sent))
        else:
            kw = {}
            reused = np.empty(5000, dtype=np.uint8)
            if how in ("alloc", "post-alloc"):
                kw["alloc"] = lambda n, buf=reused: buf[:n]
            elif how == "tensor":
                kw["alloc"] = lambda n: torch.empty(n, dtype=torch.uint8)
            if how.startswith("post"):
                comm.post(0, TransferSpec(KIND_MODEL, 0, hop, payload_bytes=size, **kw))
                kw = {}
            t = comm.recv_blocks(0, TransferSpec(KIND_MODEL, 0, hop, **kw))
            got = t.payload.numpy() if torch.is_tensor(t.payload) else t.payload
            assert np.array_equal(got, payload), (how, size)
            assert how != "tensor" or torch.is_tensor(t.payload), how
            counted = comm.stats.take()["bytes_received"]
            print(f"ok,{how},{size},{counted}", flush=True)
        hop += 1
comm.barrier()
