"""The scheme registry: every built-in scheme is declared once, and the config, the run and the
analytic byte counts read the declarations (a scheme registered here, in a test, is accepted
without editing any other file)."""

from __future__ import annotations

import importlib
import subprocess
import sys
import tomllib
import types

import numpy as np
import pytest

from conftest import REPO
from snake_mpi import config as config_module
from snake_mpi.analysis.expected import expected_bytes
from snake_mpi.config import ConfigError, from_dict, load_config, to_toml
from snake_mpi.schemes import (
    REGISTRY,
    SCHEMES,
    SchemeSpec,
    get_scheme,
    register,
    scheme_names,
    scheme_spec,
    unregister,
)
from snake_mpi.schemes.rules import check, data_ranks, is_client_server, validate_for_world

BUILT_IN = ("snake", "fedavg", "split", "splitfed", "centralised")
SMALL = REPO / "tests" / "configs" / "small.toml"


def test_the_registry_lists_every_scheme_with_its_declaration():
    assert scheme_names() == BUILT_IN
    for name in BUILT_IN:
        spec = scheme_spec(name)
        assert spec.name == name
        assert callable(spec.run_function()) and callable(spec.expected_bytes_function())
        assert get_scheme(name) is spec.run_function()
    lm = {n for n in BUILT_IN if scheme_spec(n).supports_lm}
    assert lm == {"snake", "fedavg", "centralised"}
    assert scheme_spec("centralised").max_ranks == 1
    with pytest.raises(KeyError, match="registered: snake, fedavg"):
        scheme_spec("nope")


@pytest.mark.parametrize(
    ("name", "sets", "client_server"),
    [
        ("snake", [], False),
        ("snake", ['snake.mode="cs"'], True),
        ("fedavg", [], True),
        ("split", [], True),
        ("splitfed", [], True),
        ("centralised", [], False),
    ],
)
def test_client_server_comes_from_the_spec(name, sets, client_server):
    cfg = load_config(None, [f'scheme="{name}"', *sets])
    assert is_client_server(cfg) is client_server


def test_the_config_module_imports_no_torch():
    code = "import sys, snake_mpi.config; sys.exit('torch' in sys.modules)"
    src = str(REPO / "src")
    env = {"PYTHONPATH": src, "PATH": ""}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_the_registry_is_one_line_per_scheme_and_its_modules_import_no_torch():
    assert tuple(f"snake_mpi.schemes.{name}_spec" for name in BUILT_IN) == SCHEMES
    for module, name in zip(SCHEMES, BUILT_IN, strict=True):
        assert importlib.import_module(module).SPEC is scheme_spec(name)
    assert not hasattr(config_module, "check_snake_world")
    assert not hasattr(config_module, "check_fedavg_world")
    code = (
        "import sys; from snake_mpi.schemes.rules import checked_config, validate_for_world\n"
        "for name in ('snake', 'fedavg', 'split', 'splitfed'):\n"
        "    validate_for_world(checked_config(None, [f'scheme=\"{name}\"']), 4)\n"
        "sys.exit('torch' in sys.modules)"
    )
    src = str(REPO / "src")
    env = {"PYTHONPATH": src, "PATH": ""}
    assert subprocess.run([sys.executable, "-c", code], env=env).returncode == 0


def test_a_duplicate_name_or_bad_rank_range_is_refused():
    with pytest.raises(ValueError, match="already registered"):
        register(scheme_spec("fedavg"))
    bad = SchemeSpec(
        name="bad", run=lambda ctx: None, client_server=False, supports_lm=False,
        expected_bytes=None, min_ranks=3, max_ranks=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="min_ranks <= max_ranks"):
        register(bad)
    assert "bad" not in REGISTRY


# ------------------------------------------------------------------ a scheme from a test


def _toy_run(ctx) -> None:
    """Rounds with no messages and no training: the recorder's figures only."""
    ctx.report.owners = [0] * ctx.model.n_blocks
    for r in range(ctx.cfg.train.rounds):
        ctx.record.begin_round(r)
        ctx.record.end_round()


def _toy_bytes(cfg, res):
    """A made-up analytic count: every client sends 7 bytes per round."""
    sent = np.zeros((res.n_rounds, res.world_size), dtype=np.int64)
    sent[:, 1:] = 7
    return sent, sent[:, ::-1].copy()


def _toy_world(cfg, world_size, holders):
    if holders > 4:
        raise ConfigError(f"toy: at most 4 clients, got {holders}")


