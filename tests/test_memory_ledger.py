"""bench/memory_ledger.py: each part of a training step's memory, read by ``train_local``'s step
observer, equals its analytic count on the tiny OPT model (the byte counts exactly; the
activations autograd saves as the formula of the module says), and the command prints the
ledger of a Snake node. The OPT-1.3B ledgers are in docs/memory.md."""

from __future__ import annotations

import contextlib
import dataclasses

import pytest
import torch

pytest.importorskip("transformers")

from bench import memory_ledger as ledger  # noqa: E402
from conftest import REPO  # noqa: E402
from snake_mpi.blocks import model_hash  # noqa: E402
from snake_mpi.config import from_dict  # noqa: E402
from snake_mpi.models import build_model  # noqa: E402
from snake_mpi.train import observe_steps, train_local  # noqa: E402

TINY_LM = REPO / "bench" / "configs" / "llm" / "tiny-snake.toml"


def run_steps(dtype: str, trained: list[int], *, observe: bool = True, **train):
    cfg = from_dict(
        {
            "model": {"family": "lm", "preset": "opt-tiny", "dtype": dtype},
            "data": {"name": "text", "seq_len": 16},
            "train": {"batch_size": 4, "local_steps": 3, "optimizer": "adamw", **train},
        }
    )
    model = build_model(cfg.model, sample_shape=(1,), n_classes=256, seed=0)
    x = torch.randint(0, 256, (12, 16), generator=torch.Generator().manual_seed(0))
    steps = ledger.StepLedger(measure_temporaries=ledger.eager_step(cfg))
    with observe_steps(steps) if observe else contextlib.nullcontext():
        train_local(
            model, trained, x, torch.roll(x, -1, 1), cfg=cfg.train, generator=torch.Generator()
        )
    m = ledger._measured(steps, (0, 0), 0, model, trained, 0, [x, x])
    return cfg, model, m


@pytest.mark.parametrize(
    ("dtype", "train"),
    [
        ("float32", {}),
        ("bfloat16", {}),
        ("bfloat16", {"fused_step": True}),
        ("bfloat16", {"fused_kernel": True}),
        ("float32", {"optimizer": "sgd", "momentum": 0.9}),
        ("bfloat16", {"optimizer": "adamw8bit", "stochastic_rounding": True}),
    ],
    ids=["fp32", "bf16", "bf16-fused", "bf16-kernel", "sgd", "bf16-rounding"],
)
def test_each_part_of_a_step_equals_its_analytic_count(dtype, train):
    if train.get("optimizer") == "adamw8bit":
        pytest.importorskip("torchao")
    trained = [1, 2]
    cfg, model, m = run_steps(dtype, trained, **train)
    want = ledger.analytic(cfg, m, trained, model.n_blocks)
    assert m.steps.steps == 3
    assert m.steps.masters == want["fp32 masters"]
    assert m.steps.gradients == want["gradients"]
    assert m.steps.optimiser == want["optimiser state"]
    assert m.steps.activations == want["activations"]  # opt-tiny's layers: to the byte
    assert m.steps.temporaries == want["step temporaries"]
    assert m.trained_bytes == want["trained weights"]
    assert m.frozen_bytes == want["frozen weights"]
    p = sum(m.trained_params)
    if train.get("stochastic_rounding"):  # the bf16 weights step in place: no fp32 copies
        assert m.steps.masters == 0 and m.steps.gradients == 2 * p > 0
    elif dtype == "bfloat16":
        assert m.steps.masters == 4 * p > 0
    if train.get("fused_step"):
        assert m.steps.gradients == 0  # each parameter's gradient is gone once it has stepped
        assert m.steps.temporaries is None  # the step runs inside the backward pass: not watched
    elif train.get("fused_kernel"):
        assert m.steps.temporaries == 0  # one kernel per parameter, nothing allocated
    elif cfg.train.optimizer == "adamw":
        assert m.steps.temporaries > 8 * max(m.trained_params)  # two fp32 tensors and more


