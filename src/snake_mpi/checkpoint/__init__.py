"""Checkpoint and resume: every scheme takes a checkpoint at a round boundary, and a run given
``--resume`` continues after the newest complete one, ending bit-identical to a run that was
never interrupted.

A checkpoint after round ``k`` (``k`` rounds done) is the folder ``DIR/round-00000k``: every
rank writes its file (``state.capture``; safetensors layout, temporary name, fsync, rename),
reports name, size and SHA-256 to rank 0, and rank 0 writes ``manifest.json`` last: the
commit point. A hop that crosses the round boundary (Snake P2P's last node to node 0, split
learning's last client to client 1) is received before the receiver writes its file, so
nothing is in flight. On SIGUSR1 (Slurm's ``--signal``) a handler only sets a flag; the ranks
agree on it at the next round end, checkpoint, and exit with ``EXIT_CHECKPOINTED``.

The checkpoint's coordination (the flag agreement each round, the reports to rank 0) is not
counted in ``control_bytes_sent``: it is the tool's, not the scheme's.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from snake_mpi.checkpoint import manifest as mf
from snake_mpi.checkpoint import state, tensorfile
from snake_mpi.config import ConfigError, RunConfig, to_toml

if TYPE_CHECKING:
    from snake_mpi.context import Context
    from snake_mpi.transport.protocol import Communicator

EXIT_CHECKPOINTED = 75
"""Exit status of every rank after a checkpoint taken on SIGUSR1 (``EX_TEMPFAIL``: try again);
``slurm/run.sbatch`` requeues the job on it."""

_STOP = threading.Event()


class CheckpointStop(Exception):
    """Raised on every rank once the checkpoint the stop signal asked for is committed."""

    def __init__(self, rounds_done: int, folder: Path) -> None:
        super().__init__(f"checkpoint after round {rounds_done} committed in {folder}")
        self.rounds_done = rounds_done
        self.folder = folder


def install_stop_handler(signum: int = signal.SIGUSR1) -> None:
    """On ``signum`` only set a flag (no I/O in a handler); the next round end acts on it."""
    signal.signal(signum, lambda _s, _f: _STOP.set())


def request_stop() -> None:
    """What the handler does (tests call it directly)."""
    _STOP.set()


def stop_requested() -> bool:
    return _STOP.is_set()


@dataclass
class ResumePoint:
    """The checkpoint a run resumes from, as this rank read it."""

    folder: Path
    rounds_done: int
    manifest: dict[str, Any]
    arrays: dict[str, np.ndarray]
    meta: dict[str, str]
    bf16: frozenset[str]
    rows: Any = None
    """Rank 0: the result's rounds and evaluations so far (``store.Result`` of the .partial)."""

    @property
    def carried(self) -> bool:
        """Whether this rank had received the next round's first hop when it checkpointed."""
        return self.meta.get("carried") == "1"

    def own_entry(self, rank: int) -> dict[str, Any]:
        return next(e for e in self.manifest["files"] if int(e["rank"]) == rank)


