"""A scheme is its module plus one registry line (issue 28): a made-up scheme
(``fake_scheme.py``, joined by the one ``registry.add`` line below) runs through ``run`` and
then ``compare``, ``export`` and the paper's claims with no edit anywhere else. A place that
still branches on the built-in schemes' names fails here."""

from __future__ import annotations

import csv

import pytest

from conftest import REPO
from snake_mpi.analysis import compare, export, runs
from snake_mpi.analysis.claims import paper_claims
from snake_mpi.config import ConfigError
from snake_mpi.run import execute
from snake_mpi.schemes import registry
from snake_mpi.schemes.rules import checked_config, validate_for_world
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

pytestmark = pytest.mark.xdist_group("fake_scheme")  # one worker: its two runs made once

SMALL = REPO / "tests" / "configs" / "small.toml"
RUNS = {"relay.h5": (3, 'scheme="relay"'), "fedavg.h5": (4, 'scheme="fedavg"')}
"""The fake scheme on 3 ranks (3 data holders) and its FedAvg partner with as many clients."""


@pytest.fixture(scope="module")
def relay():
    """The fake scheme, registered for this module's tests only."""
    spec = registry.add("fake_scheme")  # the one line: the same a built-in scheme has
    yield spec
    registry.unregister("relay")


@pytest.fixture(scope="module")
def results_dir(relay, tmp_path_factory):
    d = tmp_path_factory.mktemp("relay")
    for name, (n, scheme) in RUNS.items():
        cfg = checked_config(SMALL, ["probes.enabled=false", "train.rounds=4", scheme])
        ThreadWorld(n).run(lambda c, cfg=cfg, name=name: execute(cfg, c, d / name), deadline_s=120)
    return d


def test_the_config_takes_the_fake_scheme_and_its_world_check(relay):
    cfg = checked_config(SMALL, ['scheme="relay"'])
    validate_for_world(cfg, 3)
    with pytest.raises(ConfigError, match="relay: at most 8 ranks"):
        validate_for_world(cfg, 9)


def test_run_writes_its_result_with_its_attributes(results_dir):
    res = read_result(results_dir / "relay.h5")
    assert res.scheme == "relay" and res.world_size == 3 and res.n_rounds == 4
    assert res.attrs["ring"] == "0->1->...->0"
    assert (res.tables["ranks"]["data_samples"] > 0).all()  # not client-server
    assert (res.rounds["bytes_sent"] > 0).all()
    assert runs.label(res) == "relay-x1"


def test_compare_shows_it_with_its_analytic_bytes(results_dir, capsys):
    assert compare.main([str(results_dir), "--markdown"]) == 0
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if line.startswith("| relay-x1"))
    assert "| exact |" in row  # measured bytes equal the spec's analytic count
    assert "relay-x1 N=3 (3 data holders, 4 rounds)" in out  # its claims against FedAvg


def test_the_claims_judge_it_against_fedavg(results_dir):
    results = [read_result(results_dir / name) for name in RUNS]
    found = paper_claims(results, target=0.0)
    mine = [c for c in found if c.run.startswith("relay-x1 N=3")]
    assert mine and all("fedavg" in c.run for c in mine)
    assert all(c.files[0] == "relay.h5" for c in mine)


def test_export_writes_its_rows(results_dir, tmp_path):
    out = tmp_path / "long.csv"
    assert export.main([str(results_dir), "--out", str(out)]) == 0
    with out.open() as f:
        mine = [row for row in csv.DictReader(f) if row["scheme"] == "relay"]
    assert mine and {row["data_holders"] for row in mine} == {"3"}
    assert {row["mode"] for row in mine} == {""}  # Snake's columns stay empty
