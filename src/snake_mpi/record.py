"""Per-round, per-rank metrics: collected on each rank, gathered to rank 0 after every round,
and appended there to the result file (``store.py`` does the writing).

A scheme marks round boundaries (``begin_round``/``end_round``), adds compute and evaluation
figures; communication counters come from the communicator (``transport.protocol``) and
memory/disk from the probes.
"""

from __future__ import annotations

import math
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from snake_mpi import schema
from snake_mpi.blocks import BlockModel, model_bytes_held
from snake_mpi.config import DebugConfig
from snake_mpi.probes import RoundProbe
from snake_mpi.transport.protocol import Communicator

STEP_PROGRESS_S = 30.0
"""A turn longer than this prints a progress line (steps done, elapsed) this often."""

ROUND_FIELDS: dict[str, str] = schema.dtypes(schema.ROUNDS)
"""Datasets ``/rounds/<name>`` -> dtype, shape (n_rounds, world_size): ``schema.ROUNDS``. The
GPU and energy figures are float64 so that NaN can say "unavailable"."""

_UNSET = {m.name: m.unset for m in schema.ROUNDS if m.unset != 0.0}
"""Figures whose value in a round nothing set is not 0 (NaN: not measured, not trained)."""

(CLASS_ACCURACY,) = (m.name for m in schema.EVAL if m.columns == "n_classes")
"""``/eval/class_accuracy``, shape (n_evals, n_classes): test accuracy on each class, for
classifiers only (a language model's "classes" are its vocabulary: the dataset is absent)."""

EVAL_FIELDS: dict[str, str] = schema.dtypes(schema.EVAL, one_per_row=True)
"""Datasets ``/eval/<name>``, shape (n_evals,): ``schema.EVAL`` less its per-class columns."""

_EVAL_SLOTS = ("eval_accuracy", "eval_loss", "eval_wall_s")
_ADDITIVE = tuple(m.name for m in schema.ROUNDS if m.additive)


def eval_layout(n_classes: int) -> tuple[dict[str, str], dict[str, int]]:
    """The ``/eval`` datasets of a run with ``n_classes`` classes (0: a language model, no
    per-class figures) as ``ResultWriter`` takes them: dtypes, and widths of the 2-D ones."""
    if n_classes <= 0:
        return dict(EVAL_FIELDS), {}
    return schema.dtypes(schema.EVAL), {CLASS_ACCURACY: n_classes}


class InjectedFault(RuntimeError):
    """Raised by the test-only ``[debug]`` hook."""


