"""The paper's claims and the rules of a verdict, in one place: what the paper says (the
figures it reports), which runs are set against which (``pair_groups``), and when a measured
figure earns a verdict at all. ``snake-mpi compare`` and ``snake-mpi report`` both call
``paper_claims``; docs/compare.md states the rules in words.

The rules, in short:

- Runs that differ only in ``seed`` (and in keys that change no figure: ``IGNORED_KEYS``)
  form a group; a figure of a claim is the mean over the group's seeds, shown with its
  min–max over seeds and the number of seeds.
- A Snake group is set against the FedAvg group of the same workload with the same number of
  data holders (ranks with training data: ``/ranks/data_samples > 0``), on the seeds both
  have; among several such FedAvg groups, those with the same ``[train]`` table.
- A verdict needs complete runs; with fewer than ``MIN_SEEDS`` seeds it is "indicative". The
  accuracy (and perplexity) claim is judged only where every run has converged
  (``convergence_problem``) and, for a classifier, learned something (above chance).
"""

from __future__ import annotations

import json
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from snake_mpi.analysis.expected import run_config
from snake_mpi.analysis.runs import label, workload
from snake_mpi.config import to_toml
from snake_mpi.schemes.registry import scheme_names, scheme_spec
from snake_mpi.store import Result

PAPER_MEMORY_RATIO = 19.37 / 3.13
"""The paper's OPT-1.3B memory claim: full fine-tuning / a Snake node (about 6.2)."""
MEMORY_TOLERANCE = 0.9
"""The memory claim holds when the measured ratio is at least this share of the paper's."""
BYTES_CLAIM = 0.5
"""The paper: Snake's communication is roughly half of federated learning's."""
BYTES_TOLERANCE = 0.6
"""A bytes ratio up to this counts as "about half"."""
ACCURACY_CLAIM = 0.95
"""The paper: Snake keeps at least about 95 % of federated learning's accuracy."""
MIN_SEEDS = 3
"""Seeds a pair needs for a verdict that is more than "indicative"."""
CONVERGENCE_WINDOW_FRACTION = 0.125
"""Each of the two windows ``convergence_problem`` compares is this share of the evaluations
(together the last quarter of the run) ..."""
CONVERGENCE_WINDOW_MIN = 2
"""... and at least this many evaluations (so a run needs at least 4 evaluations)."""
ACCURACY_CONVERGED_TOL = 0.01
"""Converged: the mean test accuracy of the last window differs from the window before's by
less than this (absolute). Also the margin above chance a classifier must reach."""
PERPLEXITY_CONVERGED_RTOL = 0.02
"""Converged (language models): the same for test perplexity, relative (2 %)."""
IGNORED_KEYS = ("seed", "torch_threads", "probes", "comm", "debug")
"""Config keys that change no figure of a claim: runs differing only in these are one group
(``comm``: message deadline and GPU transfer path; bytes and models are the same)."""


# ---------------------------------------------------------------- figures of one run


def data_holders(res: Result) -> int:
    """Ranks that hold training data (``/ranks/data_samples > 0``): not a FedAvg server, a
    split server or a Snake CS controller."""
    return int((np.asarray(res.tables["ranks"]["data_samples"]) > 0).sum())


def bytes_per_round(res: Result) -> float:
    """Model-transfer bytes sent by all ranks per round, mean over the rounds."""
    return float(res.rounds["bytes_sent"].sum(axis=1).mean())


def final_sync_bytes(res: Result) -> int:
    """Bytes all ranks sent in the final sync (``/final_sync/bytes_sent``; 0 without one)."""
    sync = res.arrays.get("final_sync/bytes_sent")
    return int(np.asarray(sync).sum()) if sync is not None else 0


def whole_run_bytes(res: Result) -> int:
    """Every model-transfer byte of the run: all rounds (set-up transfers before the first
    round are counted in it by ``comm``) plus the final sync."""
    return int(res.rounds["bytes_sent"].sum()) + final_sync_bytes(res)