def test_frozen_layers_above_the_segment_keep_less_than_trained_ones():
    # segment [1]: layers 2-4 are frozen above it, so they keep no inputs of their linear maps
    cfg, model, low = run_steps("float32", [1])
    _, _, high = run_steps("float32", [4])
    assert low.steps.activations == ledger.analytic(cfg, low, [1], model.n_blocks)["activations"]
    assert low.steps.activations > high.steps.activations > 0


def test_the_ledger_of_a_snake_node_adds_up_to_its_peak(tmp_path, capsys):
    code = ledger.main(
        [str(TINY_LM), "--nodes", "2", "--node", "1", "--json", str(tmp_path / "l.json")]
        + ["--set", "train.local_steps=2", "--set", "train.rounds=1"]
    )
    assert code == 0
    out = capsys.readouterr().out
    assert "memory ledger: node 1 of 2" in out
    import json

    rows = {r["part"]: r for r in json.loads((tmp_path / "l.json").read_text())["rows"]}
    parts = sum(rows[p]["measured"] for p in ledger.SUMMED)
    assert rows["sum of the parts"]["measured"] == parts
    assert rows["rest"]["measured"] == rows["peak increase"]["measured"] - parts
    exact = ("fp32 masters", "gradients", "optimiser state", "step temporaries", "trained weights")
    for part in (*exact, "data"):
        assert rows[part]["measured"] == rows[part]["analytic"], part
    assert rows["step temporaries"]["measured"] > 0


def test_activation_checkpointing_has_no_activation_model():
    cfg = from_dict({"model": {"family": "lm", "preset": "opt-tiny"}, "data": {"name": "text"}})
    assert ledger.opt_activation_bytes(cfg, [1], 6) is not None
    lean = dataclasses.replace(
        cfg, train=dataclasses.replace(cfg.train, activation_checkpointing=True)
    )
    assert ledger.opt_activation_bytes(lean, [1], 6) is None


def test_a_tied_matrix_is_one_trained_parameter():
    # every block trains (full fine-tuning): the stem's embedding is the head's output matrix
    cfg, model, m = run_steps("bfloat16", list(range(6)))
    assert sum(m.trained_params) == sum(p.numel() for p in model.parameters())  # each once
    want = ledger.analytic(cfg, m, list(range(6)), model.n_blocks)
    assert m.steps.masters == want["fp32 masters"] and m.steps.optimiser == want["optimiser state"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_the_ledger_leaves_the_weights_as_an_unobserved_step_does(dtype):
    # the observers (saved-tensor hooks, the dispatch mode over the optimiser step) only look
    _, watched, m = run_steps(dtype, [1, 2])
    _, plain, _ = run_steps(dtype, [1, 2], observe=False)
    assert m.steps.temporaries and m.steps.activations
    assert model_hash(watched) == model_hash(plain)


def test_chunked_masters_hold_a_chunks_temporaries():
    # the eager AdamW step over a bf16 layer's chunked masters: its temporaries are a chunk's
    from snake_mpi.train import Optimiser
    from test_lean_options import chunk_run

    for chunk in (0, 65536):
        layer, _ = chunk_run(chunk)
        cfg = from_dict(
            {
                "model": {"family": "lm", "preset": "opt-tiny", "dtype": "bfloat16"},
                "data": {"name": "text"},
                "train": {"optimizer": "adamw", "master_chunk_elements": chunk},
            }
        )
        opt = Optimiser(list(layer.parameters()), cfg.train)
        layer(torch.ones(2, 600, dtype=torch.bfloat16)).float().sum().backward()
        window = ledger.NewStorages()
        with window:
            opt.step()
        numels = ledger.stepped_numels(cfg, [300_000, 500])
        assert window.temporaries() == ledger.adam_temporaries_bytes(numels)
        assert numels == ([300_000, 500] if chunk == 0 else [65536] * 4 + [37856, 500])


def test_the_ledger_refuses_int8_frozen_blocks_it_does_not_model(capsys):
    with pytest.raises(SystemExit) as e:
        ledger.main(
            [str(TINY_LM), "--nodes", "2", "--set", 'snake.frozen_weights="int8"']
            + ["--set", "checkpoint.every=0"]
        )
    assert e.value.code == 2
    assert "not in the ledger's model yet" in capsys.readouterr().err
