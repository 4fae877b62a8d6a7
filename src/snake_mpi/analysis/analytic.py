"""Analytic byte counts that the measured counters must equal exactly (pure functions).

Derived from who trains what, not from the version stamps the scheme uses, so a test that
compares the two checks the implementation against an independent reading of the definition.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import numpy as np

from snake_mpi.transport.wire import CommStats, header_nbytes


def result_block_bytes(res: Any) -> list[int]:
    """Bytes of each block of a finished run (``/blocks/bytes`` of a ``store.Result``)."""
    return [int(b) for b in res.tables["blocks"]["bytes"]]


def _hop_bytes(block_bytes: Sequence[int], ids: set[int]) -> int:
    return header_nbytes(len(ids)) + sum(block_bytes[b] for b in ids)


def _not_own(plan: Sequence[Sequence[int]], node: int, n_blocks: int) -> set[int]:
    """Blocks ``node`` does not train: what it frees between turns with ``keep = "own"``."""
    return set(range(n_blocks)) - set(plan[node])


def snake_p2p_hop_blocks(
    plan: Sequence[Sequence[int]],
    n_blocks: int,
    sender: int,
    round_: int,
    transfer: str,
    *,
    keep: str = "all",
) -> set[int]:
    """Blocks on the hop from ``sender`` to its successor in ``round_``.

    ``delta``: the blocks trained by anyone since the receiver last held the model: in round 0
    (before the model first returns to node 0) that is nodes 0..sender; afterwards every node but
    the receiver. With ``keep = "own"`` a receiver that has had a turn also gets every block it
    does not train (it freed them). ``full``: every block.
    """
    if transfer == "full":
        return set(range(n_blocks))
    n = len(plan)
    receiver = (sender + 1) % n
    first_visit = round_ == 0 and sender < n - 1
    trainers = range(sender + 1) if first_visit else (m for m in range(n) if m != receiver)
    ids = {b for m in trainers for b in plan[m]}
    if keep == "own" and not first_visit:
        ids |= _not_own(plan, receiver, n_blocks)
    return ids


def snake_p2p_bytes_sent(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    rounds: int,
    transfer: str,
    *,
    keep: str = "all",
) -> np.ndarray:
    """Bytes each node sends per round, shape (rounds, N); the run's last hop is not sent."""
    n = len(plan)
    out = np.zeros((rounds, n), dtype=np.int64)
    for r in range(rounds):
        for j in range(n):
            if r == rounds - 1 and j == n - 1:
                continue
            ids = snake_p2p_hop_blocks(plan, len(block_bytes), j, r, transfer, keep=keep)
            out[r, j] = _hop_bytes(block_bytes, ids)
    return out


def snake_p2p_bytes_received(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    rounds: int,
    transfer: str,
    *,
    keep: str = "all",
) -> np.ndarray:
    """Bytes each node receives per round (node 0 gets round r-1's last hop in its round r)."""
    sent = snake_p2p_bytes_sent(plan, block_bytes, rounds, transfer, keep=keep)
    n = len(plan)
    out = np.zeros_like(sent)
    out[:, 1:] = sent[:, : n - 1]
    out[1:, 0] = sent[:-1, n - 1]
    return out


def snake_final_sync_bytes_sent(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    transfer: str,
    *,
    keep: str = "all",
) -> np.ndarray:
    """Bytes each node sends in the final sync (last node -> 0 -> 1 -> ... -> N-2), shape (N,).

    The receiver ``k`` last held the model after its own turn in the last round, so it lacks
    what nodes after it trained (for node 0: every other node), and with ``keep = "own"`` every
    block it does not train.
    """
    n = len(plan)
    out = np.zeros(n, dtype=np.int64)
    for k in range(n - 1):  # receivers 0 .. N-2
        sender = (k - 1) % n
        ids = _sync_blocks(plan, len(block_bytes), k, transfer, keep)
        out[sender] = _hop_bytes(block_bytes, ids)
    return out


