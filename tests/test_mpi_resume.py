"""Checkpoint and resume as real MPI jobs: for every scheme, a run killed after round k and
continued with ``--resume`` ends with the same models, byte counts, messages, losses and
accuracies as a run never interrupted, one row per round; a kill inside a checkpoint, a
damaged rank file, a checkpoint of another run, a complete result and SIGUSR1 are each met
as documented.

Kills of a rank other than 0 happen at least one round after the checkpoint the test expects
to resume from: rank 0 commits a checkpoint (writes its manifest) after the other ranks have
reported their files, so a rank killed at the very next round start may die before rank 0 has
committed it. The stop-flag agreement of the following round end orders the two.
"""

from __future__ import annotations

import re
import shutil
import signal
import subprocess
import threading
from pathlib import Path

import numpy as np
import psutil
import pytest

from conftest import (
    REPO,
    MpiRun,
    _is_open_mpi,
    _mpirun,
    mpi_command,
    mpi_env,
    mpi_run,
    run_mpi,
    snake_mpi,
)
from snake_mpi.checkpoint import EXIT_CHECKPOINTED, tensorfile
from snake_mpi.checkpoint import manifest as mf
from snake_mpi.record import EVAL_FIELDS, ROUND_FIELDS
from snake_mpi.store import partial_path, read_result

pytestmark = pytest.mark.mpi
TINY = REPO / "tests" / "configs" / "tiny.toml"
LM = REPO / "tests" / "configs" / "lm-tiny.toml"
ROUNDS = 5
EVERY = 2
BASE = (
    f"train.rounds={ROUNDS}",
    f"checkpoint.every={EVERY}",
    # tiny.toml's SGD stays at chance for 5 rounds: with Adam the accuracies compared move
    'train.optimizer="adam"',
    "train.lr=0.01",
)

MEASURED_ROUND_FIELDS = frozenset(
    {k for k in ROUND_FIELDS if k.endswith("_s") or k.startswith("gpu_")}
    | {"peak_rss_bytes", "disk_write_bytes", "host_cpu_energy_j"}
)
"""Timing, memory, disk and energy: measured, so they differ between any two runs. Every other
round field (bytes, messages, loss, samples, steps, model and train-state bytes, checkpoint
bytes, ...) must be equal."""
MEASURED_EVAL_FIELDS = frozenset({"wall_s"})
MEASURED_RANK_COLUMNS = frozenset(
    {
        "peak_rss_bytes",
        "ru_maxrss_bytes",
        "rss_before_model_bytes",
        "rss_model_built_bytes",
        "disk_write_bytes",
        # where the launcher put each rank: Open MPI numbers the ranks of a host by its own
        # mapping (a 3-rank job's local ranks are 0, 2, 1 here), not by the run
        "local_rank",
    }
)


# ------------------------------------------------------------------------------- helpers


def assert_same_run(got, want, *, skip_rounds: frozenset[str] = frozenset()) -> None:
    """``got`` (a resumed run) ends as ``want`` (never interrupted) did: every round field but
    the measured ones, every evaluation, the ranks' models and counts, the blocks, the arrays;
    one row per round."""
    assert got.attrs["status"] == "complete" == want.attrs["status"]
    assert got.world_size == want.world_size
    assert got.n_rounds == want.n_rounds
    shape = (want.n_rounds, want.world_size)
    compared = [k for k in ROUND_FIELDS if k not in MEASURED_ROUND_FIELDS | skip_rounds]
    for name in compared:
        assert got.rounds[name].shape == shape, (name, got.rounds[name].shape)
        np.testing.assert_array_equal(
            got.rounds[name], want.rounds[name], err_msg=f"/rounds/{name}"
        )
    for name in [*EVAL_FIELDS, "class_accuracy"]:
        if name not in MEASURED_EVAL_FIELDS and name in want.evaluation:
            np.testing.assert_array_equal(
                got.evaluation[name], want.evaluation[name], err_msg=f"/eval/{name}"
            )
    evals = got.evaluation["round"]
    assert len(evals) == len(set(evals.tolist())), evals  # no round evaluated twice
    ranks, want_ranks = got.tables["ranks"], want.tables["ranks"]
    assert set(ranks) == set(want_ranks)
    for name in sorted(set(ranks) - MEASURED_RANK_COLUMNS):
        np.testing.assert_array_equal(ranks[name], want_ranks[name], err_msg=f"/ranks/{name}")
    hashes = list(ranks["model_sha256"])
    assert all(len(h) == 64 for h in hashes), hashes
    for name, column in want.tables["blocks"].items():
        np.testing.assert_array_equal(got.tables["blocks"][name], column, err_msg=name)
    assert set(got.arrays) == set(want.arrays)
    for name, arr in want.arrays.items():
        np.testing.assert_array_equal(got.arrays[name], arr, err_msg=name)


