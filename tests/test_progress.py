"""Progress within a turn: a long turn prints steps done and elapsed time at a modest rate."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from conftest import REPO
from snake_mpi.config import DebugConfig, load_config
from snake_mpi.models import build_model
from snake_mpi.record import Recorder
from snake_mpi.train import train_local, turn_batch_sizes

TINY = REPO / "tests" / "configs" / "tiny.toml"


def recorder(step_progress_s: float) -> Recorder:
    rec = Recorder(
        comm=SimpleNamespace(rank=2, size=4),
        model=None,
        probes=[],
        writer=None,
        debug=DebugConfig(),
        n_rounds=5,
        step_progress_s=step_progress_s,
    )
    rec.round = 1
    return rec


def test_a_turn_longer_than_the_interval_prints_rank_round_steps_and_elapsed(capsys):
    cfg = load_config(TINY, ["train.local_steps=5"])
    model = build_model(cfg.model, sample_shape=(16,), n_classes=4, seed=1)
    x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
    total = len(turn_batch_sizes(len(x), cfg.train))
    rec = recorder(step_progress_s=1e-9)  # every step is "long"
    res = train_local(
        model,
        [1],
        x,
        y,
        cfg=cfg.train,
        generator=torch.Generator().manual_seed(0),
        on_step=rec.step_reporter(total),
    )
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("snake-mpi:")]
    assert res.steps == total == 5
    assert len(lines) == 5
    assert lines[0].startswith("snake-mpi: rank 2, round 2 of 5: step 1 of 5, ")
    assert lines[-1].startswith("snake-mpi: rank 2, round 2 of 5: step 5 of 5, ")
    assert all(ln.endswith("s into the turn") for ln in lines)


def test_a_short_turn_or_progress_off_prints_nothing(capsys):
    for rec in (recorder(step_progress_s=3600.0), recorder(step_progress_s=0.0)):
        on_step = rec.step_reporter(10)
        for k in range(1, 11):
            on_step(k)
    assert capsys.readouterr().out == ""