def _sync_blocks(
    plan: Sequence[Sequence[int]], n_blocks: int, k: int, transfer: str, keep: str
) -> set[int]:
    """Blocks the final sync gives node ``k``: what later nodes trained in the last round, plus
    (``keep = "own"``) every block ``k`` does not train; ``full``: every block."""
    if transfer == "full":
        return set(range(n_blocks))
    ids = {b for m in range(k + 1, len(plan)) for b in plan[m]}
    if keep == "own":
        ids |= _not_own(plan, k, n_blocks)
    return ids


def snake_cs_bytes_sent(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    rounds: int,
    transfer: str,
    *,
    keep: str = "all",
) -> np.ndarray:
    """Snake CS: bytes each rank sends per round, shape (rounds, 1 + nodes); rank 0 controls.

    The controller sends node ``k`` what changed since node ``k``'s last turn (``delta``: in
    round 0 what nodes ``0..k-1`` trained, later what every other node trained, and with
    ``keep = "own"`` every block ``k`` does not train; ``full``: every block); node ``k``
    returns exactly the blocks it trained.
    """
    n = len(plan)
    out = np.zeros((rounds, n + 1), dtype=np.int64)
    for r in range(rounds):
        for k in range(n):
            down = _cs_down(plan, len(block_bytes), r, k, transfer, keep)
            out[r, 0] += _hop_bytes(block_bytes, down)
            out[r, k + 1] = _hop_bytes(block_bytes, set(plan[k]))
    return out


def _cs_down(
    plan: Sequence[Sequence[int]],
    n_blocks: int,
    round_: int,
    k: int,
    transfer: str,
    keep: str = "all",
) -> set[int]:
    """Blocks the CS controller sends node ``k`` in ``round_``: what changed since its last
    turn (round 0: what nodes before it trained; later: what every other node trained, and with
    ``keep = "own"`` every block ``k`` does not train, as it freed them)."""
    if transfer == "full":
        return set(range(n_blocks))
    n = len(plan)
    others = range(k) if round_ == 0 else (m for m in range(n) if m != k)
    ids = {b for m in others for b in plan[m]}
    if keep == "own" and round_ > 0:
        ids |= _not_own(plan, k, n_blocks)
    return ids


def snake_cs_bytes_received(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    rounds: int,
    transfer: str,
    *,
    keep: str = "all",
) -> np.ndarray:
    """Snake CS: bytes each rank receives per round (the mirror of ``snake_cs_bytes_sent``)."""
    n = len(plan)
    sent = snake_cs_bytes_sent(plan, block_bytes, rounds, transfer, keep=keep)
    out = np.zeros_like(sent)
    out[:, 0] = sent[:, 1:].sum(axis=1)
    for r in range(rounds):
        for k in range(n):
            down = _cs_down(plan, len(block_bytes), r, k, transfer, keep)
            out[r, k + 1] = _hop_bytes(block_bytes, down)
    return out


def snake_cs_final_sync_bytes_sent(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    transfer: str,
    *,
    keep: str = "all",
) -> np.ndarray:
    """Snake CS final sync: the controller sends nodes ``0..n-2`` what later nodes trained in
    the last round (``full``: the whole model), shape (1 + nodes,). With ``keep = "own"`` every
    node, the last one too, also gets every block it does not train (it freed them)."""
    n = len(plan)
    out = np.zeros(n + 1, dtype=np.int64)
    for k in range(n if keep == "own" else n - 1):
        out[0] += _hop_bytes(block_bytes, _sync_blocks(plan, len(block_bytes), k, transfer, keep))
    return out