def bytes_to_target(res: Result, target: float) -> int | None:
    """``/eval/cum_bytes_sent`` at the first evaluation reaching ``target``; None if none."""
    acc = res.evaluation.get("accuracy", np.zeros(0))
    hit = np.flatnonzero(acc >= target)
    return int(res.evaluation["cum_bytes_sent"][hit[0]]) if hit.size else None


def at_rest_per_node(res: Result) -> np.ndarray:
    """Model bytes each data holder keeps at rest: ``/ranks/model_at_rest_bytes`` where the
    file has it, else the largest ``/rounds/model_at_rest_bytes`` of the rank over the run."""
    holders = np.asarray(res.tables["ranks"]["data_samples"]) > 0
    ranks = res.tables["ranks"]
    if "model_at_rest_bytes" in ranks:
        per_rank = np.asarray(ranks["model_at_rest_bytes"])
    else:
        per_rank = res.rounds["model_at_rest_bytes"].max(axis=0)
    return per_rank[holders].astype(np.float64)


def has_at_rest(res: Result) -> bool:
    """Whether the file records model bytes at rest."""
    return "model_at_rest_bytes" in res.tables["ranks"] or "model_at_rest_bytes" in res.rounds


def train_state_per_node(res: Result) -> float:
    """Largest training state of any data holder in any round."""
    holders = np.asarray(res.tables["ranks"]["data_samples"]) > 0
    return float(res.rounds["train_state_bytes"][:, holders].max())


def rss_increase_per_node(res: Result) -> float:
    """Largest peak-RSS increase over the pre-model baseline of any data holder."""
    ranks = res.tables["ranks"]
    holders = np.asarray(ranks["data_samples"]) > 0
    return float((ranks["peak_rss_bytes"] - ranks["rss_before_model_bytes"])[holders].max())


def convergence_problem(values: np.ndarray, *, tol: float, relative: bool = False) -> str | None:
    """None if the curve has converged, else why not, in words.

    The last ``2·W`` evaluations, ``W = max(CONVERGENCE_WINDOW_MIN, ⌈n ·
    CONVERGENCE_WINDOW_FRACTION⌉)``, are split in two windows; the curve has converged when
    the mean of the last window differs from the mean of the one before by less than ``tol``
    (``relative``: as a share of the earlier mean). Means, not single points, so that noise
    in one evaluation neither passes nor fails a run."""
    values = np.asarray(values, dtype=np.float64)
    n = values.size
    w = max(CONVERGENCE_WINDOW_MIN, math.ceil(n * CONVERGENCE_WINDOW_FRACTION))
    if n < 2 * w:
        return f"{n} evaluation(s), at least {2 * w} needed"
    before, last = values[-2 * w : -w].mean(), values[-w:].mean()
    if not (math.isfinite(before) and math.isfinite(last)):
        return "non-finite values in its last evaluations"
    change = abs(last / before - 1) if relative else abs(last - before)
    if change >= tol:
        how = f"{change:.1%}" if relative else f"{change:.4f}"
        limit = f"{tol:.0%}" if relative else f"{tol}"
        return (
            f"mean changed by {how} between its last two windows of {w} evaluations "
            f"(tolerance {limit})"
        )
    return None


# ---------------------------------------------------------------- grouping and pairing


def resolved_config(res: Result) -> dict[str, Any]:
    """The run's configuration with every default filled in, as a dict: a result written
    before an option existed reads as one written after it with that option at its default,
    so a suite that spans such a change still groups its seeds."""
    return tomllib.loads(to_toml(run_config(res)))


def group_key(res: Result) -> str:
    """The run's resolved configuration (``resolved_config``) less ``IGNORED_KEYS`` and the
    other schemes' tables, with its number of ranks: equal keys mean runs that differ only in
    seed."""
    raw = resolved_config(res)
    keep = _sections(str(raw.get("scheme", "")))
    every = {t for name in scheme_names() for t in _sections(name)}
    for key in (*IGNORED_KEYS, *sorted(every - set(keep))):
        raw.pop(key, None)
    return json.dumps({"config": raw, "world_size": res.world_size}, sort_keys=True, default=str)


