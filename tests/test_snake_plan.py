"""Snake P2P decisions without MPI: the segment plan, and the stamp rule that picks a hop's blocks
against the independent analytic formula (who trained what since the receiver last held it)."""

import itertools

import numpy as np
import pytest

from snake_mpi.analysis import analytic
from snake_mpi.config import ModelConfig, SnakeConfig
from snake_mpi.models import build_model
from snake_mpi.schemes.snake import (
    OWNER_ALL,
    OWNER_NONE,
    block_owners,
    blocks_to_send,
    last_stamp,
    plan_segments,
    stamp,
)


def model(middle=6):
    return build_model(
        ModelConfig(family="mlp", width=8, middle_blocks=middle),
        sample_shape=(4,),
        n_classes=3,
        seed=0,
    )


@pytest.mark.parametrize("ends", ["all", "owner", "frozen"])
def test_plan_covers_middle_blocks_once_and_applies_ends_policy(ends):
    m = model(6)
    plan = plan_segments(m, SnakeConfig(ends=ends, block_cost="equal"), 3)
    mids = [b for ids in plan for b in ids if b not in (0, m.n_blocks - 1)]
    assert mids == m.middle_ids  # contiguous, in node order, each once
    assert [len([b for b in ids if 0 < b < m.n_blocks - 1]) for ids in plan] == [2, 2, 2]
    owners = block_owners(plan, m.n_blocks)
    stem, head = owners[0], owners[-1]
    assert {"all": (OWNER_ALL, OWNER_ALL), "owner": (0, 2), "frozen": (OWNER_NONE, OWNER_NONE)}[
        ends
    ] == (stem, head)


def test_capability_gives_stronger_node_more_blocks():
    m = model(6)
    plan = plan_segments(m, SnakeConfig(ends="frozen", block_cost="equal", capabilities=(1, 2)), 2)
    assert [len(p) for p in plan] == [2, 4]


def simulate(plan, n_blocks, rounds, transfer, final_sync=True):
    """Run the ring's version bookkeeping in one process, returning the blocks of every hop."""
    n = len(plan)
    versions = [np.zeros(n_blocks, dtype=np.int64) for _ in range(n)]
    hops = {}
    for r in range(rounds):
        for i in range(n):
            versions[i][plan[i]] = stamp(r, i, n)
            if r == rounds - 1 and i == n - 1:
                break
            k = (i + 1) % n
            ids = blocks_to_send(versions[i], last_stamp(k, i, r, n), transfer)
            # the receiver's copy must be exactly the blocks it did not get plus what it got
            for b in range(n_blocks):
                if b in ids:
                    assert versions[k][b] <= versions[i][b]
                    versions[k][b] = versions[i][b]
                else:
                    assert versions[k][b] == versions[i][b], (r, i, b)
            hops[(r, i)] = set(ids)
    sync = {}
    if final_sync:
        for k in range(n - 1):
            s = (k - 1) % n
            ids = blocks_to_send(versions[s], stamp(rounds - 1, k, n), transfer)
            for b in range(n_blocks):
                if b not in ids:
                    assert versions[k][b] == versions[s][b]
            versions[k][ids] = versions[s][ids]
            sync[s] = set(ids)
        assert all(np.array_equal(v, versions[-1]) for v in versions)
    return hops, sync


@pytest.mark.parametrize(
    ("n", "middle", "ends", "transfer", "rounds"),
    list(
        itertools.product([2, 3, 4, 5], [5], ["all", "owner", "frozen"], ["delta", "full"], [1, 3])
    ),
)
def test_stamp_rule_matches_analytic_hops_and_receivers_end_identical(
    n, middle, ends, transfer, rounds
):
    m = model(middle)
    plan = plan_segments(m, SnakeConfig(ends=ends, block_cost="params"), n)
    hops, sync = simulate(plan, m.n_blocks, rounds, transfer)
    for (r, i), ids in hops.items():
        assert ids == analytic.snake_p2p_hop_blocks(plan, m.n_blocks, i, r, transfer)
    sizes = [100 * (b + 1) for b in range(m.n_blocks)]
    sent = analytic.snake_p2p_bytes_sent(plan, sizes, rounds, transfer)
    assert sent[-1, -1] == 0 and (sent[:-1] > 0).all()
    recv = analytic.snake_p2p_bytes_received(plan, sizes, rounds, transfer)
    assert sent.sum() == recv.sum() and recv[0, 0] == 0
    sync_bytes = analytic.snake_final_sync_bytes_sent(plan, sizes, transfer)
    for s, ids in sync.items():
        assert sync_bytes[s] == 48 + 24 * len(ids) + sum(sizes[b] for b in ids)


def test_delta_sends_less_than_full_when_segments_are_disjoint():
    m = model(8)
    plan = plan_segments(m, SnakeConfig(ends="owner"), 4)
    sizes = [1000] * m.n_blocks
    delta = analytic.snake_p2p_bytes_sent(plan, sizes, 3, "delta").sum()
    full = analytic.snake_p2p_bytes_sent(plan, sizes, 3, "full").sum()
    assert delta < full