def assert_attempts(res, rows: list[tuple[int, int]]) -> None:
    """``/attempts``: one row per attempt, ``(start_round, end_round)`` each."""
    a = res.tables["attempts"]
    assert list(a["attempt"]) == list(range(len(rows))), a
    assert list(zip(a["start_round"].tolist(), a["end_round"].tolist(), strict=True)) == rows, a
    assert list(a["resumed_from_round"]) == [start for start, _ in rows], a


def fault(rank: int, round_: int, kind: str = "kill") -> list[str]:
    return [f"debug.fail_rank={rank}", f"debug.fail_round={round_}", f"debug.fail_kind={kind}"]


def run(n: int, out: Path, sets, *extra: str, config: Path = TINY, timeout_s: float = 180):
    argv = snake_mpi("run", str(config), "--out", str(out), *extra)
    for s in sets:
        argv += ["--set", s]
    return run_mpi(n, argv, timeout_s=timeout_s)


def killed(tmp_path: Path, n: int, sets, rank: int, round_: int, *, config: Path = TINY) -> Path:
    """A run whose rank ``rank`` is SIGKILLed at the start of round ``round_`` (0-based): no
    result, a ``.partial`` holding ``round_`` rounds."""
    out = tmp_path / "r.h5"
    job = run(n, out, [*sets, *fault(rank, round_)], config=config)
    assert job.returncode != 0, job.output
    assert f"rank {rank}: injected SIGKILL" in job.stderr, job.output
    assert not out.exists()
    assert read_result(partial_path(out), allow_incomplete=True).n_rounds == round_
    return out


def resumed(n: int, out: Path, sets, rounds_done: int, *, config: Path = TINY, rounds=ROUNDS):
    """``--resume`` expected to continue after the checkpoint of ``rounds_done`` rounds and
    complete: the result, with no ``.partial`` or checkpoint left."""
    job = run(n, out, sets, "--resume", config=config)
    assert job.returncode == 0, job.output
    folder = mf.round_dir(ckpt_dir(out), rounds_done)
    assert f"resuming from {folder} ({rounds_done} of {rounds} rounds done)" in job.stdout
    assert f"round {rounds} of {rounds}" in job.stdout
    assert not partial_path(out).exists() and not ckpt_dir(out).exists()
    return job, read_result(out)


def ckpt_dir(out: Path) -> Path:
    return Path(f"{out}.ckpt")


def committed_rounds(out: Path) -> list[int]:
    return [k for k, _ in mf.committed(ckpt_dir(out))]