def _sections(scheme: str) -> tuple[str, ...]:
    """The config tables scheme ``scheme`` reads (``SchemeSpec.sections``; none if it is not
    registered): the others are ignored when grouping (a FedAvg run's ``[snake]`` table
    changes nothing)."""
    return scheme_spec(scheme).sections if scheme in scheme_names() else ()


def _judged(group: RunGroup) -> bool:
    """The paper's claims judge this group's scheme (``SchemeSpec.judged``: Snake's)."""
    scheme = run_config(next(iter(group.runs.values()))).scheme
    return scheme in scheme_names() and scheme_spec(scheme).judged


@dataclass
class RunGroup:
    """Runs of one configuration that differ only in seed (one run per seed)."""

    label: str
    world_size: int
    holders: int
    workload: str
    train: str
    """The ``[train]`` table, as JSON."""
    rounds: int
    runs: dict[int, Result]
    """By seed."""

    @property
    def name(self) -> str:
        """E.g. ``snake-p2p N=4 (4 data holders, 8 rounds)`` (``snake-p2p-own``: a node
        keeps only its own blocks between turns)."""
        return (
            f"{self.label} N={self.world_size} ({self.holders} data holders, {self.rounds} rounds)"
        )

    @property
    def seeds(self) -> list[int]:
        return sorted(self.runs)


def group_runs(results: Sequence[Result]) -> list[RunGroup]:
    """Results grouped by ``group_key``, in the order first seen. A second file with a seed its
    group has already starts a group of its own (a repeat is shown, never dropped)."""
    groups: list[tuple[str, RunGroup]] = []
    for res in results:
        key, seed = group_key(res), run_config(res).seed
        group = next((g for k, g in groups if k == key and seed not in g.runs), None)
        if group is None:
            train = json.dumps(resolved_config(res).get("train", {}), sort_keys=True)
            rounds = run_config(res).train.rounds
            group = RunGroup(
                label(res), res.world_size, data_holders(res), workload(res), train, rounds, {}
            )
            groups.append((key, group))
        group.runs[seed] = res
    return [g for _, g in groups]


@dataclass(frozen=True, slots=True)
class Pairing:
    """A Snake group and the baseline group it is judged against, on ``seeds``; ``other`` is
    None (and ``why`` says why) when the workload has baseline runs but none fits."""

    snake: RunGroup
    other: RunGroup | None
    seeds: tuple[int, ...]
    why: str = ""


def pair_groups(
    groups: Sequence[RunGroup], baseline: str = "fedavg", *, same_holders: bool = True
) -> list[Pairing]:
    """The one pairing rule: each judged group (``SchemeSpec.judged``: Snake's) against every
    ``baseline`` group of the same workload with the same number of data holders (unless not
    ``same_holders``: full fine-tuning has one) and at least one seed in common, preferring
    those with an equal ``[train]`` table; the seeds used are those both have. No pairing at
    all where the workload has no ``baseline`` run."""
    out = []
    for s in groups:
        if not _judged(s):
            continue
        pool = [g for g in groups if g.label == baseline and g.workload == s.workload]
        if not pool:
            continue
        fits = [
            g
            for g in pool
            if (g.holders == s.holders or not same_holders) and set(g.runs) & set(s.runs)
        ]
        same_train = [g for g in fits if g.train == s.train]
        for g in same_train or fits:
            out.append(Pairing(s, g, tuple(sorted(set(g.runs) & set(s.runs)))))
        if not fits:
            have = "; ".join(f"{g.name} seeds {', '.join(map(str, g.seeds))}" for g in pool)
            need = f"{s.holders} data holders and " if same_holders else ""
            why = f"no {baseline} run with {need}a seed in common (there are: {have})"
            out.append(Pairing(s, None, (), why))
    return out


# ---------------------------------------------------------------- the claims


@dataclass(frozen=True, slots=True)
class Spread:
    """A figure over seeds: mean, min and max, and the per-seed values."""

    values: tuple[float, ...]

    @property
    def mean(self) -> float:
        return float(np.mean(self.values))

    @property
    def lo(self) -> float:
        return float(np.min(self.values))

    @property
    def hi(self) -> float:
        return float(np.max(self.values))

    @property
    def n(self) -> int:
        return len(self.values)

    def text(self, fmt: Callable[[float], str]) -> str:
        """``mean [min–max, n seeds]``, or ``mean [1 seed]``."""
        if self.n == 1:
            return f"{fmt(self.mean)} [1 seed]"
        return f"{fmt(self.mean)} [{fmt(self.lo)}–{fmt(self.hi)}, {self.n} seeds]"


