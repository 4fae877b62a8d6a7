"""The red-team's bad inputs, one table: each case builds its input, runs the command a user
would run, and expects an exit code and a fragment of a one-line message — never a traceback,
and for a refused run no file left behind (no result, no ``.partial``, no lock). Cases without
ranks run the command's ``main`` in this process; one real ``mpirun`` case per class of
failure (the config file, a config value, the data, the output, the memory, training itself)
shows that every rank of a job exits with one message."""

from __future__ import annotations

import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import REPO, run_mpi, snake_mpi

TINY = REPO / "tests" / "configs" / "tiny.toml"
COMMAND: list[str] = snake_mpi()
"""The command under test (``snake-mpi``)."""


@dataclass(frozen=True)
class Case:
    """One bad input: ``build(tmp)`` returns the arguments after the command; ``ranks`` > 0 runs
    them under ``mpirun -n ranks``."""

    name: str
    build: Callable[[Path], list[str]]
    code: int
    fragment: str
    ranks: int = 0


def _npz(tmp: Path, *, x_train=None, n_train=600, **extra) -> Path:
    rng = np.random.default_rng(0)
    arrays = {
        "x_train": rng.normal(size=(n_train, 16)) if x_train is None else x_train,
        "y_train": rng.integers(0, 4, n_train),
        "x_test": rng.normal(size=(300, 16)),
        "y_test": rng.integers(0, 4, 300),
    }
    path = tmp / "data.npz"
    np.savez(path, **(arrays | extra))
    return path


def _run_arrays(tmp: Path, path: Path, *extra: str) -> list[str]:
    return [
        "run",
        str(TINY),
        "--set",
        'data.name="arrays"',
        "--set",
        f'data.path="{path}"',
        *extra,
        "--out",
        str(tmp / "out.h5"),
    ]


