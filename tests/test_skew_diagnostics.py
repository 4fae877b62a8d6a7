"""Label-skew diagnostics (issue 14): per-class accuracy in each
evaluation (``/eval/class_accuracy``), the accuracy after each turn (``eval.after_each_turn``,
``/rounds/turn_accuracy``), and how ``snake-mpi show``, the report and the export present
them."""

from __future__ import annotations

import math
import tomllib

import numpy as np
import pytest
import torch
from torch import nn

from conftest import REPO
from snake_mpi.analysis.export import result_rows
from snake_mpi.analysis.summary import format_summary
from snake_mpi.blocks import BlockModel
from snake_mpi.cli import main as cli_main
from snake_mpi.config import ConfigError, from_dict, load_config, to_toml
from snake_mpi.record import EVAL_FIELDS, eval_layout
from snake_mpi.run import execute
from snake_mpi.schemes.rules import check
from snake_mpi.store import ResultWriter, partial_path, read_result
from snake_mpi.train import evaluate_detail
from snake_mpi.transport.localcomm import ThreadWorld

SMALL = REPO / "tests" / "configs" / "small.toml"
SKEWED = [
    "probes.enabled=false",
    "data.partition=dirichlet",
    "data.alpha=1.0",
    "data.n_train=1024",
    "data.n_test=256",
    "train.rounds=3",
]
"""A run that learns within seconds on label-skewed shards (4 classes)."""