def size(b: float) -> str:
    """Bytes in a readable unit (B, KiB, MiB, GiB)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(b) >= scale:
            return f"{b / scale:.3f} {unit}"
    return f"{b:.0f} B"


def _ratio(x: float) -> str:
    return f"{x:.3f}"


@dataclass(frozen=True, slots=True)
class Claim:
    """One of the paper's claims, measured on one pair of run groups."""

    run: str
    """What is set against what: ``snake-p2p N=4 (4 data holders, 8 rounds) vs fedavg N=5``."""
    what: str
    claimed: str
    verdict: str
    """``holds`` / ``does not hold`` (plus ``(indicative: ...)`` under ``MIN_SEEDS``), or
    ``not judged: <reason>``."""
    files: tuple[str, ...]
    """File names of the runs used: Snake's, then the baseline's."""
    snake: Spread | None = None
    other: Spread | None = None
    ratio: Spread | None = None
    """Per-seed ratio (Snake / baseline, or baseline / Snake for memory)."""
    unit: str = "bytes"
    """How ``snake`` and ``other`` read: ``bytes``, ``accuracy`` or ``perplexity``."""

    @property
    def holds(self) -> bool | None:
        """True / False where judged, else None."""
        if self.verdict.startswith("not judged"):
            return None
        return self.verdict.startswith("holds")

    def cells(self) -> list[str]:
        """The claim as table cells (``HEAD``)."""
        fmt = size if self.unit == "bytes" else (lambda x: f"{x:.4f}")
        return [
            self.run,
            self.what,
            self.snake.text(fmt) if self.snake else "—",
            self.other.text(fmt) if self.other else "—",
            self.ratio.text(_ratio) if self.ratio else "—",
            self.claimed,
            self.verdict,
            ", ".join(self.files),
        ]


HEAD = ["run", "claim", "Snake", "baseline", "ratio", "paper", "verdict", "files"]
"""Columns of the claims table: figures are means over seeds, [min–max, seeds]."""


def verdict(holds: bool, seeds: int) -> str:
    """``holds`` / ``does not hold``, marked indicative under ``MIN_SEEDS`` seeds."""
    v = "holds" if holds else "does not hold"
    if seeds < MIN_SEEDS:
        v += f" (indicative: {seeds} seed{'s' if seeds > 1 else ''}, fewer than {MIN_SEEDS})"
    return v


def incomplete(res: Result) -> str | None:
    """Why the run is not complete (status, or fewer rounds than configured); None if it is."""
    if res.status != "complete":
        return f"{res.path.name} is not complete (status {res.status!r})"
    want = run_config(res).train.rounds
    if res.n_rounds != want:
        return f"{res.path.name} has {res.n_rounds} of its {want} rounds"
    return None


def _chance_problem(res: Result) -> str | None:
    """Why a classifier has not learned (final accuracy within the tolerance of chance)."""
    cfg = run_config(res)
    if cfg.model.family == "lm":
        return None
    chance = 1 / cfg.data.n_classes
    final = float(res.evaluation["accuracy"][-1])
    if final <= chance + ACCURACY_CONVERGED_TOL:
        return f"{res.path.name} did not learn (final accuracy {final:.4f}, chance {chance:.4f})"
    return None


def _spread(values: Sequence[float | None]) -> Spread | None:
    """The figures that exist, over seeds; None if none does."""
    have = tuple(v for v in values if v is not None)
    return Spread(have) if have else None