def snake_at_rest_bytes(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    rounds: int,
    *,
    mode: str,
    keep: str = "all",
) -> np.ndarray:
    """Model bytes each rank holds at the end of every round, after its turn (the
    ``model_at_rest_bytes`` a run records), shape (rounds, world): ``keep = "all"``: the whole
    model ``P·b`` everywhere; ``own``: node ``k`` its trained blocks ``p_k·b``, except the P2P
    last node in the last round (it hands nothing on and keeps the final model) and the CS
    controller (rank 0, always the whole model)."""
    total = int(sum(block_bytes))
    n = len(plan)
    first = 1 if mode == "cs" else 0
    out = np.full((rounds, first + n), total, dtype=np.int64)
    if keep == "own":
        for k, ids in enumerate(plan):
            out[:, first + k] = sum(block_bytes[b] for b in set(ids))
        if mode != "cs":
            out[rounds - 1, n - 1] = total
    return out


def snake_end_held_bytes(
    plan: Sequence[Sequence[int]],
    block_bytes: Sequence[int],
    rounds: int,
    *,
    mode: str,
    keep: str = "all",
    final_sync: bool = True,
) -> np.ndarray:
    """Model bytes each rank holds at the end of the run, shape (world,): the whole model
    everywhere after a final sync (it gives every rank the final model, under either ``keep``);
    without one, what it held at the end of the last round."""
    at_rest = snake_at_rest_bytes(plan, block_bytes, rounds, mode=mode, keep=keep)[-1]
    return np.full_like(at_rest, sum(block_bytes)) if final_sync else at_rest


def fedavg_bytes_per_round(n_clients: int, model_bytes: int, n_blocks: int) -> int:
    """FedAvg: the model to every client and back, ``2 * N * (P*b + header)``."""
    return 2 * n_clients * (model_bytes + header_nbytes(n_blocks))


def fedavg_bytes_sent(
    block_bytes: Sequence[int], schedule: Sequence[Sequence[int]], world_size: int
) -> np.ndarray:
    """FedAvg: bytes each rank sends per round, shape (rounds, N): the server one whole model
    per chosen client, each chosen client one whole model; ``schedule`` lists the chosen ranks.
    Received bytes are the same table (the exchange is symmetric)."""
    hop = _hop_bytes(block_bytes, set(range(len(block_bytes))))
    out = np.zeros((len(schedule), world_size), dtype=np.int64)
    for r, chosen in enumerate(schedule):
        out[r, 0] = hop * len(chosen)
        out[r, list(chosen)] = hop
    return out


def _split_batches(samples_per_batch: Sequence[int], act_bytes: int) -> tuple[int, int]:
    """(activation-and-labels bytes, gradient bytes) of one client turn, headers included."""
    up = sum(header_nbytes(2) + n * (act_bytes + 8) for n in samples_per_batch)
    down = sum(header_nbytes(1) + n * act_bytes for n in samples_per_batch)
    return up, down


