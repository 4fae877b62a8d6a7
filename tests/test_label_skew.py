"""Label-skew remedies (issue 14): their math, their config, and that none adds traffic."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import REPO
from snake_mpi.analysis import analytic
from snake_mpi.blocks import block_nbytes, block_tensors
from snake_mpi.config import ConfigError, TrainConfig, load_config
from snake_mpi.models import build_model
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.train import (
    TurnOptions,
    adjusted_task_loss,
    label_log_prior,
    make_optimizer,
    prox_term,
    round_lr,
    train_local,
)
from snake_mpi.transport.localcomm import ThreadWorld

TINY = REPO / "tests" / "configs" / "tiny.toml"


def test_label_log_prior_is_the_log_of_the_label_frequencies_with_a_floor():
    y = torch.tensor([0, 0, 0, 1, 2, 2, 2, 2])
    got = label_log_prior(y, 4, floor=1e-6)
    want = torch.log(torch.tensor([3 / 8, 1 / 8, 4 / 8, 1e-6]))
    torch.testing.assert_close(got, want)


def test_adjusted_loss_is_cross_entropy_of_log_prior_shifted_logits():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(16, 5, generator=g)
    y = torch.randint(0, 5, (16,), generator=g)
    shift = 0.7 * label_log_prior(torch.tensor([0, 0, 1, 2, 2, 2, 3, 4, 4]), 5)
    got = adjusted_task_loss(logits, y, shift)
    # by hand: -log softmax(z + tau log p)[y], mean over the batch
    z = logits + shift
    want = -(z.gather(1, y[:, None]).squeeze(1) - torch.logsumexp(z, dim=1)).mean()
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, F.cross_entropy(logits, y))  # the shift matters here
    assert adjusted_task_loss(logits, y, None).item() == F.cross_entropy(logits, y).item()


def test_a_uniform_prior_leaves_the_loss_unchanged():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(32, 10, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    shift = label_log_prior(torch.arange(10).repeat(3), 10)  # every class equally often
    torch.testing.assert_close(adjusted_task_loss(logits, y, shift), F.cross_entropy(logits, y))


def test_a_class_the_node_never_sees_gets_no_push_down_from_its_loss():
    logits = torch.zeros(8, 3, requires_grad=True)
    y = torch.tensor([0, 1] * 4)
    shift = label_log_prior(y, 3)  # class 2 absent: prior floored at 1e-6
    adjusted_task_loss(logits, y, shift).backward()
    assert logits.grad is not None
    assert abs(float(logits.grad[:, 2].abs().max())) < 1e-5
    plain = torch.zeros(8, 3, requires_grad=True)
    F.cross_entropy(plain, y).backward()
    assert plain.grad is not None and float(plain.grad[:, 2].min()) > 0.04  # plain CE pushes it


def test_prox_term_and_its_gradient():
    p = torch.tensor([1.0, 2.0, 3.0], requires_grad=True)
    a = torch.tensor([1.0, 0.0, 1.0])
    term = prox_term([p], [a])
    assert term.item() == pytest.approx(0 + 4 + 4)
    (0.5 * 0.3 * term).backward()  # mu/2 * ||p - a||^2 with mu = 0.3
    torch.testing.assert_close(p.grad, 0.3 * (p.detach() - a))


def _tiny_model(seed=0):
    cfg = load_config(TINY)
    return cfg, build_model(cfg.model, sample_shape=(3, 8, 8), n_classes=4, seed=seed)


def _state(model):
    return [t.detach().clone() for b in range(model.n_blocks) for t in block_tensors(model, b)]


def _train(options, seed=0):
    cfg, model = _tiny_model(seed)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 3, 8, 8, generator=g)
    y = torch.randint(0, 4, (40,), generator=g)
    tc = TrainConfig(rounds=1, local_epochs=2, batch_size=8, lr=0.05, optimizer="sgd")
    train_local(
        model, [1, 2], x, y, cfg=tc, generator=torch.Generator().manual_seed(5), options=options
    )
    return _state(model)


def test_mu_zero_and_no_shift_leave_the_training_bit_identical():
    plain = _train(TurnOptions())
    zeroed = _train(TurnOptions(prox_mu=0.0, logit_shift=None, lr=None))
    for a, b in zip(plain, zeroed, strict=True):
        assert torch.equal(a, b)


def test_a_proximal_term_keeps_the_blocks_nearer_the_received_model():
    _, start = _tiny_model()
    start_state = _state(start)
    plain = _train(TurnOptions())
    prox = _train(TurnOptions(prox_mu=10.0))

    def dist(state):
        return sum(float((s - t).pow(2).sum()) for s, t in zip(state, start_state, strict=True))

    assert 0 < dist(prox) < 0.5 * dist(plain)


def test_the_turn_learning_rate_reaches_the_optimiser():
    p = [torch.nn.Parameter(torch.zeros(2))]
    tc = TrainConfig(lr=0.05, optimizer="adam")
    assert make_optimizer(p, tc).param_groups[0]["lr"] == 0.05
    assert make_optimizer(p, tc, 0.01).param_groups[0]["lr"] == 0.01


def test_cosine_schedule_over_rounds():
    tc = TrainConfig(rounds=4, lr=0.1, lr_schedule="cosine")
    got = [round_lr(tc, r) for r in range(4)]
    want = [0.1 * (1 + math.cos(math.pi * r / 4)) / 2 for r in range(4)]
    assert got == pytest.approx(want)
    assert got[0] == pytest.approx(0.1) and got[2] == pytest.approx(0.05)
    assert round_lr(TrainConfig(rounds=4, lr=0.1), 3) == 0.1


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("snake.logit_adjust", "-1", "snake.logit_adjust must be a finite number >= 0"),
        ("snake.prox_mu", "nan", "snake.prox_mu must be a finite number >= 0"),
        ("fedavg.prox_mu", "-0.5", "fedavg.prox_mu must be a finite number >= 0"),
        ("fedavg.logit_adjust", "inf", "fedavg.logit_adjust must be a finite number >= 0"),
        ("train.lr_schedule", '"step"', "train.lr_schedule"),
    ],
)
def test_bad_remedy_settings_are_refused(key, value, message):
    with pytest.raises(ConfigError, match=message):
        load_config(TINY, [f"{key}={value}"])


def _threads(n, tmp_path, *sets):
    cfg = load_config(TINY, ["probes.enabled=false", "checkpoint.every=0", *sets])
    out = tmp_path / "run.h5"
    ctxs = ThreadWorld(n).run(lambda comm: execute(cfg, comm, out), deadline_s=120)
    return cfg, ctxs, read_result(out)


@pytest.mark.parametrize("mode", ["p2p", "cs"])
def test_snake_remedies_add_no_traffic(tmp_path, mode):
    sets = (
        f'snake.mode="{mode}"',
        'data.partition="dirichlet"',
        "snake.logit_adjust=1.0",
        "snake.prox_mu=0.1",
        'train.lr_schedule="cosine"',
    )
    cfg, ctxs, res = _threads(3, tmp_path, *sets)
    model, plan = ctxs[0].model, ctxs[0].info["plan"]
    sizes = [block_nbytes(model, b) for b in range(model.n_blocks)]
    if mode == "p2p":
        want = analytic.snake_p2p_bytes_sent(plan, sizes, cfg.train.rounds, "delta")
    else:
        want = analytic.snake_cs_bytes_sent(plan, sizes, cfg.train.rounds, "delta")
    np.testing.assert_array_equal(res.rounds["bytes_sent"], want)
    recorded = tomllib.loads(res.config_toml)["snake"]
    assert (recorded["logit_adjust"], recorded["prox_mu"]) == (1.0, 0.1)


def test_fedavg_remedies_add_no_traffic(tmp_path):
    sets = ('scheme="fedavg"', "fedavg.logit_adjust=1.0", "fedavg.prox_mu=0.1")
    cfg, ctxs, res = _threads(3, tmp_path, *sets)
    sizes = [block_nbytes(ctxs[0].model, b) for b in range(ctxs[0].model.n_blocks)]
    want = analytic.fedavg_bytes_sent(sizes, [[1, 2]] * cfg.train.rounds, 3)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], want)
    recorded = tomllib.loads(res.config_toml)["fedavg"]
    assert (recorded["logit_adjust"], recorded["prox_mu"]) == (1.0, 0.1)


def test_default_snake_cs_beats_the_old_default_under_label_skew(tmp_path):
    """The MPI test's claim for Snake CS (controller + 4 nodes), in threads."""
    skew = REPO / "tests" / "configs" / "skew.toml"
    final = {}
    old = ["snake.logit_adjust=0", 'snake.ends="owner"', "snake.kd.weight=0", "snake.prox_mu=0"]
    for name, sets in {"default": [], "old": old}.items():
        cfg = load_config(skew, ["probes.enabled=false", 'snake.mode="cs"', *sets])
        out = tmp_path / f"{name}.h5"
        ThreadWorld(5).run(lambda comm, cfg=cfg, out=out: execute(cfg, comm, out), deadline_s=120)
        final[name] = float(read_result(out).evaluation["accuracy"][-1])
    assert final["old"] < 0.3 and final["default"] >= final["old"] + 0.3, final