class _Pair:
    """The runs of one pairing, seed by seed, and the claims built on them."""

    def __init__(self, p: Pairing) -> None:
        if p.other is None:
            raise ValueError(f"{p.snake.name} has no partner: {p.why}")
        self.snake = [p.snake.runs[s] for s in p.seeds]
        self.other = [p.other.runs[s] for s in p.seeds]
        self.run = f"{p.snake.name} vs {p.other.name}"
        self.files = tuple(r.path.name for r in self.snake + self.other)
        self.n = len(p.seeds)
        bad = [why for r in self.snake + self.other if (why := incomplete(r))]
        self.incomplete = "; ".join(bad)

    def claim(
        self,
        what: str,
        claimed: str,
        figure: Callable[[Result], float | None],
        holds: Callable[[float], bool],
        *,
        unit: str = "bytes",
        problem: str = "",
        inverse: bool = False,
        absent: str = "no figure in",
    ) -> Claim:
        """A claim whose figure is ``figure(run)``, the ratio per seed Snake / baseline
        (baseline / Snake if ``inverse``); ``problem`` (or a missing figure, or an incomplete
        run) means not judged, the figures still shown where there are any."""
        a = [figure(r) for r in self.snake]
        b = [figure(r) for r in self.other]
        snake, other = _spread(a), _spread(b)
        missing = [
            r.path.name for r, v in zip(self.snake + self.other, a + b, strict=True) if v is None
        ]
        ratio = None
        if not missing:
            fa, fb = [float(v or 0.0) for v in a], [float(v or 0.0) for v in b]
            num, den = (fb, fa) if inverse else (fa, fb)
            ratio = Spread(tuple(x / y if y else math.nan for x, y in zip(num, den, strict=True)))
        why = self.incomplete or problem
        if not why and missing:
            why = f"{absent} {', '.join(missing)}"
        if not why and ratio is not None and not math.isfinite(ratio.mean):
            why = "a figure it divides by is 0"
        if why or ratio is None:
            v = f"not judged: {why or 'no figures'}"
        else:
            v = verdict(holds(ratio.mean), self.n)
        return Claim(self.run, what, claimed, v, self.files, snake, other, ratio, unit)

    def converged(self, metric: str, *, tol: float, relative: bool) -> str:
        """ "" if every run's ``metric`` has converged (and a classifier learned), else the
        reason for "runs too short"."""
        problems = []
        for r in self.snake + self.other:
            why = convergence_problem(r.evaluation[metric], tol=tol, relative=relative)
            if why:
                problems.append(f"{r.path.name}: {metric} {why}")
        if problems:
            return "runs too short: " + "; ".join(problems)
        if metric == "accuracy":
            learned = [why for r in self.snake + self.other if (why := _chance_problem(r))]
            return "; ".join(learned)
        return ""


def _last(res: Result, metric: str) -> float | None:
    """The metric at the run's last evaluation; None without one."""
    values = res.evaluation.get(metric, np.zeros(0))
    return float(values[-1]) if values.size else None


def _fedavg_claims(p: _Pair, target: float, lm: bool) -> list[Claim]:
    """Bytes (per round, whole run, to the target), accuracy, storage; perplexity for LMs."""
    about = f"about {BYTES_CLAIM} (≤ {BYTES_TOLERANCE})"
    rounds = {(run_config(r).train.rounds) for r in p.snake + p.other}
    out = [
        p.claim(
            "bytes per round / FedAvg's",
            about,
            bytes_per_round,
            lambda x: x <= BYTES_TOLERANCE,
        ),
        p.claim(
            "bytes, whole run incl. final sync / FedAvg's",
            about,
            whole_run_bytes,
            lambda x: x <= BYTES_TOLERANCE,
            problem=""
            if len(rounds) == 1
            else f"runs of different length ({' vs '.join(str(n) for n in sorted(rounds))} rounds)",
        ),
        p.claim(
            f"bytes to reach accuracy {target:.4f} / FedAvg's",
            about,
            lambda r: bytes_to_target(r, target),
            lambda x: x <= BYTES_TOLERANCE,
            absent="not reached by",
        ),
        p.claim(
            "final accuracy / FedAvg's",
            f"≥ {ACCURACY_CLAIM}",
            lambda r: _last(r, "accuracy"),
            lambda x: x >= ACCURACY_CLAIM,
            unit="accuracy",
            problem=p.converged("accuracy", tol=ACCURACY_CONVERGED_TOL, relative=False),
        ),
    ]
    if lm:
        out.append(
            p.claim(
                "final perplexity / FedAvg's",
                "< 1 (lower)",
                lambda r: _last(r, "perplexity"),
                lambda x: x < 1,
                unit="perplexity",
                problem=p.converged("perplexity", tol=PERPLEXITY_CONVERGED_RTOL, relative=True),
            )
        )
    no_rest = [r.path.name for r in p.snake + p.other if not has_at_rest(r)]
    problem = f"no model_at_rest_bytes in {', '.join(no_rest)}" if no_rest else ""

    def rest_figure(reduce: Callable[[np.ndarray], Any]) -> Callable[[Result], float | None]:
        return lambda r: float(reduce(at_rest_per_node(r))) if has_at_rest(r) else None

    for what, f in (("mean", np.mean), ("largest", np.max)):
        out.append(
            p.claim(
                f"model at rest per node, {what} / FedAvg client's",
                "< 1 (less storage)",
                rest_figure(f),
                lambda x: x < 1,
                problem=problem,
            )
        )
    return out