def _cifar(tmp: Path, bad_label: bool = False) -> Path:
    """A CIFAR-10-format release with 20 records per file."""
    from snake_mpi.data.cifar10 import TEST_FILE, TRAIN_FILES

    rng = np.random.default_rng(0)
    d = tmp / "cifar-10-batches-bin"
    d.mkdir()
    for name in [*TRAIN_FILES, TEST_FILE]:
        records = rng.integers(0, 256, (20, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        if bad_label and name == TRAIN_FILES[2]:
            records[7, 0] = 12
        (d / name).write_bytes(records.tobytes())
    return d


def _validate(run_args: list[str]) -> list[str]:
    """``validate`` with the config and overrides of a ``run`` command line (no ``--out``): it
    reads and checks the data as ``run`` does before it starts."""
    return ["validate", *run_args[1:-2]]


def _run_cifar(tmp: Path, path: Path) -> list[str]:
    return [
        "run",
        str(TINY),
        "--set",
        'data.name="cifar10"',
        "--set",
        f'data.path="{path}"',
        "--set",
        "data.sample_shape=[3, 32, 32]",
        "--set",
        "data.n_classes=10",
        "--set",
        "data.n_train=64",
        "--set",
        "data.n_test=16",
        "--out",
        str(tmp / "out.h5"),
    ]


def _truncated_tarball(tmp: Path) -> Path:
    d = _cifar(tmp)
    tgz = tmp / "cifar-10-binary.tar.gz"
    with tarfile.open(tgz, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-bin")
    raw = tgz.read_bytes()
    tgz.write_bytes(raw[: len(raw) // 2])
    return tgz


def _binary_config(tmp: Path) -> list[str]:
    p = tmp / "weights.toml"
    p.write_bytes(bytes(range(256)) * 8)
    return ["validate", str(p)]


def _suite(tmp: Path, body: str) -> list[str]:
    p = tmp / "bad-suite.toml"
    p.write_text(f'configs = ["{TINY}"]\nseeds = [0]\n{body}\n')
    return ["suite", str(p), "--out", str(tmp / "suite-out"), "--list"]


def _proc_out(tmp: Path) -> list[str]:
    return ["run", str(TINY), "--out", "/proc/snake-mpi-result.h5"]


CASES = [
    Case("config-directory", lambda t: ["validate", str(t)], 2, "is a directory"),
    Case("config-binary", _binary_config, 2, "not a text file"),
    Case("run-config-directory", lambda t: ["run", str(t), "--out", str(t / "o.h5")], 2,
         "is a directory", ranks=2),
    Case("seed-negative", lambda t: ["validate", str(TINY), "--set", "seed=-1"], 2,
         "seed must be an integer in [0, 2**63)"),
    Case("seed-huge", lambda t: ["validate", str(TINY), "--set", "seed=100000000000000000000"],
         2, "seed must be an integer in [0, 2**63)"),
    Case("gpu-transfer-unknown",
         lambda t: ["validate", str(TINY), "--set", 'comm.gpu_transfer="nvlink"'], 2,
         "unknown comm.gpu_transfer 'nvlink'; choose one of: auto, direct, staged"),
    Case("device-unknown", lambda t: ["validate", str(TINY), "--set", 'device="gpu"'], 2,
         "unknown device 'gpu'; choose one of: auto, cpu, cuda"),
    Case("npy-not-npz", lambda t: _validate(_run_arrays(t, _npy(t))), 2, "not an .npz file"),
    Case("random-bytes-npz", lambda t: _validate(_run_arrays(t, _random_npz(t))), 2,
         "not a readable .npz"),
    Case("npz-members-not-arrays", lambda t: _validate(_run_arrays(t, _zip_npz(t))), 2,
         "x_train, y_train, x_test, y_test in it is not a .npy array"),
    Case("npz-n-train-too-large", lambda t: _validate(_run_arrays(t, _npz(t, n_train=100))), 2,
         "data.n_train = 512 but"),
    Case("npz-nan-features", lambda t: _run_arrays(t, _npz(t, x_train=_with(np.nan, 37, 5))),
         2, "x_train has a non-finite value at index (37, 5)", ranks=2),
    Case("npz-float32-overflow",
         lambda t: _validate(_run_arrays(t, _npz(t, x_train=_with(1e300, 2, 3)))), 2,
         "x_train has a non-finite value at index (2, 3)"),
    Case("validate-npz-nan", lambda t: _validate(_run_arrays(t, _npz(
         t, x_train=_with(np.nan, 1, 1)))), 2, "non-finite value at index (1, 1)"),
    Case("nonfinite-loss", lambda t: _run_arrays(t, _npz(t, x_train=_with(3e38))), 1,
         "non-finite training loss", ranks=2),
    Case("cifar-truncated-tarball", lambda t: _validate(_run_cifar(t, _truncated_tarball(t))),
         2, "truncated"),
    Case("cifar-label-out-of-range",
         lambda t: _validate(_run_cifar(t, _cifar(t, bad_label=True))), 2,
         "record 7 has label 12"),
    Case("suite-ranks-not-integers", lambda t: _suite(t, 'ranks = ["a"]'), 2,
         "ranks must be a list of integers >= 1"),
    Case("suite-ranks-zero", lambda t: _suite(t, "ranks = [0]"), 2,
         "ranks must be a list of integers >= 1"),
    Case("suite-negative-time-limit", lambda t: _suite(t, "time_limit_s = -1"), 2,
         "time_limit_s must be a positive number"),
    Case("out-under-proc", _proc_out, 2, "cannot create files in /proc", ranks=2),
    Case("latency-beyond-deadline", lambda t: ["run", str(TINY), "--set",
         "emulate.latency_s=8.8e9", "--out", str(t / "out.h5")], 2,
         "emulate.latency_s = 8.8e+09 s is not below comm.deadline_s = 600 s", ranks=2),
    Case("memory-n-train-huge", lambda t: ["validate", str(TINY), "--np", "4", "--set",
         "data.n_train=100000000"], 2, "data is the largest part (100,000,000 + 256 samples"),
    Case("memory-shape-huge", lambda t: ["validate", str(TINY), "--np", "4", "--set",
         "data.sample_shape=[3,100000,100000]"], 2, "this run needs about"),
    Case("memory-over-cap", lambda t: ["validate", str(TINY), "--max-memory", "1MiB"], 2,
         "is the limit given by --max-memory"),
    Case("run-memory-huge", lambda t: ["run", str(TINY), "--set", "data.n_train=1000000000000",
         "--out", str(t / "out.h5")], 2, "data is the largest part", ranks=2),
    Case("show-directory", lambda t: ["show", str(_bad_results(t))], 1,
         "is a directory, not a result file"),
    Case("show-hand-made", lambda t: ["show", str(_bad_results(t) / "hand.h5")], 1,
         "damaged result file: /rounds: missing"),
    Case("compare-only-bad-files", lambda t: ["compare", str(_bad_results(t))], 1,
         "skipped"),
    Case("report-only-bad-files", lambda t: ["report", str(_bad_results(t)), "--out",
         str(t / "rep")], 1, "(2 file(s) skipped, each for the reason above)"),
]  # fmt: skip


def _bad_results(tmp: Path) -> Path:
    """A directory with random bytes as ``x.h5`` and a hand-made file with a bad config and no
    groups as ``hand.h5``."""
    import h5py

    d = tmp / "results"
    if not d.exists():
        d.mkdir()
        (d / "x.h5").write_bytes(np.random.default_rng(2).bytes(5000))
        with h5py.File(d / "hand.h5", "w") as f:
            f.attrs.update(schema_version=1, status="complete", world_size=2)
            f.attrs["config_toml"] = "scheme = [unclosed"
    return d


def _npy(tmp: Path) -> Path:
    p = tmp / "data.npy"
    np.save(p, np.zeros((4, 16)))
    return p


def _random_npz(tmp: Path) -> Path:
    p = tmp / "data.npz"
    p.write_bytes(np.random.default_rng(1).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return p


def _zip_npz(tmp: Path) -> Path:
    """A zip with the four names but text inside, not .npy data."""
    import zipfile

    p = tmp / "data.npz"
    with zipfile.ZipFile(p, "w") as z:
        for key in ("x_train", "y_train", "x_test", "y_test"):
            z.writestr(f"{key}.npy", "not an array")
    return p


def _with(value: float, *index: int) -> np.ndarray:
    """Training features (600 x 16) with ``value`` at ``index`` (everywhere if none)."""
    x = np.random.default_rng(0).normal(size=(600, 16))
    if index:
        x[index] = value
    else:
        x[:] = value
    return x


def run_case(case: Case, tmp: Path, command: list[str] = COMMAND) -> tuple[int, str]:
    """Exit code and output of one case: under ``mpirun`` where it has ranks, else the
    command's ``main`` in this process (the same code a user's ``snake-mpi`` runs, without a
    Python start-up per case)."""
    args = case.build(tmp)
    if case.ranks:
        job = run_mpi(case.ranks, [*command, *args], timeout_s=120)
        return job.returncode, job.output
    import contextlib
    import io

    from snake_mpi.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(args)
        except SystemExit as e:  # argparse's usage errors
            code = e.code if isinstance(e.code, int) else 1
    return code, out.getvalue() + err.getvalue()


@pytest.mark.mpi
@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_bad_input_ends_with_its_exit_code_and_one_clear_line(case, tmp_path):
    code, output = run_case(case, tmp_path)
    assert code == case.code, output
    assert case.fragment in output, output
    assert "Traceback" not in output, output
    if code == 2:
        assert output.count(case.fragment) == 1, output  # one message, from one rank
        left = [p.name for p in tmp_path.rglob("out.h5*")]
        assert left == [], left


def test_a_non_finite_loss_stops_local_training_at_its_step():
    import torch

    from snake_mpi.config import ModelConfig, TrainConfig
    from snake_mpi.models import build_model
    from snake_mpi.train import NonFiniteLoss, train_local

    model = build_model(ModelConfig(family="mlp", width=8, middle_blocks=2), sample_shape=(4,),
                        n_classes=3, seed=0)  # fmt: skip
    x = torch.full((64, 4), float("nan"))
    y = torch.zeros(64, dtype=torch.int64)
    cfg = TrainConfig(local_epochs=1, batch_size=16, lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(NonFiniteLoss, match=r"non-finite training loss \(nan\) at step 0"):
        train_local(model, [0, 1, 2, 3], x, y, cfg=cfg, generator=torch.Generator())
    for a, b in zip(before, model.parameters(), strict=True):
        assert torch.equal(a, b)  # the step that would spread it was never taken


@pytest.mark.parametrize("scheme", ["snake", "split"])
def test_a_diverging_run_aborts_naming_rank_round_and_step(tmp_path, scheme):
    """In-process ranks: the abort message (``LocalComm.abort`` raises it) names them."""
    from snake_mpi.config import load_config
    from snake_mpi.run import execute
    from snake_mpi.transport.localcomm import ThreadWorld

    cfg = load_config(TINY, ["probes.enabled=false", f'scheme="{scheme}"', "train.lr=1e30"])
    with pytest.raises(RuntimeError, match=r"rank \d of 3: non-finite training loss .* at step "
                       r"\d+ of its turn in round \d of 3"):  # fmt: skip
        # the other ranks wait for the aborted one until their deadline: keep it short
        ThreadWorld(3).run(lambda c: execute(cfg, c, tmp_path / "d.h5"), deadline_s=3)


def test_an_emulated_hop_longer_than_the_deadline_is_an_error_not_a_sleep():
    """Found by the property test: a bandwidth that validation cannot judge (it depends on
    the payload) made a hop sleep for 280 years; the hop now fails at once."""
    import time

    from snake_mpi.transport.wire import CommStats, LinkModel, PeerTimeout, stretch

    link = LinkModel(bandwidth_bps=1.0, limit_s=600.0)
    t0 = time.perf_counter()
    with pytest.raises(PeerTimeout, match=r"link 0->1 would take 5376 s for 672 bytes, longer"):
        stretch(link, CommStats(), 0, 1, 672, time.perf_counter())
    assert time.perf_counter() - t0 < 1.0