@dataclass
class Checkpointer:
    """The checkpoints of one run on one rank: ``run.execute`` calls ``restore`` before the
    scheme runs; the scheme starts at ``first_round`` and calls ``boundary`` after every
    round."""

    cfg: RunConfig | None = None
    directory: Path | None = None
    resume: ResumePoint | None = None
    attempts: list[dict[str, Any]] = field(default_factory=list)
    """Earlier attempts of this run (from the manifest), and this one last."""
    first_round: int = 0
    """The round this attempt starts with (after ``restore``: the checkpoint's rounds)."""
    _carried: int = -1

    @property
    def every(self) -> int:
        return self.cfg.checkpoint.every if self.cfg is not None and self.directory else 0

    def carried_in(self, r: int) -> bool:
        """Whether the hop that round ``r + 1`` starts with was received at round ``r``'s
        checkpoint (so the scheme must not receive it again)."""
        return self._carried == r

    def restore(self, ctx: Context) -> int:
        """Put this rank's checkpointed state back into a model built from the config and
        seed, before the scheme runs; returns (and keeps in ``first_round``) the first round
        to run (0 without a checkpoint)."""
        p = self.resume
        if p is None:
            return 0
        state.restore(ctx, p.arrays, p.meta, p.bf16)
        if p.carried:
            self._carried = p.rounds_done - 1
        entry = p.own_entry(ctx.comm.rank)
        ctx.record.checkpointed(float(entry.get("write_s", 0.0)), int(entry["bytes"]))
        p.arrays = {}  # the tensors are in the model now
        self.first_round = p.rounds_done
        return p.rounds_done

    def boundary(self, ctx: Context, r: int, carry_in: Callable[[], Any] | None = None) -> None:
        """After round ``r``: agree on the stop flag, and take a checkpoint when one is due
        (every ``checkpoint.every`` rounds, or asked for by signal; never after the last
        round). ``carry_in``: on the rank whose next round starts with a hop received from
        a peer, that receive (done now, before this rank writes its file)."""
        if self.every <= 0 or r >= ctx.cfg.train.rounds - 1:
            return
        t0 = time.perf_counter()
        stop = self._agree_stop(ctx.comm)
        # the agreement extends the round-end gather: its wait is for the slowest rank
        ctx.record.waited_at_round_end(time.perf_counter() - t0)
        if not stop and (r + 1) % self.every:
            return
        t0 = time.perf_counter()
        carry_s = 0.0
        if carry_in is not None:  # its seconds are the receive's (wait_s, recv_s)
            t1 = time.perf_counter()
            carry_in()
            carry_s = time.perf_counter() - t1
            self._carried = r
        folder, nbytes = self.write(ctx, r + 1, carried=carry_in is not None)
        ctx.record.checkpointed(time.perf_counter() - t0 - carry_s, nbytes)
        if stop:
            raise CheckpointStop(r + 1, folder)

    def _agree_stop(self, comm: Communicator) -> bool:
        before = comm.stats.control_bytes_sent
        table = comm.allgather_row(np.array([float(stop_requested())]), "the stop flag")
        comm.stats.control_bytes_sent = before
        return bool(table.any())

    def write(self, ctx: Context, rounds_done: int, *, carried: bool) -> tuple[Path, int]:
        """This rank's file of the checkpoint after ``rounds_done`` rounds (returns the folder
        and the file's bytes); rank 0 commits it once every rank has reported its file, and
        prunes old ones."""
        assert self.directory is not None and self.cfg is not None
        comm, rank = ctx.comm, ctx.comm.rank
        t0 = time.perf_counter()
        folder = mf.round_dir(self.directory, rounds_done)
        folder.mkdir(parents=True, exist_ok=True)
        arrays, meta, bf16 = state.capture(ctx, carried)
        d = self.cfg.debug
        hook = None
        ours = d.fail_rank == rank and d.fail_round == rounds_done - 1
        if ours and d.fail_kind == "kill_in_checkpoint":
            hook = _kill_now(rank, rounds_done)
        nbytes, sha = tensorfile.write(
            folder / mf.rank_file(rank), arrays, meta, bf16=frozenset(bf16), before_rename=hook
        )
        write_s = time.perf_counter() - t0
        before = comm.stats.control_bytes_sent
        table = comm.gather_row(np.array([nbytes, write_s], dtype=np.float64), "checkpoint files")
        shas = comm.gather_str(sha, max_bytes=64)
        comm.stats.control_bytes_sent = before
        if table is not None and shas is not None:
            files = [
                {
                    "rank": k,
                    "name": mf.rank_file(k),
                    "bytes": int(table[k, 0]),
                    "sha256": shas[k],
                    "write_s": float(table[k, 1]),
                }
                for k in range(comm.size)
            ]
            mf.write_manifest(folder, self._manifest(ctx, rounds_done, files))
            mf.prune(self.directory, self.cfg.checkpoint.keep)
            total = float(table[:, 0].sum())
            if ctx.record.progress:
                print(
                    f"snake-mpi: checkpoint after round {rounds_done} of {ctx.cfg.train.rounds}: "
                    f"{folder} ({total / 2**20:.2f} MiB in {len(files)} files, "
                    f"{time.perf_counter() - t0:.2f} s)",
                    flush=True,
                )
        return folder, nbytes

    def _manifest(self, ctx: Context, rounds_done: int, files: list[dict]) -> dict[str, Any]:
        attempts = [dict(a) for a in self.attempts]
        if attempts:
            attempts[-1]["end_round"] = rounds_done
        return {
            "format": mf.FORMAT,
            "rounds_done": rounds_done,
            "rounds": ctx.cfg.train.rounds,
            "world_size": ctx.comm.size,
            "scheme": ctx.cfg.scheme,
            "config_toml": to_toml(ctx.cfg),
            "files": files,
            "attempts": attempts,
            "created_unix_s": time.time(),
        }


