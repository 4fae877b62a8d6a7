"""Same config and seed, same bits, wherever it runs (docs/reproducibility.md).

The data, partition and initial model are checked in child processes under other CPU
affinities, BLAS thread counts, torch thread counts and BLAS kernels (OpenBLAS's
``OPENBLAS_CORETYPE`` picks another CPU's kernels: the stand-in for another machine); the runs'
recorded settings and the mismatch checks in-process. Whole runs across placements (bound to
cores, two hosts): test_two_hosts.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_in_threads
from snake_mpi import cli, numerics
from snake_mpi.analysis import compare
from snake_mpi.config import load_config
from snake_mpi.data.synthetic import make_synthetic
from snake_mpi.run import execute, seeds_for
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld

DEMO = REPO / "bench" / "configs" / "demo.toml"
TINY = REPO / "tests" / "configs" / "tiny.toml"

CHILD = r"""
import hashlib, json, sys
import torch
torch.set_num_threads(int(sys.argv[1]))
from snake_mpi.blocks import model_hash
from snake_mpi.config import load_config
from snake_mpi.models import build_model
from snake_mpi.numerics import dataset_sha256
from snake_mpi.run import build_shards, seeds_for

out = {}
for path, *sets in json.loads(sys.argv[2]):
    cfg = load_config(path, sets)
    seeds, _ = seeds_for(cfg.seed, 4)
    dataset, parts = build_shards(cfg, seeds, 4)
    model = build_model(cfg.model, sample_shape=tuple(cfg.data.sample_shape),
                        n_classes=dataset.n_classes, seed=seeds["model"])
    out[" ".join([path, *sets])] = {
        "data": dataset_sha256(dataset),
        "partition": hashlib.sha256(b"".join(p.tobytes() for p in parts)).hexdigest(),
        "model": model_hash(model),
    }