def test_the_explorer_reproduces_the_snake_run_bit_for_bit(tmp_path, capsys):
    """bench/label_skew_explore.py runs the turns in one process: the same accuracies."""
    from bench import label_skew_explore as explore

    skew = REPO / "tests" / "configs" / "skew.toml"
    assert explore.main([str(skew), "--set", "train.rounds=3", "--nodes", "4"]) == 0
    printed = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("round ")]
    got = [float(ln.split("accuracy ")[1].split()[0].rstrip(",")) for ln in printed]
    cfg = load_config(skew, ["probes.enabled=false", "train.rounds=3"])
    out = tmp_path / "run.h5"
    ThreadWorld(4).run(lambda comm: execute(cfg, comm, out), deadline_s=120)
    want = [round(float(a), 4) for a in read_result(out).evaluation["accuracy"]]
    assert got == want and len(got) == 3


def test_suite_entries_with_labels_and_overrides(tmp_path):
    from snake_mpi.suite import load_suite

    suite = tmp_path / "s.toml"
    suite.write_text(
        f'configs = ["{TINY}@2", {{ config = "{TINY}@3", label = "tiny-la0", '
        'set = ["snake.logit_adjust=0"] }]\nseeds = [0, 1]\nset = ["train.rounds=2"]\n'
    )
    cells, _ = load_suite(str(suite))
    assert [c.name for c in cells] == [
        "tiny-n2-s0",
        "tiny-n2-s1",
        "tiny-la0-n3-s0",
        "tiny-la0-n3-s1",
    ]
    assert cells[0].overrides == ("train.rounds=2",)
    assert cells[2].overrides == ("train.rounds=2", "snake.logit_adjust=0")  # after `set`
    suite.write_text(
        f'configs = [{{ config = "{TINY}", label = "a" }}, {{ config = "{TINY}", label = "a" }}]\n'
    )
    with pytest.raises(ConfigError, match="two cells would be named 'a-n4-s0'"):
        load_suite(str(suite))
    suite.write_text(f'configs = [{{ config = "{TINY}", sets = [] }}]\n')
    with pytest.raises(ConfigError, match="unknown key 'sets'"):
        load_suite(str(suite))
    suite.write_text(
        f'configs = [{{ config = "{TINY}", label = "x", set = ["snake.prox_mu=-1"] }}]\n'
    )
    with pytest.raises(ConfigError, match="x: snake.prox_mu must be"):
        load_suite(str(suite))