@pytest.fixture
def toy():
    """A scheme registered for one test only (removed afterwards, whatever happens)."""
    spec = register(
        SchemeSpec(
            name="toy",
            run=_toy_run,
            client_server=True,
            supports_lm=False,
            expected_bytes=_toy_bytes,
            min_ranks=3,
            check_world=_toy_world,
        )
    )
    yield spec
    unregister("toy")
    assert "toy" not in scheme_names()


def test_a_registered_scheme_is_accepted_by_the_config(toy):
    cfg = from_dict({"scheme": "toy"})
    assert from_dict(tomllib.loads(to_toml(cfg))) == cfg
    validate_for_world(cfg, 4)
    assert data_ranks(cfg, 4) == [1, 2, 3] and is_client_server(cfg)
    with pytest.raises(ConfigError, match="'toy' is distributed and needs at least 3 MPI ranks"):
        validate_for_world(cfg, 2)
    with pytest.raises(ConfigError, match="toy: at most 4 clients"):
        validate_for_world(cfg, 6)
    lm = {
        "scheme": "toy",
        "model": {"family": "lm", "preset": "opt-tiny"},
        "data": {"name": "text"},
    }
    with pytest.raises(ConfigError, match="'toy' does not support language models"):
        check(from_dict(lm))


def test_an_unregistered_scheme_is_refused_again(toy):
    unregister("toy")
    with pytest.raises(ConfigError, match="unknown scheme 'toy'"):
        check(from_dict({"scheme": "toy"}))
    register(toy)  # the fixture removes it


def test_a_registered_scheme_gets_its_expected_bytes(toy):
    cfg = from_dict({"scheme": "toy", "train": {"rounds": 2}})
    res = types.SimpleNamespace(config_toml=to_toml(cfg), world_size=3, n_rounds=2)
    sent, received = expected_bytes(res)
    np.testing.assert_array_equal(sent, [[0, 7, 7], [0, 7, 7]])
    np.testing.assert_array_equal(received, [[7, 7, 0], [7, 7, 0]])


def test_a_scheme_without_an_analytic_model_says_so(toy):
    register(
        SchemeSpec(
            name="toy", run=_toy_run, client_server=True, supports_lm=False, expected_bytes=None
        ),
        replace=True,
    )
    cfg = from_dict({"scheme": "toy"})
    res = types.SimpleNamespace(config_toml=to_toml(cfg), world_size=3, n_rounds=1)
    with pytest.raises(ValueError, match="no analytic model for scheme 'toy'"):
        expected_bytes(res)


def test_a_registered_scheme_runs_through_run_py(toy, tmp_path):
    from snake_mpi.run import execute
    from snake_mpi.store import read_result
    from snake_mpi.transport.localcomm import ThreadWorld

    cfg = load_config(SMALL, ['scheme="toy"', "probes.enabled=false", "train.rounds=2"])
    validate_for_world(cfg, 3)
    out = tmp_path / "toy.h5"
    ThreadWorld(3).run(lambda comm: execute(cfg, comm, out), deadline_s=60)
    res = read_result(out)
    assert res.scheme == "toy" and res.n_rounds == 2 and res.world_size == 3
    assert (res.rounds["bytes_sent"] == 0).all()
    assert res.tables["ranks"]["data_samples"][0] == 0  # client-server: rank 0 holds no data


def test_config_module_has_no_scheme_tables_left():
    for old in ("SCHEMES", "DISTRIBUTED_SCHEMES", "LM_SCHEMES"):
        assert not hasattr(config_module, old)


def test_threads_looking_up_first_at_once_all_find_the_schemes(monkeypatch):
    """Ranks run as threads may each make the registry's first look-up: while one thread loads
    the built-in schemes (slowed here), the others wait for it instead of finding it empty."""
    import threading
    import time

    from snake_mpi.schemes import registry

    saved = dict(registry.REGISTRY)
    monkeypatch.setattr(registry, "_loaded", False)
    registry.REGISTRY.clear()
    real = importlib.import_module

    def slow_import(name: str) -> types.ModuleType:
        time.sleep(0.02)
        return real(name)

    monkeypatch.setattr(registry.importlib, "import_module", slow_import)
    found: list[str] = []
    errors: list[BaseException] = []

    def look_up() -> None:
        try:
            found.append(registry.scheme_spec("centralised").name)
        except BaseException as e:  # noqa: BLE001 - any failure is the test's finding
            errors.append(e)

    try:
        threads = [threading.Thread(target=look_up) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert found == ["centralised"] * 4
    finally:
        registry.REGISTRY.clear()
        registry.REGISTRY.update(saved)