print(json.dumps({"threads": torch.get_num_threads(), "hashes": out}))
"""

CONFIGS = [
    [str(DEMO)],  # a CNN on image-shaped data, iid partition
    [str(TINY), 'data.partition="dirichlet"', "data.alpha=0.5"],  # an MLP on vectors
]


def _hashes(cpus: set[int], torch_threads: int, env: dict[str, str]) -> dict:
    """The data, partition and initial-model hashes computed by a child process that may run
    on ``cpus`` only, with ``torch_threads`` and ``env`` (on top of a clean thread setting)."""
    base = {k: v for k, v in os.environ.items() if k not in numerics.NUMERIC_ENV_VARS}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(torch_threads), json.dumps(CONFIGS)],
        env=base | env,
        preexec_fn=lambda: os.sched_setaffinity(0, cpus),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["threads"] == torch_threads
    return got["hashes"]


def test_data_partition_and_initial_model_are_the_same_bits_under_any_affinity_and_threads():
    """Before the fix the synthetic data came out of a BLAS ``sgemm`` whose bits depended on its
    thread count (one core against two, with OpenBLAS's Haswell kernel) and on the CPU kernel."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip(f"needs two usable CPUs to compare affinities; this process has {cpus}")
    one, two = {cpus[0]}, {cpus[0], cpus[1]}
    haswell = {"OPENBLAS_CORETYPE": "Haswell"}
    placements = {
        "one core, BLAS default": _hashes(one, 1, haswell),
        "two cores, BLAS default, 2 torch threads": _hashes(two, 2, haswell),
        "two cores, 1 BLAS thread": _hashes(
            two, 1, haswell | {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        ),
        "two cores, 2 BLAS threads, another CPU's kernel": _hashes(
            two, 2, {"OPENBLAS_CORETYPE": "Prescott", "OPENBLAS_NUM_THREADS": "2"}
        ),
    }
    first_name, first = next(iter(placements.items()))
    for name, hashes in placements.items():
        for config, parts in hashes.items():
            for part, digest in parts.items():
                assert digest == first[config][part], (
                    f"{part} of {config}: {name} gave {digest[:12]}, {first_name} "
                    f"{first[config][part][:12]}"
                )


def test_the_projection_adds_the_products_in_latent_order_in_float32():
    """``_project`` is ``latent @ mapping`` with each output element summed k = 0, 1, ... and
    rounded to float32 at every step: the same bits as a plain loop, close to BLAS's."""
    from snake_mpi.data.synthetic import _project

    rng = np.random.default_rng(0)
    latent = rng.standard_normal((37, 16), dtype=np.float32)
    mapping = rng.standard_normal((16, 29), dtype=np.float32)
    want = latent[:, 0, None] * mapping[0]
    for k in range(1, 16):
        want = (want + latent[:, k, None] * mapping[k]).astype(np.float32)
    got = _project(latent, mapping, block_bytes=4 * 29 * 5)  # blocks of 5 rows, one of 2
    assert got.dtype == np.float32
    assert got.tobytes() == want.tobytes()
    np.testing.assert_allclose(got, latent @ mapping, rtol=1e-5, atol=1e-5)


def test_a_run_records_every_ranks_numeric_settings_and_data_hash(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.delenv("OPENBLAS_CORETYPE", raising=False)
    cfg = load_config(TINY)
    run_in_threads(cfg, 2, tmp_path / "r.h5")
    ranks = read_result(tmp_path / "r.h5").tables["ranks"]
    d = cfg.data
    data = make_synthetic(
        n_train=d.n_train,
        n_test=d.n_test,
        n_classes=d.n_classes,
        sample_shape=tuple(d.sample_shape),
        noise=d.noise,
        seed=seeds_for(cfg.seed, 2)[0]["data"],
    )
    assert list(ranks["data_sha256"]) == [numerics.dataset_sha256(data)] * 2
    assert list(ranks["torch_threads"]) == [cfg.torch_threads] * 2
    import torch

    assert list(ranks["cpu_capability"]) == [torch.backends.cpu.get_cpu_capability()] * 2
    assert "OMP_NUM_THREADS=1" in ranks["numeric_env"][0].split(",")
    assert cli.main(["show", str(tmp_path / "r.h5")]) == 0  # and show says them in one line
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("numerics "))
    kernels = torch.backends.cpu.get_cpu_capability()
    assert f"torch threads 1, CPU kernels {kernels}, " in line
    assert f"; data sha256 {numerics.dataset_sha256(data)[:12]}" in line


def test_ranks_that_hold_different_data_stop_before_training_naming_them(tmp_path):
    """As ranks on nodes with other library versions or another copy of a data file would."""
    cfg = load_config(TINY)
    d = cfg.data
    kw = dict(n_train=d.n_train, n_test=d.n_test, n_classes=d.n_classes, noise=d.noise)
    same = make_synthetic(sample_shape=(16,), seed=1, **kw)
    other = make_synthetic(sample_shape=(16,), seed=2, **kw)
    out = tmp_path / "r.h5"
    with pytest.raises(numerics.DataMismatch) as err:
        ThreadWorld(3).run(
            lambda c: execute(cfg, c, out, dataset=other if c.rank == 2 else same),
            deadline_s=30,
        )
    assert "rank(s) 2 generated or read other data than rank 0" in str(err.value)
    assert not out.exists()


def test_compare_names_the_settings_in_which_the_runs_differ(tmp_path, monkeypatch, capsys):
    cfg = load_config(TINY)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    run_in_threads(cfg, 2, tmp_path / "a.h5")
    run_in_threads(cfg, 2, tmp_path / "b.h5")
    assert compare.main([str(tmp_path / "a.h5"), str(tmp_path / "b.h5")]) == 0
    assert "note:" not in capsys.readouterr().out  # the same settings: nothing to say
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    run_in_threads(cfg, 2, tmp_path / "c.h5")
    table = tmp_path / "t.md"
    assert compare.main([str(tmp_path / p) for p in ("a.h5", "c.h5")] + ["--out", str(table)]) == 0
    out = capsys.readouterr().out
    assert compare.SETTINGS_NOTE in out
    line = next(x for x in out.splitlines() if x.strip().startswith("numeric_env:"))
    assert "(none) (" in line and "OMP_NUM_THREADS=7 (" in line, line
    assert "torch_threads" not in out  # the same in both
    assert "OMP_NUM_THREADS=7" in table.read_text()


def test_run_differences_groups_runs_by_each_setting():
    runs = [
        ("a", {"torch_threads": [1, 1], "cpu_capability": ["AVX2", "AVX2"]}),
        ("b", {"torch_threads": [1, 1], "cpu_capability": ["AVX2", "AVX512"]}),
        ("c", {"torch_threads": [4, 4]}),
    ]
    assert numerics.run_differences(runs) == [
        "torch_threads: 1 (a, b); 4 (c)",
        "cpu_capability: AVX2 (a); AVX2 + AVX512 (b); (not recorded) (c)",
    ]
    assert numerics.run_differences(runs[:1]) == []
    assert numerics.data_mismatch(["x", "x"]) is None


def test_the_guarantee_is_documented_in_one_place():
    text = (REPO / "docs" / "reproducibility.md").read_text()
    for word in ("torch_threads", "cpu_capability", "numeric_env", "data_sha256", "MPICH"):
        assert word in text, word
    assert "docs/reproducibility.md" in Path(REPO / "README.md").read_text()