def test_the_label_skew_suite_has_every_variant_named_once():
    from snake_mpi.suite import load_suite

    cells, _ = load_suite("label-skew")
    names = [c.name for c in cells]
    assert len(names) == len(set(names)) == 144
    assert "vgg-p2p-old-a0.1-n4-s2" in names and "demo-fedavg-la-a0.5-n5-s0" in names
    assert "demo-p2p-prox0-nokd-iid-n4-s1" in names and "vgg-cs-prox0-a0.5-n5-s2" in names


def test_a_language_model_keeps_the_head_at_its_owner_unless_set():
    lm = REPO / "tests" / "configs" / "lm-tiny.toml"
    assert load_config(lm).snake.ends == "owner"
    assert load_config(lm, ['snake.ends="all"']).snake.ends == "all"
    assert load_config(TINY, ['model.family="mlp"']).snake.ends == "owner"  # tiny.toml sets it
    assert load_config(REPO / "tests" / "configs" / "skew.toml").snake.ends == "all"


def test_a_language_model_keeps_distillation_and_prox_off_unless_set():
    """Classifiers distil against the received model and add FedProx's term by default
    (kd.weight = 1, prox_mu = 0.01: the sweep's best variant); a language model does neither,
    unless its config says so."""
    lm = REPO / "tests" / "configs" / "lm-tiny.toml"
    assert load_config(lm).snake.kd.weight == 0.0
    assert load_config(lm).snake.prox_mu == 0.0
    assert load_config(lm, ["snake.prox_mu=0.1"]).snake.prox_mu == 0.1
    assert load_config(TINY).snake.prox_mu == 0.01
    assert load_config(TINY, ['scheme="fedavg"']).fedavg.prox_mu == 0.0  # plain FedAvg
    assert load_config(lm, ["snake.kd.weight=0.5"]).snake.kd.weight == 0.5
    assert load_config(lm, ["snake.kd.temperature=3"]).snake.kd.weight == 0.0
    assert load_config(TINY).snake.kd.weight == 1.0
    assert load_config(TINY).snake.kd.temperature == 2.0