def _memory_claims(p: _Pair) -> list[Claim]:
    """Language models: full fine-tuning (centralised) / Snake node, training state and
    peak-RSS increase, against the paper's 6.2."""
    claimed = f"about {PAPER_MEMORY_RATIO:.1f} (OPT-1.3B)"
    return [
        p.claim(
            f"full fine-tuning / Snake, {what}",
            claimed,
            f,
            lambda x: x >= MEMORY_TOLERANCE * PAPER_MEMORY_RATIO,
            inverse=True,
        )
        for what, f in (
            ("training state per node", train_state_per_node),
            ("peak RSS increase per node", rss_increase_per_node),
        )
    ]


def paper_claims(results: Sequence[Result], target: float) -> list[Claim]:
    """The paper's claims for every Snake group of ``results`` against its FedAvg partner
    (``pair_groups``); for language models also against full fine-tuning (centralised).
    ``target``: the accuracy of the bytes-to-target claim."""
    groups = group_runs(results)
    out = []
    for p in pair_groups(groups, "fedavg"):
        if p.other is None:
            files = tuple(r.path.name for r in p.snake.runs.values())
            out.append(Claim(p.snake.name, "against FedAvg", "—", f"not judged: {p.why}", files))
            continue
        lm = run_config(p.snake.runs[p.seeds[0]]).model.family == "lm"
        out += _fedavg_claims(_Pair(p), target, lm)
    for p in pair_groups(groups, "centralised", same_holders=False):
        if p.other is None or run_config(p.snake.runs[p.seeds[0]]).model.family != "lm":
            continue
        out += _memory_claims(_Pair(p))
    return out


def claim_rows(items: Sequence[Claim]) -> list[list[str]]:
    """The claims as table rows (``HEAD``)."""
    return [c.cells() for c in items]


def format_claims(items: Sequence[Claim]) -> str:
    """The claims table in Markdown."""
    lines = ["| " + " | ".join(HEAD) + " |", "|" + "---|" * len(HEAD)]
    lines += ["| " + " | ".join(row) + " |" for row in claim_rows(items)]
    return "\n".join(lines)


def format_claims_text(items: Sequence[Claim]) -> str:
    """The claims table for a terminal: a heading line per run (pair) with its files, then its
    claims in columns aligned across the whole table (no Markdown pipes)."""
    rows = claim_rows(items)
    run, files = HEAD.index("run"), HEAD.index("files")
    cols = [c for c in range(len(HEAD)) if c not in (run, files)]
    widths = {c: max(len(HEAD[c]), *(len(r[c]) for r in rows)) for c in cols}

    def line(cells: Sequence[str]) -> str:
        return "  " + "  ".join(f"{cells[c]:<{widths[c]}}" for c in cols).rstrip()

    out: list[str] = [line(HEAD)]
    for name in dict.fromkeys(r[run] for r in rows):
        mine = [r for r in rows if r[run] == name]
        used = dict.fromkeys(f.strip() for r in mine for f in r[files].split(","))
        out.append(f"{name}  (files: {', '.join(used)})")
        out += [line(r) for r in mine]
    return "\n".join(out)
