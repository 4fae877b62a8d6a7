"""``bench.turn_peak``: a lone node's RSS when its turn starts, its peak before and during it."""

from __future__ import annotations

import pytest

from conftest import REPO

pytest.importorskip("transformers")
pytest.importorskip("torchao")

TINY_LM = REPO / "bench" / "configs" / "llm" / "tiny-snake.toml"


def test_the_turns_peak_is_read_apart_from_the_peak_before_it(capsys):
    from bench import turn_peak

    sets = ["train.local_steps=2", "train.rounds=1", "probes.enabled=false"]
    sets += ['snake.frozen_weights="int8"', "checkpoint.every=0"]
    assert (
        turn_peak.main(
            [str(TINY_LM), "--nodes", "2", "--node", "1", *sum((["--set", s] for s in sets), [])]
        )
        == 0
    )
    out = capsys.readouterr().out
    got = {
        line[:30].strip(): float(line[30:])
        for line in out.splitlines()[1:]
        if line.startswith("  ")
    }
    assert set(got) == {
        "built",
        "peak before the turn",
        "held when the turn starts",
        "peak of the turn's steps",
        "peak of the run",
    }
    # (a tiny model: the figures are small against the baseline's noise, even below it; their
    # order is what the mechanism fixes)
    assert got["held when the turn starts"] <= got["peak before the turn"]
    assert (
        got["held when the turn starts"]
        <= got["peak of the turn's steps"]
        <= got["peak of the run"]
    )
    assert got["peak before the turn"] <= got["peak of the run"]
