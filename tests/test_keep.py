"""``snake.keep``: a Snake node keeps the whole model between turns (``all``) or only the blocks
it trains (``own``). Both sides of the trade-off are measured and must equal the analytic
counts exactly: the bytes at rest per rank per round fall, the hop bytes rise; the training
math (losses, the final model) is the same."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO, mpi_run, run_variants
from snake_mpi.analysis import analytic
from snake_mpi.analysis.expected import (
    expected_at_rest_bytes,
    expected_bytes,
    expected_end_held_bytes,
    expected_final_sync_bytes,
)
from snake_mpi.blocks import (
    block_nbytes,
    flatten,
    model_bytes_held,
    model_hash,
    release_blocks,
    released_blocks,
    unflatten,
)
from snake_mpi.config import ConfigError, ModelConfig, load_config
from snake_mpi.models import build_model
from snake_mpi.models.lm import preload
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"


def run_threads(n, tmp_path, *sets, name):
    cfg = load_config(TINY, ["probes.enabled=false", *sets])
    out = tmp_path / name
    ThreadWorld(n).run(lambda comm: execute(cfg, comm, out), deadline_s=60)
    return read_result(out)


def check_against_analytic(res) -> None:
    """Every byte figure of a Snake run equals its analytic count."""
    sent, received = expected_bytes(res)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
    np.testing.assert_array_equal(res.rounds["bytes_received"], received)
    np.testing.assert_array_equal(res.rounds["model_at_rest_bytes"], expected_at_rest_bytes(res))
    np.testing.assert_array_equal(
        res.tables["ranks"]["model_end_held_bytes"], expected_end_held_bytes(res)
    )
    if "final_sync/bytes_sent" in res.arrays:
        np.testing.assert_array_equal(
            res.arrays["final_sync/bytes_sent"], expected_final_sync_bytes(res)
        )


@pytest.mark.parametrize(
    ("mode", "n", "transfer", "ends"),
    [
        ("p2p", 3, "delta", "owner"),
        ("p2p", 4, "delta", "all"),
        ("p2p", 3, "delta", "frozen"),
        ("p2p", 3, "full", "owner"),
        ("cs", 4, "delta", "owner"),
        ("cs", 3, "delta", "all"),
        ("cs", 4, "full", "frozen"),
    ],
)
def test_keep_own_trades_storage_for_bytes_with_the_same_model(tmp_path, mode, n, transfer, ends):
    sets = [f'snake.mode="{mode}"', f"snake.transfer={transfer}", f"snake.ends={ends}"]
    a = run_threads(n, tmp_path, *sets, 'snake.keep="all"', name="all.h5")
    o = run_threads(n, tmp_path, *sets, 'snake.keep="own"', name="own.h5")
    assert (a.attrs["keep"], o.attrs["keep"]) == ("all", "own")
    for res in (a, o):
        check_against_analytic(res)
    # the training math is the same: losses, evaluations and the final model, bit for bit
    np.testing.assert_array_equal(a.rounds["loss"], o.rounds["loss"])
    np.testing.assert_array_equal(a.evaluation["accuracy"], o.evaluation["accuracy"])
    hashes = list(a.tables["ranks"]["model_sha256"])
    assert list(o.tables["ranks"]["model_sha256"]) == hashes and len(set(hashes)) == 1
    # the trade-off: less at rest on every training node, at least as many bytes on the wire
    nodes = slice(1, None) if mode == "cs" else slice(0, n - 1)  # the P2P last node keeps it all
    total = int(a.tables["blocks"]["bytes"].sum())
    assert (a.rounds["model_at_rest_bytes"] == total).all()
    assert (o.rounds["model_at_rest_bytes"][:, nodes] < total).all()
    sent_a, sent_o = a.rounds["bytes_sent"], o.rounds["bytes_sent"]
    if transfer == "delta" and ends == "frozen":  # blocks nobody trains now travel too
        assert (sent_o[1:].sum(axis=1) > sent_a[1:].sum(axis=1)).all()
        first = slice(0, n - 1) if mode == "p2p" else slice(None)  # hops to first visits
        np.testing.assert_array_equal(sent_o[0, first], sent_a[0, first])
    else:  # a hop to a node carried every block it does not train anyway ("full": all)
        np.testing.assert_array_equal(sent_o, sent_a)
    sync_a, sync_o = a.arrays["final_sync/bytes_sent"], o.arrays["final_sync/bytes_sent"]
    if (transfer, mode) == ("full", "p2p"):  # every sync hop carries the whole model anyway
        assert sync_o.sum() == sync_a.sum()
    else:  # the blocks the receivers freed (CS: the last node is sent them too)
        assert sync_o.sum() > sync_a.sum()
    # the final sync gives every rank the whole final model under either policy
    assert (o.tables["ranks"]["model_end_held_bytes"] == total).all()


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_without_final_sync_keep_own_leaves_the_segments_and_one_whole_model(tmp_path, mode):
    sets = [f'snake.mode="{mode}"', "snake.final_sync=false"]
    a = run_threads(3, tmp_path, *sets, 'snake.keep="all"', name="all.h5")
    o = run_threads(3, tmp_path, *sets, 'snake.keep="own"', name="own.h5")
    for res in (a, o):
        check_against_analytic(res)
    holder = 0 if mode == "cs" else 2  # the controller, or the P2P last node
    ha, ho = a.tables["ranks"]["model_sha256"], o.tables["ranks"]["model_sha256"]
    assert ho[holder] == ha[holder]  # the final model, bit for bit
    held = o.tables["ranks"]["model_end_held_bytes"]
    np.testing.assert_array_equal(held, o.rounds["model_at_rest_bytes"][-1])
    assert held[holder] == int(o.tables["blocks"]["bytes"].sum()) > max(np.delete(held, holder))


@pytest.mark.parametrize("ends", ["owner", "frozen"])
def test_keep_own_frees_a_tied_matrix_with_the_stem_and_trains_the_same(tmp_path, ends):
    """A language model whose embedding and LM head share one matrix (it belongs to the stem):
    a node that frees the stem frees the matrix, and gets it back before the head runs."""
    sets = [
        f"snake.ends={ends}",
        "data.n_train=96",
        "data.n_test=16",
        "train.rounds=2",
        "train.local_steps=1",
        "train.batch_size=8",
    ]
    lm = REPO / "bench" / "configs" / "llm" / "tiny-snake.toml"
    preload()  # transformers' lazy imports, once, before the rank threads race for them
    runs = run_variants(lm, 3, tmp_path, {k: [f'snake.keep="{k}"'] for k in ("all", "own")}, *sets)
    for res in runs.values():
        check_against_analytic(res)
    a, o = runs["all"], runs["own"]
    np.testing.assert_array_equal(a.rounds["loss"], o.rounds["loss"])
    assert list(a.tables["ranks"]["model_sha256"]) == list(o.tables["ranks"]["model_sha256"])
    assert (o.rounds["model_at_rest_bytes"][:, :2] < a.rounds["model_at_rest_bytes"][:, :2]).all()


def test_p2p_own_hop_carries_every_block_the_receiver_does_not_train():
    plan = [[0, 1, 2], [3], [4, 5]]  # ends = "owner": node 0 the stem, node 2 the head
    for r in (1, 2):
        for sender in range(3):
            recv = (sender + 1) % 3
            got = analytic.snake_p2p_hop_blocks(plan, 6, sender, r, "delta", keep="own")
            assert got == set(range(6)) - set(plan[recv])
    # round 0: every receiver still holds the initial model, so "own" sends what "all" sends
    for sender in range(2):
        assert analytic.snake_p2p_hop_blocks(
            plan, 6, sender, 0, "delta", keep="own"
        ) == analytic.snake_p2p_hop_blocks(plan, 6, sender, 0, "delta")
    sizes = [1, 10, 100, 1000, 10000, 100000]
    rest = analytic.snake_at_rest_bytes(plan, sizes, 2, mode="p2p", keep="own")
    np.testing.assert_array_equal(rest, [[111, 1000, 110000], [111, 1000, 111111]])
    cs = analytic.snake_at_rest_bytes(plan, sizes, 2, mode="cs", keep="own")
    np.testing.assert_array_equal(cs[:, 0], [111111, 111111])


def test_released_blocks_keep_their_size_and_come_back_bit_exact():
    model = build_model(
        ModelConfig(family="cnn", width=8, middle_blocks=2),
        sample_shape=(3, 8, 8),
        n_classes=3,
        seed=0,
    )
    model.blocks[1].register_buffer("from_numpy", torch.from_numpy(np.arange(4.0)))  # fixed
    before, total = model_hash(model), model_bytes_held(model)
    ids = [1, 2]
    payload, sizes = flatten(model, ids)
    release_blocks(model, ids)
    assert released_blocks(model) == ids
    assert [block_nbytes(model, b) for b in ids] == list(sizes)  # the size as it travels
    assert model_bytes_held(model) == total - int(sizes.sum())
    unflatten(model, ids, payload, sizes)
    assert released_blocks(model) == [] and model_bytes_held(model) == total
    assert model_hash(model) == before


def test_an_unknown_keep_is_a_config_error():
    with pytest.raises(ConfigError, match=r"unknown snake.keep 'some'; choose one of: all, own"):
        load_config(TINY, ['snake.keep="some"'])


KEEP_OWN = mpi_run(4, TINY, "probes.enabled=false", 'snake.keep="own"', 'snake.mode="p2p"')


@pytest.mark.mpi
def test_mpi_run_with_keep_own_counts_the_analytic_bytes(mpi_runs):
    res = mpi_runs(KEEP_OWN).result
    check_against_analytic(res)
    total = int(res.tables["blocks"]["bytes"].sum())
    assert (res.rounds["model_at_rest_bytes"][:, :3] < total).all()
    assert len(set(res.tables["ranks"]["model_sha256"])) == 1  # the final sync: all hold it