def _kill_now(rank: int, rounds_done: int) -> Callable[[], None]:
    def kill() -> None:
        sys.stderr.write(
            f"snake-mpi: rank {rank}: injected SIGKILL inside the checkpoint after round "
            f"{rounds_done} (debug.fail_kind = kill_in_checkpoint)\n"
        )
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    return kill


def attempt_record(first_round: int, resumed_from: int) -> dict[str, Any]:
    """This attempt of the run: Slurm's job id and restart count where it runs under Slurm."""
    env = os.environ
    return {
        "attempt": 0,
        "slurm_job_id": env.get("SLURM_JOB_ID", ""),
        "slurm_restart_count": int(env.get("SLURM_RESTART_COUNT", "0") or 0),
        "start_round": first_round,
        "end_round": first_round,
        "resumed_from_round": resumed_from,
        "started_unix_s": time.time(),
    }


def find_resume(
    directory: Path,
    cfg: RunConfig,
    world_size: int,
    rank: int,
    agree: Callable[[int], list[int]],
    *,
    partial: Path | None,
    say: Callable[[str], None],
) -> ResumePoint | None:
    """The newest checkpoint every rank can use, or None (start from round 0).

    Collective: every rank calls it with the same directory. A checkpoint of another config or
    world size raises ``ConfigError`` (the newest one decides); one whose manifest is missing
    or damaged, or whose file on some rank does not match the manifest, or (rank 0) that the
    ``.partial`` result lacks rounds for, is skipped with a message naming it."""
    candidates = mf.committed(directory)
    counts = agree(len(candidates))
    if len(set(counts)) > 1:
        raise ConfigError(
            f"the ranks see different checkpoints in {directory} ({counts}): it must be on a "
            "file system every rank shares"
        )
    checked_config = False
    for _, folder in candidates:
        why, refused, point = None, None, None
        try:
            m: dict[str, Any] | None = mf.read_manifest(folder)
        except ValueError as e:
            why, m = str(e), None
        if m is not None and not checked_config:
            checked_config = True  # the newest readable manifest decides
            try:
                mf.check_same_run(m, folder, cfg, world_size)
            except ConfigError as e:
                refused = str(e)
        if m is not None and refused is None:
            why = mf.check_rank_file(m, folder, rank)
            if why is None:
                try:
                    arrays, meta, bf16 = tensorfile.read(folder / mf.rank_file(rank))
                    point = ResumePoint(folder, int(m["rounds_done"]), m, arrays, meta, bf16)
                except (tensorfile.TensorFileError, KeyError, ValueError) as e:
                    why = str(e)
            if why is None and rank == 0 and point is not None:
                point.rows, why = _rows_of(partial, point.rounds_done)
        if why is not None and refused is None:
            who = "" if rank == 0 else f"rank {rank}: "
            say(f"{who}checkpoint {folder} skipped: {why}")
        codes = agree(2 if refused else 0 if why is None else 1)
        if 2 in codes:
            raise ConfigError(refused or "another rank found the checkpoint is of another run")
        if not any(codes):
            return point
    return None


def _rows_of(partial: Path | None, rounds_done: int) -> tuple[Any, str | None]:
    """The ``.partial`` result read for its first ``rounds_done`` rounds, or why not."""
    from snake_mpi.store import ResultError, read_result

    if partial is None or not partial.exists():
        return None, f"the result it belongs to ({partial}) is gone"
    try:
        res = read_result(partial, allow_incomplete=True)
    except ResultError as e:
        return None, f"the result {partial} cannot be read ({e})"
    if any(where.startswith(("rounds", "eval")) for where, _ in res.unreadable):
        return None, f"the rounds of {partial} cannot all be read"
    if res.n_rounds < rounds_done:
        return None, f"{partial} holds {res.n_rounds} rounds, the checkpoint {rounds_done}"
    return res, None
