"""``bench.lone_node``: node k of an N-node Snake ring run alone in one process. It runs the
ring node's own turn (the same plan, shard, hops and training: its byte counts and training
state equal the ring's rank k exactly, and equal the analytic counts), and its peak RSS
increase matches the real ring's rank within a stated bound."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bench import lone_node
from bench import memory_claim as mem
from conftest import REPO
from snake_mpi.analysis import analytic
from snake_mpi.config import load_config
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"
N = 3


MEMORY_BOUND = 0.10
"""The lone node's peak RSS increase is within 10 % of the ring rank's (plus ``SLACK``): on
the tiny model the increase is mostly the runtime's (torch's first step), a few 10 MiB."""
SLACK = 8 << 20


@pytest.mark.parametrize(
    "sets",
    [
        ['snake.keep="all"', 'snake.transfer="delta"'],
        ['snake.keep="own"', 'snake.transfer="delta"'],
        ['snake.keep="all"', 'snake.transfer="full"', 'snake.ends="all"'],
    ],
    ids=["all-delta", "own-delta", "all-full-ends"],
)
def test_lone_node_runs_the_ring_nodes_turn(tmp_path, sets):
    """Per round, each lone node sends and receives exactly the ring rank's bytes (= the
    analytic count), holds the same training state, trains its blocks (they change), and
    ends the final sync with the same bytes."""
    cfg = load_config(TINY, ["probes.enabled=false", "snake.final_sync=true", *sets])
    out = tmp_path / "ring.h5"
    ThreadWorld(N).run(lambda comm: execute(cfg, comm, out), deadline_s=60)
    ring = read_result(out)
    plan = ring_plan = None
    blocks = analytic.result_block_bytes(ring)
    for k in range(N):
        lone, ctx = lone_node.run_lone(cfg, k, N)
        plan = lone.plan
        ring_plan = ctx.report.plan
        assert plan == ring_plan
        rounds = ring.rounds
        np.testing.assert_array_equal(lone.bytes_sent, rounds["bytes_sent"][:, k])
        np.testing.assert_array_equal(lone.bytes_received, rounds["bytes_received"][:, k])
        assert lone.train_state_bytes == rounds["train_state_bytes"][:, k].max() > 0
        assert lone.trainable_params == rounds["trainable_params"][:, k].max()
        sync = ring.arrays["final_sync/bytes_sent"][k], ring.arrays["final_sync/bytes_received"][k]
        assert (lone.final_sync_bytes_sent, lone.final_sync_bytes_received) == sync
        assert lone.trained_blocks_changed
    keep, transfer = cfg.snake.keep, cfg.snake.transfer
    want = analytic.snake_p2p_bytes_sent(plan, blocks, cfg.train.rounds, transfer, keep=keep)
    np.testing.assert_array_equal(ring.rounds["bytes_sent"], want)


def test_first_node_of_one_round_ends_with_the_rings_model(tmp_path):
    """Node 0's first turn needs no hop: alone it trains the same model on the same shard with
    the same random stream as the ring's rank 0, so it ends bit-identical to it."""
    cfg = load_config(TINY, ["probes.enabled=false", "train.rounds=1", "snake.final_sync=false"])
    out = tmp_path / "ring.h5"
    ThreadWorld(N).run(lambda comm: execute(cfg, comm, out), deadline_s=60)
    lone, _ = lone_node.run_lone(cfg, 0, N)
    assert lone.model_sha256 == read_result(out).tables["ranks"]["model_sha256"][0]


def test_hop_into_is_what_the_sender_picks():
    """The fed hop's blocks are the analytic hop's, for every node, round and policy."""
    plan = [[0, 1], [2], [3, 4]]
    for keep in ("all", "own"):
        for transfer in ("delta", "full"):
            for r in range(3):
                for s in range(3):
                    node = (s + 1) % 3
                    if node == 0 and r == 2:
                        continue  # the run's last hop is not sent
                    got, _ = lone_node.hop_into(
                        plan, 5, node, 1, r, s, rounds=3, transfer=transfer, keep=keep
                    )
                    want = analytic.snake_p2p_hop_blocks(plan, 5, s, r, transfer, keep=keep)
                    assert set(got) == want, (keep, transfer, r, s)


def test_refuses_what_it_cannot_stand_in_for():
    with pytest.raises(ValueError, match="p2p"):
        lone_node.check_lone(load_config(TINY, ['snake.mode="cs"']), 0, N)
    with pytest.raises(ValueError, match="not in a ring"):
        lone_node.check_lone(load_config(TINY), 3, N)


def test_lone_peak_matches_the_mpi_ring(tmp_path):
    """``memory_claim --lone-node all --nodes 2 --ring``: a real 2-rank ring under mpirun and
    each of its nodes alone; every lone node's peak RSS increase within ``MEMORY_BOUND`` (+
    ``SLACK``) of the ring rank's, its training state equal."""
    argv = ["--out", str(tmp_path), "--lone-node", "all", "--nodes", "2", "--ring", str(TINY)]
    assert mem.main([*argv, "--table", str(tmp_path / "lone.md")]) == 0
    table = (tmp_path / "lone.md").read_text()
    assert table.startswith("| nodes | k | ring increase MiB | lone increase MiB | ratio")
    ring_inc, ring_state = mem.ring_figures(tmp_path / "ring-tiny-n2.h5")
    for k in range(2):
        lone = json.loads((tmp_path / f"lone-tiny-n2-k{k}.json").read_text())
        assert lone["train_state_bytes"] == ring_state[k]
        assert lone["trained_blocks_changed"]
        assert abs(lone["increase_bytes"] - ring_inc[k]) <= MEMORY_BOUND * ring_inc[k] + SLACK


def test_the_lean_table_measures_each_option_against_the_plain_node(tmp_path):
    from bench import lean_node

    table = tmp_path / "lean.md"
    code = lean_node.main(
        [str(TINY), "--nodes", "2", "--out", str(tmp_path / "lean"), "--options", "fused,mmap"]
        + ["--set", "train.local_steps=2", "--set", "train.rounds=1", "--table", str(table)]
    )
    assert code == 0
    text = table.read_text()
    rows = {line.split(" | ")[0].lstrip("| "): line for line in text.splitlines() if "|" in line}
    assert set(rows) >= {"plain node", lean_node.DESCRIBE["fused"], lean_node.DESCRIBE["mmap"]}
    # neither option changes the training: the weights are the plain node's, bit for bit, and
    # the perplexity is the same number
    for name in ("fused", "mmap"):
        assert "plain's, to the bit" in rows[lean_node.DESCRIBE[name]]
        assert "| +0.000 % |" in rows[lean_node.DESCRIBE[name]]
    got = json.loads((tmp_path / "lean" / "tiny-n2-k0-fused.json").read_text())
    plain = json.loads((tmp_path / "lean" / "tiny-n2-k0-plain.json").read_text())
    assert got["steps"] == plain["steps"] == [2]
    # the fused turn ends holding no gradient: its training state is smaller by exactly them
    params = plain["trainable_params"]
    assert plain["train_state_bytes"] - got["train_state_bytes"] == 4 * params
