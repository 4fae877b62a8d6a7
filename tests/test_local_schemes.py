"""The baselines and Snake's client-server mode with ranks as threads (no mpirun): exact byte
counts against the analytic model, and aggregation checked against centralised training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import REPO
from snake_mpi import run as run_module
from snake_mpi.analysis import analytic
from snake_mpi.blocks import block_nbytes, model_hash
from snake_mpi.config import load_config
from snake_mpi.models import build_model
from snake_mpi.run import execute, seeds_for
from snake_mpi.schemes.fedavg import sampled_clients
from snake_mpi.schemes.splitnet import activation_bytes_per_sample, cut_shape
from snake_mpi.store import read_result
from snake_mpi.train import train_local, turn_batch_sizes
from snake_mpi.transport.localcomm import ThreadWorld

SMALL = REPO / "tests" / "configs" / "small.toml"


def run_threads(n, tmp_path, *sets, name="t.h5"):
    cfg = load_config(SMALL, ["probes.enabled=false", "train.rounds=3", *sets])
    out = tmp_path / name
    ctxs = ThreadWorld(n).run(lambda comm: execute(cfg, comm, out), deadline_s=60)
    return cfg, ctxs, read_result(out)


def block_sizes(ctx):
    return [block_nbytes(ctx.model, b) for b in range(ctx.model.n_blocks)]


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("transfer", ["delta", "full"])
@pytest.mark.parametrize("ends", ["owner", "all"])
def test_snake_cs_bytes_equal_the_analytic_count_and_all_ranks_end_in_sync(
    tmp_path, n, transfer, ends
):
    sets = ['snake.mode="cs"', f"snake.transfer={transfer}", f"snake.ends={ends}"]
    cfg, ctxs, res = run_threads(n, tmp_path, *sets)
    plan, sizes = ctxs[0].report.plan, block_sizes(ctxs[0])
    assert len(plan) == n - 1  # the controller trains nothing
    rounds = cfg.train.rounds
    np.testing.assert_array_equal(
        res.rounds["bytes_sent"], analytic.snake_cs_bytes_sent(plan, sizes, rounds, transfer)
    )
    np.testing.assert_array_equal(
        res.rounds["bytes_received"],
        analytic.snake_cs_bytes_received(plan, sizes, rounds, transfer),
    )
    np.testing.assert_array_equal(
        res.arrays["final_sync/bytes_sent"],
        analytic.snake_cs_final_sync_bytes_sent(plan, sizes, transfer),
    )
    assert len({model_hash(c.model) for c in ctxs}) == 1
    assert (res.rounds["samples"][:, 0] == 0).all() and (res.rounds["samples"][:, 1:] > 0).all()
    assert res.tables["ranks"]["data_samples"][0] == 0
    assert set(res.tables["blocks"]["owner"]) <= {-1, -2, *range(1, n)}


@pytest.mark.parametrize(("n", "per_round"), [(3, 0), (4, 0), (4, 2)])
def test_fedavg_bytes_equal_the_analytic_count(tmp_path, n, per_round):
    cfg, ctxs, res = run_threads(
        n, tmp_path, 'scheme="fedavg"', f"fedavg.clients_per_round={per_round}", "train.rounds=6"
    )
    seeds, _ = seeds_for(cfg.seed, n)
    schedule = sampled_clients(seeds["sampling"], n - 1, per_round, cfg.train.rounds)
    expected = analytic.fedavg_bytes_sent(block_sizes(ctxs[0]), schedule, n)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], expected)
    np.testing.assert_array_equal(res.rounds["bytes_received"], expected)
    if per_round == 0:  # the paper's formula: 2 N P b per round, plus headers
        model_bytes = sum(block_sizes(ctxs[0]))
        per = analytic.fedavg_bytes_per_round(n - 1, model_bytes, ctxs[0].model.n_blocks)
        assert (res.rounds["bytes_sent"].sum(axis=1) == per).all()
    else:
        assert all(len(c) == per_round for c in schedule) and len({tuple(c) for c in schedule}) > 1
        idle = np.array([[k not in c for k in range(n)] for c in schedule])
        assert (res.rounds["samples"][idle] == 0).all()


def test_fedavg_sampling_is_seeded_and_without_replacement():
    a = sampled_clients(7, 10, 3, 50)
    assert a == sampled_clients(7, 10, 3, 50) and a != sampled_clients(8, 10, 3, 50)
    assert all(len(set(c)) == 3 and set(c) <= set(range(1, 11)) for c in a)
    assert sampled_clients(7, 10, 0, 2) == [list(range(1, 11))] * 2


def one_step_config(*sets):
    return load_config(
        SMALL,
        [
            "probes.enabled=false",
            "train.rounds=1",
            "train.local_steps=1",
            'train.optimizer="sgd"',
            "train.lr=0.1",
            "train.momentum=0.9",
            *sets,
        ],
    )


def centralised_step(cfg, x, y):
    seeds, _ = seeds_for(cfg.seed, 1)
    model = build_model(
        cfg.model,
        sample_shape=cfg.data.sample_shape,
        n_classes=cfg.data.n_classes,
        seed=seeds["model"],
    )
    step_cfg = load_config(
        SMALL,
        [
            f"train.batch_size={len(x)}",
            "train.local_steps=1",
            'train.optimizer="sgd"',
            "train.lr=0.1",
            "train.momentum=0.9",
        ],
    )
    train_local(
        model,
        range(model.n_blocks),
        x,
        y,
        cfg=step_cfg.train,
        generator=torch.Generator().manual_seed(0),
    )
    return model


def assert_models_close(a, b):
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(ta, tb, rtol=1e-5, atol=1e-6, msg=name)


def test_fedavg_with_identical_client_data_equals_a_centralised_step_on_the_union(
    tmp_path, monkeypatch
):
    shard = 256
    real = run_module.build_shards

    def identical_shards(cfg, seeds, world_size, dataset=None):
        dataset, _parts = real(cfg, seeds, world_size, dataset)
        same = np.arange(shard, dtype=np.int64)
        return dataset, [np.zeros(0, np.int64)] + [same] * (world_size - 1)

    monkeypatch.setattr(run_module, "build_shards", identical_shards)
    cfg = one_step_config('scheme="fedavg"', f"train.batch_size={shard}")
    ctxs = ThreadWorld(4).run(lambda c: execute(cfg, c, tmp_path / "f.h5"), deadline_s=60)
    x, y = ctxs[1].data.x_train, ctxs[1].data.y_train
    union = centralised_step(cfg, torch.cat([x] * 3), torch.cat([y] * 3))
    assert_models_close(ctxs[0].model, union)
    untrained = build_model(
        cfg.model,
        sample_shape=cfg.data.sample_shape,
        n_classes=cfg.data.n_classes,
        seed=seeds_for(cfg.seed, 4)[0]["model"],
    )
    assert model_hash(untrained) != model_hash(ctxs[0].model)  # the step did change the model


def test_fedavg_weighted_average_of_one_step_equals_a_full_batch_step_on_all_data(tmp_path):
    """Shards of different sizes: the weighted average of full-shard gradient steps is the
    full-batch step on the union; an unweighted average would differ."""
    cfg = one_step_config(
        'scheme="fedavg"', 'data.partition="dirichlet"', "data.alpha=0.5", "train.batch_size=2048"
    )
    ctxs = ThreadWorld(4).run(lambda c: execute(cfg, c, tmp_path / "f.h5"), deadline_s=60)
    sizes = ctxs[0].shard_sizes
    assert max(sizes[1:]) > 1.5 * min(sizes[1:]), sizes  # label skew: unequal shards
    xs = torch.cat([c.data.x_train for c in ctxs[1:]])
    ys = torch.cat([c.data.y_train for c in ctxs[1:]])
    assert_models_close(ctxs[0].model, centralised_step(cfg, xs, ys))


def test_centralised_trains_all_blocks_on_all_data_without_messages(tmp_path):
    cfg, ctxs, res = run_threads(1, tmp_path, 'scheme="centralised"')
    assert (res.rounds["bytes_sent"] == 0).all() and (res.rounds["messages_sent"] == 0).all()
    assert (res.rounds["samples"][:, 0] == cfg.data.n_train).all()
    assert res.evaluation["accuracy"][-1] >= 0.6, res.evaluation["accuracy"]
    params = sum(p.numel() for p in ctxs[0].model.parameters())
    assert (res.rounds["trainable_params"][:, 0] == params).all()


@pytest.mark.parametrize("n", [3, 4])
@pytest.mark.parametrize("scheme", ["split", "splitfed"])
def test_split_schemes_bytes_equal_the_analytic_count(tmp_path, n, scheme):
    cfg, ctxs, res = run_threads(n, tmp_path, f'scheme="{scheme}"', "split.cut=2")
    server = ctxs[0].model
    client_bytes = [block_nbytes(server, b) for b in range(cfg.split.cut)]
    shape = cut_shape(server, cfg.split.cut, cfg.data.sample_shape)
    act = activation_bytes_per_sample(shape)
    batches = [turn_batch_sizes(s, cfg.train) for s in ctxs[0].shard_sizes]
    model = analytic.split_bytes if scheme == "split" else analytic.splitfed_bytes
    sent, received = model(client_bytes, batches, act, cfg.train.rounds)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
    np.testing.assert_array_equal(res.rounds["bytes_received"], received)
    # clients hold only their part: the server's blocks were freed there
    assert (res.rounds["model_at_rest_bytes"][:, 1:] == sum(client_bytes)).all()
    assert res.evaluation["accuracy"][-1] >= 0.6


def test_split_learning_with_one_client_equals_centralised_training_on_its_data(tmp_path):
    sets = ['scheme="split"', "split.cut=2", 'train.optimizer="sgd"', "train.lr=0.05"]
    cfg, ctxs, _res = run_threads(2, tmp_path, *sets, "train.rounds=2")
    client = ctxs[1]
    _seeds, rank_seeds = seeds_for(cfg.seed, 2)
    reference = build_model(
        cfg.model,
        sample_shape=cfg.data.sample_shape,
        n_classes=cfg.data.n_classes,
        seed=seeds_for(cfg.seed, 2)[0]["model"],
    )
    generator = torch.Generator().manual_seed(rank_seeds[1])  # the client's batch order
    for _ in range(cfg.train.rounds):
        train_local(
            reference,
            range(reference.n_blocks),
            client.data.x_train,
            client.data.y_train,
            cfg=cfg.train,
            generator=generator,
        )
    assert_models_close(ctxs[0].model, reference)


def test_splitfed_v1_computes_what_fedavg_computes(tmp_path):
    """SplitFed v1 is FedAvg with the model cut in two: same data, same batches, same math."""
    _cfg, split_ctxs, _ = run_threads(4, tmp_path, 'scheme="splitfed"', name="sf.h5")
    _cfg, fed_ctxs, _ = run_threads(4, tmp_path, 'scheme="fedavg"', name="fa.h5")
    assert_models_close(split_ctxs[0].model, fed_ctxs[0].model)


def test_training_state_matches_the_analytic_accounting(tmp_path):
    """Adam in fp32: a FedAvg client holds 16 bytes per parameter (weights, gradients, two
    moments), a Snake node 4 per parameter held + 12 per trainable one, + 4 per trainable one
    for the distillation teacher's copy and 4 for FedProx's anchors (both on by default);
    torch's Adam adds one 4-byte step counter per trainable tensor, which the analytic formulas
    leave out."""
    _cfg, fed, fed_res = run_threads(4, tmp_path, 'scheme="fedavg"', name="fa.h5")
    model = fed[0].model
    total = sum(p.numel() for p in model.parameters())
    tensors = len(list(model.parameters()))
    expected = analytic.train_state_bytes_full(total, 4, "adam") + 4 * tensors
    assert (fed_res.rounds["train_state_bytes"][:, 1:] == expected).all()
    for kd, mu in ((0, 0), (1, 0.01)):  # (1, 0.01): the defaults, two copies
        sets = [f"snake.kd.weight={kd}", f"snake.prox_mu={mu}"]
        _cfg, snake, snake_res = run_threads(4, tmp_path, 'scheme="snake"', *sets, name=f"{kd}.h5")
        for k, ids in enumerate(snake[0].report.plan):
            params = [p for b in ids for p in snake[0].model.blocks[b].parameters()]
            trainable = sum(p.numel() for p in params)
            copies = kd + (mu > 0)
            held = analytic.train_state_bytes_snake(total, trainable, 4, "adam", copies=copies)
            expected = held + 4 * len(params)
            assert (snake_res.rounds["train_state_bytes"][:, k] == expected).all(), (kd, k)