def split_bytes(
    client_block_bytes: Sequence[int],
    batches: Sequence[Sequence[int]],
    act_bytes_per_sample: int,
    rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Sequential split learning: (sent, received) bytes per round per rank, shape (rounds, N).

    ``batches[k]`` lists the batch sizes of rank ``k``'s turn (empty for the server, rank 0);
    activations are ``act_bytes_per_sample`` per sample plus an int64 label. Per round each
    client exchanges its batches with the server and relays its blocks to the next client; the
    last client also sends them to the server (for evaluation), and its relay to client 1 is
    left out in the last round.
    """
    n = len(batches)
    last = n - 1
    relay = _hop_bytes(client_block_bytes, set(range(len(client_block_bytes))))
    sent = np.zeros((rounds, n), dtype=np.int64)
    received = np.zeros((rounds, n), dtype=np.int64)
    for r in range(rounds):
        for k in range(1, n):
            up, down = _split_batches(batches[k], act_bytes_per_sample)
            sent[r, k] += up
            received[r, 0] += up
            sent[r, 0] += down
            received[r, k] += down
            if k < last:
                sent[r, k] += relay
                received[r, k + 1] += relay
            elif r < rounds - 1:  # the wrap to client 1 counts in the round that receives it
                sent[r, k] += relay
                received[r + 1, 1] += relay
            if k == last:
                sent[r, k] += relay
                received[r, 0] += relay
    return sent, received


def splitfed_bytes(
    client_block_bytes: Sequence[int],
    batches: Sequence[Sequence[int]],
    act_bytes_per_sample: int,
    rounds: int,
) -> tuple[np.ndarray, np.ndarray]:
    """SplitFed v1: (sent, received) bytes per round per rank, shape (rounds, N): the server
    sends every client the client-side blocks, the batches are exchanged, every client returns
    its blocks."""
    n = len(batches)
    part = _hop_bytes(client_block_bytes, set(range(len(client_block_bytes))))
    sent = np.zeros((rounds, n), dtype=np.int64)
    received = np.zeros((rounds, n), dtype=np.int64)
    for k in range(1, n):
        up, down = _split_batches(batches[k], act_bytes_per_sample)
        sent[:, k] += up + part
        received[:, k] += down + part
        sent[:, 0] += down + part
        received[:, 0] += up + part
    return sent, received


def train_state_bytes_full(params: int, bytes_per_value: int = 4, optimizer: str = "adam") -> int:
    """Static training state of full training: weights + gradients + optimiser moments."""
    moments = {"adam": 2, "sgd": 1, "sgd-plain": 0}[optimizer]
    return params * bytes_per_value * (2 + moments)


def train_state_bytes_snake(
    params_total: int,
    params_trainable: int,
    bytes_per_value: int = 4,
    optimizer: str = "adam",
    *,
    copies: int = 0,
) -> int:
    """A Snake node: all weights held, gradients and optimiser moments for its trainable part,
    and ``copies`` frozen copies of that part (1 for the distillation teacher, ``snake.kd``;
    1 more for FedProx's anchors, ``snake.prox_mu``)."""
    moments = {"adam": 2, "sgd": 1, "sgd-plain": 0}[optimizer]
    per_value = 1 + moments + copies
    return params_total * bytes_per_value + params_trainable * bytes_per_value * per_value


# ------------------------------------------------------------------ checkpoint files


def checkpoint_blocks(
    n_blocks: int,
    rounds_done: int,
    *,
    scheme: str,
    world_size: int,
    plan: Sequence[Sequence[int]] | None = None,
    mode: str = "p2p",
    keep: str = "all",
    schedule: Sequence[Sequence[int]] | None = None,
) -> list[set[int]]:
    """The blocks each rank's checkpoint file holds after ``rounds_done`` rounds (``>= 1``; a
    checkpoint is never taken before the first round ends), one set per rank: the scheme's
    ``SchemeSpec.checkpoint_blocks`` (built in: ``snake_checkpoint_blocks``,
    ``fedavg_checkpoint_blocks``, ``centralised_checkpoint_blocks``).

    The rule: a rank writes every block it holds whose version is above 0, i.e. a block that
    somebody trained and this rank then received, or that it trained itself. So a block nobody
    trains (Snake ``ends = "frozen"``: stem and head) is never written, and neither is a block a
    rank freed (``snake.keep = "own"``). Whether hops carry ``delta`` or ``full`` makes no
    difference: a ``full`` hop also carries the untrained blocks, but at version 0.
    """
    from snake_mpi.schemes.registry import resolve, scheme_names, scheme_spec

    formula = scheme_spec(scheme).checkpoint_blocks if scheme in scheme_names() else None
    if formula is None:
        raise ValueError(f"no analytic checkpoint contents for scheme {scheme!r}")
    if rounds_done < 1:
        return [set() for _ in range(world_size)]
    out: list[set[int]] = resolve(formula)(
        n_blocks,
        rounds_done,
        world_size=world_size,
        plan=plan,
        mode=mode,
        keep=keep,
        schedule=schedule,
    )
    return out


def centralised_checkpoint_blocks(n_blocks: int, rounds_done: int, **_: object) -> list[set[int]]:
    """Centralised: every block (``checkpoint_blocks``)."""
    return [set(range(n_blocks))]


def fedavg_checkpoint_blocks(
    n_blocks: int,
    rounds_done: int,
    *,
    world_size: int,
    schedule: Sequence[Sequence[int]] | None = None,
    **_: object,
) -> list[set[int]]:
    """FedAvg (``checkpoint_blocks``): the server (rank 0) every block (it stamps the average
    each round); a client every block once it has been chosen in one of the first
    ``rounds_done`` rounds of ``schedule`` (``fedavg.sampled_clients``; None: every client
    every round), else none."""
    everything = set(range(n_blocks))
    rounds = (
        schedule[:rounds_done]
        if schedule is not None
        else [list(range(1, world_size))] * rounds_done
    )
    chosen = {int(c) for ids in rounds for c in ids}
    return [everything] + [everything if c in chosen else set() for c in range(1, world_size)]


def snake_checkpoint_blocks(
    n_blocks: int,
    rounds_done: int,
    *,
    world_size: int,
    plan: Sequence[Sequence[int]] | None = None,
    mode: str = "p2p",
    keep: str = "all",
    **_: object,
) -> list[set[int]]:
    """Snake (``checkpoint_blocks``). P2P (``plan``: node ``j`` is rank ``j``): after round 1
    node ``j > 0`` has what nodes ``0..j`` trained (its first visit brought what its
    predecessors trained); from round 2 on every node has every trained block (``keep =
    "all"``). With ``keep = "own"`` node ``j > 0`` holds its own blocks only (it freed the rest
    once it handed the model on). Node 0 has, at every checkpoint, already taken in the last
    node's end-of-round hop, which brings it every block trained since its turn and (``own``)
    every block it freed: it holds every trained block under either ``keep``. CS (``plan``:
    node ``k`` is rank ``k + 1``): the controller holds every trained block; node ``k`` as P2P
    node ``k > 0``, the round-1 rule included."""
    if plan is None:
        raise ValueError("Snake's checkpoint contents need the plan")
    n = len(plan)
    trained = {int(b) for ids in plan for b in ids}

    def node(k: int) -> set[int]:
        if keep == "own":
            return {int(b) for b in plan[k]}
        if rounds_done == 1:
            return {int(b) for m in range(k + 1) for b in plan[m]}
        return set(trained)

    if mode == "cs":
        out = [set(trained)] + [node(k) for k in range(n)]
    else:
        out = [set(trained)] + [node(j) for j in range(1, n)]
    if len(out) != world_size:
        raise ValueError(f"a Snake {mode} plan of {n} nodes is not a world of {world_size}")
    return out


def checkpoint_block_bytes(
    block_bytes: Sequence[int],
    rounds_done: int,
    *,
    scheme: str,
    world_size: int,
    plan: Sequence[Sequence[int]] | None = None,
    mode: str = "p2p",
    keep: str = "all",
    schedule: Sequence[Sequence[int]] | None = None,
) -> np.ndarray:
    """Block bytes of each rank's checkpoint file after ``rounds_done`` rounds, shape
    ``(world,)``: the tensors of ``checkpoint_blocks``, exactly (the file stores each block
    tensor's raw bytes; ``block_bytes`` as ``blocks.block_nbytes``). The file holds these plus
    at most ``checkpoint_overhead_max_bytes``."""
    held = checkpoint_blocks(
        len(block_bytes),
        rounds_done,
        scheme=scheme,
        world_size=world_size,
        plan=plan,
        mode=mode,
        keep=keep,
        schedule=schedule,
    )
    return np.array([sum(int(block_bytes[b]) for b in ids) for ids in held], dtype=np.int64)


CHECKPOINT_RNG_BYTES = 5056 + 5056 + 624 * 4 + 625 * 8
"""Random states in a checkpoint file: the rank's torch generator and torch's global CPU
generator (5056 bytes each), numpy's MT19937 keys (624 x uint32) and Python's Mersenne Twister
state (625 words, stored as uint64)."""
CHECKPOINT_CUDA_RNG_BYTES = 16
"""torch's CUDA generator state (Philox seed and offset, two 8-byte words since torch 2.1), on a
rank whose model is on a GPU."""
CHECKPOINT_STATS_BYTES = 8 * len(dataclasses.fields(CommStats))
_MAX_FLOAT = "-1.2345678901234567e-308"
"""The longest ``repr`` of a Python float (24 characters)."""


def _json_len(obj: object) -> int:
    return len(json.dumps(obj, separators=(",", ":")))


def _entry_max(name: str, ndim: int, dim: int, offset: int) -> int:
    """The most characters one tensor's header entry takes (and its comma)."""
    entry = {"dtype": "BOOL", "shape": [dim] * ndim, "data_offsets": [offset, offset]}
    return _json_len({name: entry}) - 2 + 1


def checkpoint_overhead_max_bytes(
    block_bytes: int,
    n_block_tensors: int,
    n_blocks: int,
    world_size: int,
    *,
    measured: bool = False,
    cuda: bool = False,
    max_dims: int = 4,
) -> int:
    """The most bytes a rank's checkpoint file holds beyond its block tensors (a file of
    ``block_bytes`` in ``n_block_tensors`` block tensors of at most ``max_dims`` dimensions).

    The data: block versions and the freed block list (int64, at most ``n_blocks`` each), the
    random states (``CHECKPOINT_RNG_BYTES``, ``cuda``: ``CHECKPOINT_CUDA_RNG_BYTES``), the
    communication counters, the plan inputs (Snake's capabilities, one float64 per node;
    ``measured``: also the block times and their spread, ``world x n_blocks`` float64 each).
    The header: the 8-byte length, the JSON header padded to 8 bytes, with one entry per
    array, each bounded by its longest form (every offset and dimension as long as the data
    size in digits, the longest dtype name), and the metadata with every number at its longest
    (ranks, rounds and byte counts as 20-digit integers, floats as 24-character reprs)."""
    arrays = {  # name -> (most data bytes, dimensions)
        "versions": (8 * n_blocks, 1),
        "released": (8 * n_blocks, 1),
        "rng.generator": (5056, 1),
        "rng.torch": (5056, 1),
        "rng.numpy": (624 * 4, 1),
        "rng.python": (625 * 8, 1),
        "stats": (CHECKPOINT_STATS_BYTES, 1),
        "info.capabilities": (8 * world_size, 1),
    }
    if cuda:
        arrays["rng.cuda"] = (CHECKPOINT_CUDA_RNG_BYTES, 1)
    if measured:
        arrays["info.block_time_s"] = (8 * world_size * n_blocks, 2)
        arrays["info.block_time_spread"] = (8 * world_size * n_blocks, 2)
    data = block_bytes + sum(nbytes for nbytes, _ in arrays.values())
    big = 10 ** len(str(max(data, 1))) - 1  # no offset and no dimension has more digits
    widest = f"block.{max(n_blocks - 1, 0)}.{max(n_block_tensors - 1, 0)}"
    entries = n_block_tensors * _entry_max(widest, max_dims, big, big)
    entries += sum(_entry_max(name, ndim, big, big) for name, (_, ndim) in arrays.items())
    word = 10**20 - 1
    meta = {
        "rank": str(word),
        "round": str(word),
        "carried": "1",
        "rng.numpy": f"MT19937|624|1|{_MAX_FLOAT}",
        "rng.python": f"3|{_MAX_FLOAT}",
        "recorder": f"{word}|{word}|{_MAX_FLOAT}",
    }
    header = 2 + entries + _json_len({"__metadata__": meta}) - 2 + 1
    return 8 + header + 7 + data - block_bytes