def test_labels_name_each_option_away_from_its_default():
    from snake_mpi.analysis.runs import remedy_tags

    lm = REPO / "tests" / "configs" / "lm-tiny.toml"
    assert remedy_tags(load_config(lm)) == []  # owner and no KD are an LM's defaults
    assert remedy_tags(load_config(lm, ["snake.kd.weight=1"])) == ["kd1"]
    old = ["snake.logit_adjust=0", "snake.kd.weight=0", "snake.prox_mu=0"]
    old_tags = ["la0", "prox0", "ends-owner", "kd0", "cosine"]
    assert remedy_tags(load_config(TINY, [*old, 'train.lr_schedule="cosine"'])) == old_tags
    assert remedy_tags(load_config(TINY, ['snake.ends="all"', "snake.prox_mu=0.01"])) == []
    assert remedy_tags(load_config(TINY, ['scheme="fedavg"', "fedavg.prox_mu=0.01"])) == [
        "prox0.01"
    ]


def test_a_stored_config_without_the_new_settings_reads_as_it_ran():
    """A result file written before logit_adjust and prox_mu existed was made without them:
    it reads as 0 for both, not as today's defaults; one that has them keeps its values."""
    import tomllib

    from snake_mpi.config import stored_config, to_toml

    text = to_toml(load_config(TINY, ["snake.kd.weight=0"]))
    raw = tomllib.loads(text)
    assert raw["snake"]["prox_mu"] == 0.01 and raw["snake"]["logit_adjust"] == 1.0
    old = "\n".join(
        line for line in text.splitlines() if not line.startswith(("prox_mu", "logit_adjust"))
    )
    cfg = stored_config(old)
    assert (cfg.snake.prox_mu, cfg.snake.logit_adjust) == (0.0, 0.0)
    assert (cfg.fedavg.prox_mu, cfg.fedavg.logit_adjust) == (0.0, 0.0)
    assert stored_config(text) == load_config(TINY, ["snake.kd.weight=0"])
