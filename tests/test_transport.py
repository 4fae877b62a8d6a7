"""The communicator interface (``transport.protocol.Communicator``) and its one-argument
transfers (``wire.Transfer`` to send, ``wire.TransferSpec`` to receive), in process."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.protocol import Communicator
from snake_mpi.transport.wire import (
    KIND_MODEL,
    KIND_UPDATE,
    ProtocolError,
    Transfer,
    TransferSpec,
    header_nbytes,
    pack_header,
    parse_header,
)


def blocks(hop: int, sizes: tuple[int, ...] = (3, 5)) -> Transfer:
    """A transfer of ``len(sizes)`` blocks with recognisable bytes."""
    payload = np.arange(sum(sizes), dtype=np.uint8) + hop
    ids = np.arange(len(sizes), dtype=np.int64)
    return Transfer(KIND_MODEL, 0, hop, ids, ids + 10, np.array(sizes, dtype=np.int64), payload)


def test_the_local_communicator_meets_the_protocol():
    assert isinstance(ThreadWorld(2).comm(0), Communicator)


def test_transfer_and_spec_are_frozen_and_a_transfer_names_its_spec():
    t = blocks(4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        t.hop = 5  # type: ignore[misc]
    assert t.spec == TransferSpec(KIND_MODEL, 0, 4)
    assert t.spec.describe(2) == "model transfer of round 0 hop 4 from rank 2"


def test_a_header_says_what_the_transfer_is_and_a_spec_checks_it():
    t = blocks(1)
    header = pack_header(t)
    assert header.nbytes == header_nbytes(2)
    body, payload_bytes = parse_header(header, t.spec, rank=1, what="it")
    assert payload_bytes == 8 and body[:, 1].tolist() == [10, 11]
    with pytest.raises(ProtocolError, match="expected the it"):
        parse_header(header, TransferSpec(KIND_UPDATE, 0, 1), rank=1, what="it")


@pytest.mark.parametrize("where", ["new", "alloc-numpy", "alloc-tensor", "post"])
def test_a_spec_receives_the_blocks_wherever_it_says_and_counts_the_same_bytes(where):
    reused = np.zeros(64, dtype=np.uint8)
    kw = {
        "new": {},
        "alloc-numpy": {"alloc": lambda n: reused[:n]},
        "alloc-tensor": {"alloc": lambda n: torch.empty(n, dtype=torch.uint8)},
        "post": {"blocks": ((0, 3), (1, 5))},
    }[where]

    def body(comm):
        if comm.rank == 0:
            comm.send_blocks(1, blocks(0))
            return comm.stats.take()
        spec = TransferSpec(KIND_MODEL, 0, 0, **kw)
        if where == "post":
            comm.post(0, spec)
        t = comm.recv_blocks(0, spec)
        got = t.payload.numpy() if torch.is_tensor(t.payload) else t.payload
        assert got.tolist() == list(range(8))
        assert t.block_ids.tolist() == [0, 1] and t.versions.tolist() == [10, 11]
        if where == "alloc-numpy":
            assert np.shares_memory(t.payload, reused)
        return comm.stats.take()

    sent, received = ThreadWorld(2).run(body, deadline_s=10)
    assert sent["bytes_sent"] == received["bytes_received"] == header_nbytes(2) + 8
    assert sent["messages_sent"] == received["messages_received"] == 1


def test_post_needs_the_payload_size():
    with pytest.raises(ValueError, match="payload_bytes"):
        ThreadWorld(2).comm(1).post(0, TransferSpec(KIND_MODEL, 0, 0))


def test_a_receive_of_another_transfer_is_a_protocol_error():
    def body(comm):
        if comm.rank == 0:
            comm.send_blocks(1, blocks(3))
        else:
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, 0, 2))

    with pytest.raises(ProtocolError, match="expected the model transfer of round 0 hop 2"):
        ThreadWorld(2).run(body, deadline_s=10)