def carried_ranks(folder: Path, n: int) -> set[int]:
    """Ranks whose file in the checkpoint says it took in the next round's first hop."""
    metas = [tensorfile.read(folder / mf.rank_file(k))[1] for k in range(n)]
    return {k for k, meta in enumerate(metas) if meta["carried"] == "1"}


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (its bytes) and folder (None) under ``root``."""
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


BASELINE_RUNS: dict[tuple[str, int, tuple[str, ...]], MpiRun] = {}


def declare_baseline(n: int, sets, config: Path = TINY) -> None:
    """A run never interrupted, made by the session's shared MPI job (declared when this
    module is imported, so that they all share its one launch)."""
    BASELINE_RUNS[str(config), n, tuple(sets)] = mpi_run(n, config, *sets)


@pytest.fixture(scope="module")
def baseline(mpi_runs):
    """``get(n, sets, config)``: the result of that run never interrupted; it removed its
    checkpoints on completing."""

    def get(n: int, sets, config: Path = TINY):
        made = mpi_runs(BASELINE_RUNS[str(config), n, tuple(sets)])
        assert not ckpt_dir(made.path).exists() and not partial_path(made.path).exists()
        res = made.result
        assert_attempts(res, [(0, res.n_rounds)])
        return res

    return get


# ----------------------------------------------------------------- every scheme, killed


SCHEMES = {
    # name: (ranks, sets, killed rank, killed at round, ranks that carried a hop in)
    "snake-p2p": (3, ['scheme="snake"'], 1, 3, {0}),  # node 0 took in the wrap hop
    "snake-p2p-keep-own": (4, ['snake.keep="own"'], 0, 3, {0}),  # the node that carried
    "fedavg": (3, ['scheme="fedavg"'], 0, 2, set()),  # the server, right after its checkpoint
    "split": (3, ['scheme="split"'], 2, 3, {1}),  # client 1 took in the relay
}
"""Killed by a real SIGKILL under mpirun. Snake CS, SplitFed and centralised are killed and
resumed with ranks as threads (tests/test_checkpoint.py), as every scheme is there."""
for _n, _sets, *_ in SCHEMES.values():
    declare_baseline(_n, [*BASE, *_sets])
declare_baseline(3, [*BASE, 'scheme="snake"'])


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_a_killed_run_resumed_ends_as_the_run_never_interrupted(tmp_path, baseline, scheme):
    n, extra, rank, round_, carried = SCHEMES[scheme]
    sets = [*BASE, *extra]
    want = baseline(n, sets)
    out = killed(tmp_path, n, sets, rank, round_)
    ckpt = round_ // EVERY * EVERY
    assert committed_rounds(out)[0] == ckpt
    assert carried_ranks(mf.round_dir(ckpt_dir(out), ckpt), n) == carried
    _, got = resumed(n, out, sets, ckpt)
    assert_same_run(got, want)
    assert_attempts(got, [(0, round_), (ckpt, ROUNDS)])


# --------------------------------------------------------- kill inside a checkpoint write


def test_a_kill_inside_a_checkpoint_write_resumes_from_the_one_before(tmp_path, baseline):
    """Rank 1 dies inside the checkpoint after round 4 (its file written under the temporary
    name): that checkpoint is never committed; a resume uses the one after round 2 and removes
    the half-written folder (seen once a second attempt is killed before any checkpoint), and
    the third attempt ends as the uninterrupted run."""
    n, sets = 3, [*BASE, 'scheme="snake"']
    want = baseline(n, sets)
    out = tmp_path / "r.h5"
    job = run(n, out, [*sets, *fault(1, 3, "kill_in_checkpoint")])
    assert job.returncode != 0, job.output
    assert "rank 1: injected SIGKILL inside the checkpoint after round 4" in job.stderr
    stale = mf.round_dir(ckpt_dir(out), 4)
    assert not (stale / mf.MANIFEST).exists()
    assert (stale / (mf.rank_file(1) + ".tmp")).is_file()
    assert not (stale / mf.rank_file(1)).exists()
    assert committed_rounds(out) == [2]
    assert read_result(partial_path(out), allow_incomplete=True).n_rounds == 4

    job = run(n, out, [*sets, *fault(0, 3)], "--resume")  # dies before any new checkpoint
    assert job.returncode != 0 and "rank 0: injected SIGKILL" in job.stderr, job.output
    assert f"resuming from {mf.round_dir(ckpt_dir(out), 2)} (2 of 5" in job.stdout
    assert f"removed the unfinished checkpoint folder (no manifest) {stale}" in job.stdout
    assert not stale.exists()
    assert [k for k, _ in mf.round_dirs(ckpt_dir(out))] == [2]

    _, got = resumed(n, out, sets, 2)
    assert_same_run(got, want)
    a = got.tables["attempts"]
    # every attempt, the second too although it committed no checkpoint (the .partial lists
    # the attempts from each one's start): rounds 0-4, then 2-3 (killed at round 4's start)
    assert a["attempt"].tolist() == [0, 1, 2]
    assert a["start_round"].tolist() == [0, 2, 2]
    assert a["end_round"].tolist() == [4, 3, 5]
    assert a["resumed_from_round"].tolist() == [0, 2, 2]


# ------------------------------------------------------------------ another run's checkpoint


def test_a_checkpoint_of_another_config_or_world_size_is_refused_and_left_alone(tmp_path):
    n, sets = 3, [*BASE, 'scheme="snake"']
    out = killed(tmp_path, n, sets, 1, 3)
    before = snapshot(tmp_path)
    assert str(partial_path(out).relative_to(tmp_path)) in before

    job = run(n, out, [*sets, "train.lr=0.02"], "--resume", timeout_s=90)
    assert job.returncode == 2, job.output
    assert job.stderr.count("config error") == 1, job.stderr
    assert "train.lr = 0.01 in the checkpoint, 0.02 now" in job.stderr, job.stderr
    assert snapshot(tmp_path) == before

    job = run(2, out, sets, "--resume", timeout_s=90)
    assert job.returncode == 2, job.output
    assert job.stderr.count("config error") == 1, job.stderr
    assert "taken on 3 ranks, this run has 2" in job.stderr, job.stderr
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------ a damaged file


def test_a_damaged_rank_file_skips_that_checkpoint_for_the_one_before(tmp_path, baseline):
    n, sets = 3, [*BASE, 'scheme="snake"']
    want = baseline(n, sets)
    out = killed(tmp_path, n, sets, 0, 4)
    assert committed_rounds(out) == [4, 2]  # checkpoint.keep = 2
    damaged = mf.round_dir(ckpt_dir(out), 4) / mf.rank_file(2)
    raw = bytearray(damaged.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(b ^ 0xFF for b in raw[len(raw) // 2 :][:8])
    damaged.write_bytes(bytes(raw))

    # what may change on resume does not count: the deadline, the probes (and debug.*)
    allowed = [*sets, "comm.deadline_s=300", "probes.interval_s=0.2"]
    job, got = resumed(n, out, allowed, 2)
    line = next(x for x in job.stderr.splitlines() if "skipped" in x)
    assert f"rank 2: checkpoint {damaged.parent} skipped" in line, job.stderr
    assert str(damaged) in line and "SHA-256" in line, line
    assert_same_run(got, want)
    assert_attempts(got, [(0, 4), (2, ROUNDS)])


# ------------------------------------------------------------- nothing to resume, or done


def test_resume_of_a_complete_result_changes_nothing(tmp_path, baseline):
    n, sets = 3, [*BASE, 'scheme="snake"']
    out = tmp_path / "r.h5"
    shutil.copyfile(baseline(n, sets).path, out)
    before = snapshot(tmp_path)
    job = run(n, out, sets, "--resume", timeout_s=90)
    assert job.returncode == 0, job.output
    assert f"{out} is complete already" in job.stdout, job.output
    assert "round 1 of" not in job.stdout
    assert snapshot(tmp_path) == before


def test_resume_with_no_checkpoint_starts_at_round_one(tmp_path, baseline):
    n, sets = 3, [*BASE, 'scheme="snake"']
    out = tmp_path / "r.h5"
    job = run(n, out, sets, "--resume")
    assert job.returncode == 0, job.output
    assert f"no usable checkpoint in {ckpt_dir(out)}: starting at round 1" in job.stdout
    assert not ckpt_dir(out).exists() and not partial_path(out).exists()
    got = read_result(out)
    assert_same_run(got, baseline(n, sets))
    assert_attempts(got, [(0, ROUNDS)])


# -------------------------------------------------------------------------------- SIGUSR1

SLOW_ROUNDS = 8
SLOW = (
    f"train.rounds={SLOW_ROUNDS}",
    "checkpoint.every=100",  # no periodic checkpoint: only the one SIGUSR1 asks for
    "emulate.latency_s=0.2",  # 3 hops a round: rounds long enough to signal one mid-run
    'scheme="snake"',
)


declare_baseline(3, [*SLOW, 'train.optimizer="adam"', "train.lr=0.01"])


def run_signalled(n: int, argv: list[str], target: str, timeout_s: float = 180):
    """Run ``argv`` on ``n`` ranks; once rank 0 reports a round, send SIGUSR1 to every rank
    (``target = "ranks"``) or to the launcher only (``"launcher"``). Returns the exit status,
    stdout and stderr."""
    proc = subprocess.Popen(
        mpi_command(n, argv),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=mpi_env(),
        cwd=REPO,
        start_new_session=True,
    )
    out_lines: list[str] = []
    err_lines: list[str] = []
    started = threading.Event()

    def read(stream, into, watch: bool) -> None:
        for line in stream:
            into.append(line)
            if watch and re.match(r"snake-mpi: round \d+ of", line):
                started.set()
        started.set()  # the stream ended: do not wait any longer

    readers = [
        threading.Thread(target=read, args=(proc.stdout, out_lines, True), daemon=True),
        threading.Thread(target=read, args=(proc.stderr, err_lines, False), daemon=True),
    ]
    for t in readers:
        t.start()
    try:
        assert started.wait(timeout_s), "no round reported"
        if proc.poll() is None:
            if target == "launcher":  # Open MPI's mpirun execs prterun: this very process
                psutil.Process(proc.pid).send_signal(signal.SIGUSR1)
            else:
                ranks = [
                    p
                    for p in psutil.Process(proc.pid).children(recursive=True)
                    if "snake-mpi" in " ".join(p.cmdline())
                ]
                assert len(ranks) == n, [p.cmdline() for p in ranks]
                for p in ranks:
                    p.send_signal(signal.SIGUSR1)
        rc = proc.wait(timeout=timeout_s)
    except BaseException:
        from snake_mpi.proctree import end_job

        end_job(proc, grace_s=1.0)
        raise
    finally:
        for t in readers:
            t.join(timeout=10)
    return rc, "".join(out_lines), "".join(err_lines)


def stopped_after(rc: int, stdout: str, stderr: str) -> int:
    """The rounds done when a run stopped on SIGUSR1 (exit ``EXIT_CHECKPOINTED``: mpirun
    returns the ranks' 75)."""
    assert rc == EXIT_CHECKPOINTED, (rc, stdout, stderr)
    stop = re.search(rf"stopped on request after round (\d+) of {SLOW_ROUNDS}: checkpoint", stdout)
    assert stop, stdout + stderr
    return int(stop.group(1))


def test_sigusr1_checkpoints_exits_75_and_the_resumes_end_as_the_run_never_stopped(
    tmp_path, baseline
):
    """Attempt 0 gets SIGUSR1 on every rank, attempt 1 (resumed) on the launcher only (Open
    MPI's forwards it to the ranks), attempt 2 completes: each stop commits a checkpoint at
    the next round end and exits 75, and the result is the uninterrupted run's."""
    n, sets = 3, [*SLOW, 'train.optimizer="adam"', "train.lr=0.01"]
    want = baseline(n, sets)
    out = tmp_path / "r.h5"
    argv = snake_mpi("run", str(TINY), "--out", str(out))
    for s in sets:
        argv += ["--set", s]

    k1 = stopped_after(*run_signalled(n, argv, "ranks"))
    assert 1 <= k1 < SLOW_ROUNDS
    assert not out.exists() and committed_rounds(out) == [k1]
    assert read_result(partial_path(out), allow_incomplete=True).n_rounds == k1

    launcher = "launcher" if _is_open_mpi(_mpirun() or "mpirun") else "ranks"
    rc, stdout, stderr = run_signalled(n, [*argv, "--resume"], launcher)
    assert f"resuming from {mf.round_dir(ckpt_dir(out), k1)} ({k1} of" in stdout, stdout
    k2 = stopped_after(rc, stdout, stderr)
    assert k1 < k2 < SLOW_ROUNDS
    assert not out.exists() and committed_rounds(out) == [k2, k1]
    assert read_result(partial_path(out), allow_incomplete=True).n_rounds == k2

    _, got = resumed(n, out, sets, k2, rounds=SLOW_ROUNDS)
    # checkpoint_bytes differs where it should: the checkpoints SIGUSR1 asked for
    assert_same_run(got, want, skip_rounds=frozenset({"checkpoint_bytes"}))
    cb = got.rounds["checkpoint_bytes"]
    assert (cb[[k1, k2]] > 0).all() and not np.delete(cb, [k1, k2], axis=0).any(), cb
    assert not want.rounds["checkpoint_bytes"].any()
    assert_attempts(got, [(0, k1), (k1, k2), (k2, SLOW_ROUNDS)])


# ------------------------------------------------------------------------ language models


LM_SETS = ["train.rounds=3", "checkpoint.every=1", 'model.dtype="bfloat16"']
declare_baseline(2, LM_SETS, LM)


def test_a_language_model_killed_and_resumed_ends_identical(tmp_path, baseline):
    """OPT-shaped (its embedding tied to the head) in bfloat16: the checkpoint keeps its
    tensors as bfloat16 words."""
    pytest.importorskip("transformers")
    n, sets = 2, LM_SETS
    want = baseline(n, sets, LM)
    out = killed(tmp_path, n, sets, 0, 2, config=LM)
    assert committed_rounds(out) == [2, 1]
    _, bf16 = tensorfile.read(mf.round_dir(ckpt_dir(out), 2) / mf.rank_file(1))[1:]
    assert bf16 and all(name.startswith("block.") for name in bf16), bf16
    _, got = resumed(n, out, sets, 2, config=LM, rounds=3)
    assert_same_run(got, want)
    assert np.isfinite(got.evaluation["perplexity"]).all()
    assert len(set(got.tables["ranks"]["model_sha256"])) == 1  # the final sync
    assert_attempts(got, [(0, 2), (2, 3)])