class Recorder:
    """Metrics of this rank for the current round; rank 0 also appends everyone's to the file."""

    def __init__(
        self,
        *,
        comm: Communicator,
        model: BlockModel,
        probes: Sequence[RoundProbe],
        writer: Any | None,
        debug: DebugConfig,
        n_rounds: int,
        progress: bool = True,
        perplexity: bool = False,
        step_progress_s: float = STEP_PROGRESS_S,
        n_classes: int = 0,
    ) -> None:
        self.comm = comm
        self.model = model
        self.probes = tuple(probes)
        """Probes whose round figures (``ROUND_FIELDS`` names) each round takes, in this order
        (e.g. memory, storage, and where measured the GPU and the host's energy); a figure no
        probe gives keeps its default (NaN for the GPU and energy figures)."""
        self.writer = writer
        self.debug = debug
        self.n_rounds = n_rounds
        self.progress = progress
        self.step_progress_s = step_progress_s
        """Seconds into a turn before the first step-progress line, and between lines."""
        self.show_perplexity = perplexity
        self.n_classes = max(0, n_classes)
        """Classes of a classifier, whose per-class test accuracy each evaluation records
        (``/eval/class_accuracy``); 0: none (a language model)."""
        self.last_evaluation: dict[str, Any] | None = None
        self.round = -1
        self.n_rounds_written = 0
        self.cum_bytes_sent = 0
        self.t_start = time.perf_counter()
        self._t_round = self.t_start
        self._t_closed: float | None = None
        """When the previous round's figures were taken (its gather came after)."""
        self._gather_s = 0.0
        """Seconds in the previous round's gather: counted in the next round, not lost."""
        self._values: dict[str, float] = {}
        self._open = False
        self._carried: dict[str, float] = {}
        """Additive figures from between rounds (a hop received at a checkpoint): counted in
        the next round, as its bytes and seconds in ``comm.stats`` are."""
        self._class_accuracy = np.full(self.n_classes, np.nan)
        self._checkpoint = (0.0, 0)
        """Seconds and file bytes of the checkpoint taken after the previous round (it falls
        in the next round's time, as the gather does)."""

    # ------------------------------------------------------------ during a round

    def begin_round(self, r: int) -> None:
        """Start round ``r``: reset this rank's figures; fire the test fault hook if it is ours."""
        self.round = r
        # rounds tile the time: this one starts where the last one's figures were taken, so
        # the wait in that round's gather (rank 0 waiting for the slowest rank) is counted
        self._t_round = self._t_closed if self._t_closed is not None else time.perf_counter()
        self._values = dict.fromkeys(ROUND_FIELDS, 0.0)
        self._values["gather_s"] = self._gather_s
        self._values["checkpoint_s"], self._values["checkpoint_bytes"] = self._checkpoint
        self._checkpoint = (0.0, 0)
        for k, value in self._carried.items():
            self._values[k] += value
        self._carried = {}
        self._open = True
        self._values.update(_UNSET)
        for k in _EVAL_SLOTS:
            self._values[k] = math.nan
        self._class_accuracy = np.full(self.n_classes, np.nan)
        for probe in self.probes:
            probe.begin_round()
        d = self.debug
        if d.fail_rank == self.comm.rank and d.fail_round == r:
            self._inject(d.fail_kind)

    def _inject(self, kind: str) -> None:
        where = f"debug.fail_rank = {self.comm.rank}, round {self.round}"
        if kind == "exception":
            raise InjectedFault(f"injected fault ({where})")
        if kind == "exit":
            sys.stderr.write(f"snake-mpi: rank {self.comm.rank}: injected sys.exit(3) ({where})\n")
            sys.exit(3)
        if kind == "kill":  # as the OOM killer or a node failure would: no handler runs
            sys.stderr.write(f"snake-mpi: rank {self.comm.rank}: injected SIGKILL ({where})\n")
            sys.stderr.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        if kind == "hang":
            sys.stderr.write(f"snake-mpi: rank {self.comm.rank}: injected hang ({where})\n")
            sys.stderr.flush()
            while True:
                time.sleep(3600)

    def add(self, name: str, value: float) -> None:
        """Accumulate an additive figure (compute_s, eval_s, pack_s, samples, steps); between
        rounds, into the next round."""
        if name not in _ADDITIVE:
            raise KeyError(f"{name!r} is not an additive round field")
        if not self._open:
            self._carried[name] = self._carried.get(name, 0.0) + value
            return
        self._values[name] += value

    def trained(
        self,
        *,
        loss: float,
        trainable_params: int,
        train_state_bytes: int,
        kd_loss: float = math.nan,
    ) -> None:
        """Record the outcome of this rank's local training in the round."""
        self._values["loss"] = loss
        self._values["kd_loss"] = kd_loss
        self._values["trainable_params"] = trainable_params
        self._values["train_state_bytes"] = train_state_bytes

    def evaluated(
        self, *, accuracy: float, loss: float, class_accuracy: np.ndarray | None = None
    ) -> None:
        """Record an evaluation of the model as it stands after this rank's turn (with
        ``n_classes``, its accuracy per class: NaN where not given)."""
        self._values["eval_accuracy"] = accuracy
        self._values["eval_loss"] = loss
        self._values["eval_wall_s"] = time.perf_counter() - self.t_start
        if class_accuracy is not None and self.n_classes:
            per_class = np.asarray(class_accuracy, dtype=np.float64)
            if per_class.shape != (self.n_classes,):
                raise ValueError(
                    f"class_accuracy has shape {per_class.shape}, expected ({self.n_classes},)"
                )
            self._class_accuracy = per_class

    def turn_evaluated(self, accuracy: float) -> None:
        """Record the test accuracy of the model right after this rank's training turn
        (``eval.after_each_turn``): ``/rounds/turn_accuracy``."""
        self._values["turn_accuracy"] = accuracy

    def checkpointed(self, seconds: float, nbytes: int) -> None:
        """A checkpoint was taken after the round just closed: ``seconds`` on this rank (its
        file, and on rank 0 the manifest), ``nbytes`` its file; recorded in the next round."""
        self._checkpoint = (seconds, nbytes)

    def waited_at_round_end(self, seconds: float) -> None:
        """Seconds spent after the round's gather waiting for every rank again (the checkpoint
        stop-flag agreement): counted with the gather, in the next round's ``gather_s``."""
        self._gather_s += seconds

    def elapsed_s(self) -> float:
        """Seconds since the run started (across attempts once resumed)."""
        return time.perf_counter() - self.t_start

    def resume(self, *, cum_bytes_sent: int, n_rounds_written: int, elapsed_s: float) -> None:
        """Continue the running totals of an earlier attempt (from its checkpoint)."""
        self.cum_bytes_sent = cum_bytes_sent
        self.n_rounds_written = n_rounds_written
        self.t_start = time.perf_counter() - elapsed_s
        self.round = n_rounds_written - 1

    # ------------------------------------------------------------ round end

    def end_round(self) -> None:
        """Close the round: fold in comm and probe figures, gather to rank 0, append there."""
        v = self._values
        self._open = False
        v.update(self.comm.stats.take())
        for probe in self.probes:
            figures = probe.end_round()
            unknown = set(figures) - ROUND_FIELDS.keys()
            if unknown:
                raise KeyError(f"{type(probe).__name__}: figures not in ROUND_FIELDS: {unknown}")
            v.update(figures)
        v["model_at_rest_bytes"] = model_bytes_held(self.model)
        t_closed = time.perf_counter()
        v["round_s"] = t_closed - self._t_round
        names = list(ROUND_FIELDS) + list(_EVAL_SLOTS)
        row = np.concatenate([np.array([v[k] for k in names], np.float64), self._class_accuracy])
        table = self.comm.gather_row(row)
        self._t_closed, self._gather_s = t_closed, time.perf_counter() - t_closed
        if table is None:
            return
        per_rank = {k: table[:, i].astype(ROUND_FIELDS[k]) for i, k in enumerate(ROUND_FIELDS)}
        self.cum_bytes_sent += int(per_rank["bytes_sent"].sum())
        acc = table[:, len(ROUND_FIELDS)]
        evaluation: dict[str, Any] | None = None
        done = np.flatnonzero(~np.isnan(acc))
        if done.size:
            k = int(done[-1])
            evaluation = {
                "round": self.round,
                "rank": k,
                "accuracy": float(acc[k]),
                "loss": float(table[k, len(ROUND_FIELDS) + 1]),
                "perplexity": _perplexity(float(table[k, len(ROUND_FIELDS) + 1])),
                "wall_s": float(table[k, len(ROUND_FIELDS) + 2]),
                "cum_bytes_sent": self.cum_bytes_sent,
            }
            if self.n_classes:
                evaluation[CLASS_ACCURACY] = table[k, len(names) :].copy()
        if self.writer is not None:
            self.writer.append_round(per_rank, evaluation)
        self.n_rounds_written += 1
        self.last_evaluation = evaluation
        if self.progress:
            self._print_progress(per_rank, evaluation)

    def step_reporter(self, total_steps: int | None = None) -> Callable[[int], None]:
        """A callback a turn calls after each step with the steps done so far: it prints
        ``rank R, round k of K: step s of S, T s into the turn`` once the turn has run
        ``step_progress_s`` seconds, then at most once every ``step_progress_s``, so a long
        turn (a language model, a large memory run) shows it is alive. Short turns print none."""
        t0 = time.perf_counter()
        next_s = self.step_progress_s
        of = f" of {total_steps}" if total_steps else ""

        def on_step(steps_done: int) -> None:
            nonlocal next_s
            if not self.progress_enabled:
                return
            elapsed_s = time.perf_counter() - t0
            if elapsed_s < next_s:
                return
            next_s = elapsed_s + self.step_progress_s
            print(
                f"snake-mpi: rank {self.comm.rank}, round {self.round + 1} of {self.n_rounds}: "
                f"step {steps_done}{of}, {elapsed_s:.0f} s into the turn",
                flush=True,
            )

        return on_step

    @property
    def progress_enabled(self) -> bool:
        """Step progress is on unless ``step_progress_s`` is 0 (or negative)."""
        return self.step_progress_s > 0

    def _print_progress(self, per_rank: dict[str, np.ndarray], ev: dict[str, Any] | None) -> None:
        losses = per_rank["loss"][~np.isnan(per_rank["loss"])]
        parts = [f"round {self.round + 1} of {self.n_rounds}"]
        if losses.size:
            parts.append(f"train loss {losses.mean():.4f}")
        if ev is not None and self.show_perplexity:
            parts.append(f"test perplexity {ev['perplexity']:.3f}")
        elif ev is not None:
            parts.append(f"test accuracy {ev['accuracy']:.4f}")
        parts.append(f"sent {per_rank['bytes_sent'].sum() / 2**20:.2f} MiB")
        parts.append(f"{per_rank['round_s'].max():.2f} s")
        print("snake-mpi: " + ", ".join(parts), flush=True)


def _perplexity(loss: float) -> float:
    """``exp(loss)`` (per-token for a language model), inf where that overflows."""
    return math.exp(loss) if loss < 700 else math.inf