def run(out, n, *sets):
    cfg = load_config(SMALL, [*SKEWED, *sets])
    ctxs = ThreadWorld(n).run(lambda c: execute(cfg, c, out), deadline_s=120)
    return ctxs, read_result(out)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Name -> (contexts, result): Snake P2P with and without eval.after_each_turn, Snake CS
    and FedAvg (two of three clients a round) with it."""
    d = tmp_path_factory.mktemp("skew")
    specs = {
        "p2p-on": (4, ["eval.after_each_turn=true"]),
        "p2p-off": (4, []),
        "cs-on": (4, ["eval.after_each_turn=true", 'snake.mode="cs"']),
        "fedavg-on": (
            4,
            ["eval.after_each_turn=true", 'scheme="fedavg"', "fedavg.clients_per_round=2"],
        ),
    }
    return {name: run(d / f"{name}.h5", n, *sets) for name, (n, sets) in specs.items()}


# ---------------------------------------------------------------------------- per class


def one_class_model(n_features: int, n_classes: int, favourite: int) -> BlockModel:
    """A classifier whose head ignores its input and always prefers class ``favourite``."""
    head = nn.Linear(n_features, n_classes)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[favourite] = 3.0
    return BlockModel(
        [
            ("stem", nn.Linear(n_features, n_features)),
            ("mid", nn.Linear(n_features, n_features)),
            ("head", head),
        ]
    )


def test_a_model_that_predicts_one_class_is_right_on_that_class_only():
    x = torch.randn(50, 6)
    y = torch.tensor([0, 1, 2, 2, 4] * 10)  # class 3 has no test sample
    e = evaluate_detail(one_class_model(6, 5, favourite=2), x, y, batch_size=7, n_classes=5)
    np.testing.assert_array_equal(e.class_accuracy, [0.0, 0.0, 1.0, np.nan, 0.0])
    assert e.accuracy == pytest.approx(0.4)
    assert evaluate_detail(one_class_model(6, 5, 2), x, y).class_accuracy.shape == (0,)


def test_class_accuracy_weighted_by_the_test_class_counts_is_the_accuracy(runs):
    ctxs, res = runs["p2p-on"]
    ev = res.evaluation
    per_class = ev["class_accuracy"]
    assert per_class.shape == (3, 4) and per_class.dtype == np.float64
    assert np.all((per_class >= 0) & (per_class <= 1))
    counts = np.bincount(ctxs[0].data.y_test.numpy(), minlength=4)
    np.testing.assert_allclose(per_class @ counts / counts.sum(), ev["accuracy"], atol=1e-12)
    # label skew: the classes are not learnt alike
    assert np.ptp(per_class[-1]) > 0.05


# ---------------------------------------------------------------------------- after each turn


def test_snake_p2p_turn_accuracy_ends_each_round_at_its_evaluation(runs):
    _, on = runs["p2p-on"]
    _, off = runs["p2p-off"]
    turn = on.rounds["turn_accuracy"]
    assert turn.shape == (3, 4) and np.isfinite(turn).all()  # every node trains every round
    # the last node evaluates the very model it trained: the same figure, bit for bit
    np.testing.assert_array_equal(turn[:, -1], on.evaluation["accuracy"])
    assert len({tuple(row) for row in turn}) > 1 and np.ptp(turn) > 0  # a real saw-tooth
    assert np.isnan(off.rounds["turn_accuracy"]).all()
    # the evaluations after the turns change nothing else: same training, bytes, evaluations
    for name in ("bytes_sent", "bytes_received", "messages_sent", "loss", "samples"):
        np.testing.assert_array_equal(on.rounds[name], off.rounds[name], err_msg=name)
    assert len(on.evaluation["round"]) == len(off.evaluation["round"]) == 3
    for name in ("round", "rank", "accuracy", "loss", "cum_bytes_sent", "class_accuracy"):
        np.testing.assert_array_equal(on.evaluation[name], off.evaluation[name], err_msg=name)
    # their time is in eval_s: nodes 0..N-2 evaluate only with the option
    assert (off.rounds["eval_s"][:, :-1] == 0).all()
    assert (on.rounds["eval_s"][:, :-1] > 0).all()


def test_snake_cs_and_fedavg_record_the_turns_of_the_ranks_that_trained(runs):
    _, cs = runs["cs-on"]
    turn = cs.rounds["turn_accuracy"]
    assert np.isnan(turn[:, 0]).all()  # the controller does not train
    assert np.isfinite(turn[:, 1:]).all()
    np.testing.assert_array_equal(turn[:, -1], cs.evaluation["accuracy"])
    _, fedavg = runs["fedavg-on"]
    turn, samples = fedavg.rounds["turn_accuracy"], fedavg.rounds["samples"]
    np.testing.assert_array_equal(np.isfinite(turn), samples > 0)
    assert (np.isfinite(turn).sum(axis=1) == 2).all()  # two clients a round


@pytest.mark.parametrize("scheme", ["split", "splitfed"])
def test_after_each_turn_is_refused_for_split_schemes(scheme):
    with pytest.raises(ConfigError, match=rf"eval.after_each_turn: scheme '{scheme}' splits"):
        check(from_dict({"scheme": scheme, "eval": {"after_each_turn": True}}))
    assert not from_dict({"scheme": scheme}).eval.after_each_turn  # off by default


@pytest.mark.parametrize("scheme", ["snake", "fedavg", "centralised"])
def test_after_each_turn_is_accepted_where_the_trainer_holds_the_model(scheme):
    cfg = from_dict({"scheme": scheme, "eval": {"after_each_turn": True}})
    assert cfg.eval.after_each_turn
    assert tomllib.loads(to_toml(cfg))["eval"] == {"after_each_turn": True}
    with pytest.raises(ConfigError, match="eval.after_each_turn must be true or false"):
        from_dict({"scheme": scheme, "eval": {"after_each_turn": 1}})


def test_a_language_model_records_turns_but_no_per_class_accuracy(tmp_path):
    pytest.importorskip("transformers")
    cfg = load_config(
        REPO / "tests" / "configs" / "lm-tiny.toml",
        ["probes.enabled=false", "train.rounds=1", "data.n_train=64", "eval.after_each_turn=true"],
    )
    out = tmp_path / "lm.h5"
    ThreadWorld(2).run(lambda c: execute(cfg, c, out), deadline_s=120)
    res = read_result(out)
    assert "class_accuracy" not in res.evaluation
    np.testing.assert_array_equal(res.rounds["turn_accuracy"][:, -1], res.evaluation["accuracy"])
    assert "per-class" not in format_summary(res)


# ---------------------------------------------------------------------------- the store


def writer(path, n_classes, **kw):
    fields, widths = eval_layout(n_classes)
    return ResultWriter(
        path,
        world_size=2,
        round_fields={"bytes_sent": "int64"},
        eval_fields=fields,
        eval_widths=widths,
        attrs={"scheme": "snake"},
        config_toml="",
        **kw,
    )


def evaluation(r, per_class=None):
    row = {"round": r, "rank": 1, "accuracy": 0.5, "loss": 1.0, "perplexity": math.e}
    row |= {"wall_s": float(r), "cum_bytes_sent": 10 * r}
    return row if per_class is None else row | {"class_accuracy": per_class}


def test_class_accuracy_round_trips_and_is_carried_over_on_resume(tmp_path):
    out = tmp_path / "r.h5"
    w = writer(out, 3)
    rows = {0: [0.0, 0.5, np.nan], 2: [1.0, 0.25, 0.75]}
    for r in range(3):
        ev = evaluation(r, rows[r]) if r in rows else None
        w.append_round({"bytes_sent": np.array([r, r])}, ev)
    with pytest.raises(ValueError, match=r"class_accuracy.*shape \(2,\), expected \(3,\)"):
        w.append_round({"bytes_sent": np.array([0, 0])}, evaluation(3, [0.1, 0.2]))
    w.close_incomplete()
    got = read_result(partial_path(out), allow_incomplete=True)
    assert got.unreadable == []
    np.testing.assert_array_equal(got.evaluation["class_accuracy"], [rows[0], rows[2]])
    # a resume from the checkpoint after round 2 keeps the evaluation of round 0 only
    w2 = writer(out, 3, carried_over=(got, 2))
    w2.append_round({"bytes_sent": np.array([5, 5])}, evaluation(2, [0.0, 0.0, 1.0]))
    w2.complete()
    res = read_result(out)
    np.testing.assert_array_equal(res.evaluation["class_accuracy"], [rows[0], [0.0, 0.0, 1.0]])
    assert res.evaluation["round"].tolist() == [0, 2]


def test_files_without_class_accuracy_still_read_and_show(tmp_path):
    old = tmp_path / "old.h5"
    w = writer(old, 0)  # a language model's, or a file from before /eval/class_accuracy
    w.append_round({"bytes_sent": np.array([1, 2])}, evaluation(0))
    w.complete()
    res = read_result(old)
    assert set(res.evaluation) == set(EVAL_FIELDS)
    assert "accuracy" in format_summary(res) and "per-class" not in format_summary(res)
    # such a partial cannot seed a run that records per-class accuracy: said, not a KeyError
    with pytest.raises(ValueError, match="eval field 'class_accuracy' missing; cannot resume"):
        writer(tmp_path / "new.h5", 3, carried_over=(res, 1))


# ---------------------------------------------------------------------------- show, export


def test_show_prints_per_class_accuracy_labels_and_turns(runs, tmp_path, capsys):
    _, res = runs["p2p-on"]
    assert cli_main(["show", str(res.path)]) == 0
    text = capsys.readouterr().out
    last = res.evaluation["class_accuracy"][-1]
    head = next(line for line in text.splitlines() if line.startswith("per-class"))
    assert head.startswith("per-class test accuracy after round 3 (4 classes; min ")
    cells = text.split(head)[1].splitlines()[1]
    assert cells.split() == [x for c in range(4) for x in (f"{c}:", f"{last[c]:.3f}")]
    assert "training samples per class (columns) on each rank holding data" in text
    turns = text.split("test accuracy after each turn")[1].splitlines()
    assert turns[1].split() == ["round", "rank", "0", "rank", "1", "rank", "2", "rank", "3", "eval"]
    turn, acc = res.rounds["turn_accuracy"], res.evaluation["accuracy"]
    for r in range(3):
        assert turns[3 + r].split() == [str(r + 1), *(f"{v:.3f}" for v in turn[r]), f"{acc[r]:.3f}"]
    # off: no turn table
    _, off = runs["p2p-off"]
    assert "after each turn" not in format_summary(off)


def test_show_lists_the_worst_classes_and_summarises_many_ranks(tmp_path):
    n_classes, ws, n_rounds = 30, 20, 12
    rng = np.random.default_rng(0)
    per_class = rng.permutation(n_classes) / n_classes  # distinct values
    per_class[7] = np.nan  # no test sample
    fields, widths = eval_layout(n_classes)
    w = ResultWriter(
        tmp_path / "many.h5",
        world_size=ws,
        round_fields={"turn_accuracy": "float64"},
        eval_fields=fields,
        eval_widths=widths,
        attrs={"scheme": "snake"},
        config_toml="",
    )
    turns = rng.random((n_rounds, ws))
    for r in range(n_rounds):
        w.append_round({"turn_accuracy": turns[r]}, evaluation(r, per_class))
    w.complete()
    text = format_summary(read_result(tmp_path / "many.h5"), max_turn_rows=4)
    assert "(30 classes; min 0.000" in text and "1 without test samples: -; the 10 lowest)" in text
    worst = [c for c in np.argsort(per_class) if not np.isnan(per_class[c])][:10]
    line = text.split("the 10 lowest)\n")[1].splitlines()[0]
    assert [int(c.rstrip(":")) for c in line.split()[::2]] == worst
    table = text.split("test accuracy after each turn")[1].splitlines()
    assert "last 4 of 12 rounds" in table[0]
    assert table[1].split()[:4] == ["round", "first", "turn", "lowest"]
    row = turns[-1]
    lo = int(np.argmin(row))
    assert table[-1].split()[:5] == ["12", f"{row[0]:.3f}", f"{row[lo]:.3f}", "(rank", f"{lo})"]


def test_export_gives_one_metric_per_class(runs):
    _, res = runs["p2p-on"]
    got = {(r[-5], r[-4], r[-3], r[-2]): r[-1] for r in result_rows(res)}
    ev = res.evaluation
    for i, (r, k) in enumerate(zip(ev["round"], ev["rank"], strict=True)):
        for c in range(4):
            assert (
                got[("eval", int(r) + 1, int(k), f"class_accuracy_{c}")]  # export: rounds from 1
                == ev["class_accuracy"][i, c]
            )
    assert got[("rounds", 1, 0, "turn_accuracy")] == res.rounds["turn_accuracy"][0, 0]


# ---------------------------------------------------------------------------- report


def test_report_draws_the_heat_map_and_the_turns(runs, tmp_path):
    pytest.importorskip("matplotlib")
    from snake_mpi.analysis import report
    from snake_mpi.analysis.render import Doc

    results = [runs[name][1] for name in ("p2p-on", "fedavg-on", "p2p-off")]
    figs = tmp_path / "figures"
    figs.mkdir()
    doc = Doc()
    report.label_skew_figures(doc, results, figs, "w1")
    for name in ("w1_class_acc.png", "w1_turns.png"):
        assert (figs / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
        assert f"figures/{name}" in doc.html("t") and f"figures/{name}" in doc.markdown()
    doc = Doc()
    report.label_skew_figures(doc, [runs["p2p-off"][1]], tmp_path, "w2")
    assert "w2_class_acc.png" in doc.markdown() and "turns" not in doc.markdown()
