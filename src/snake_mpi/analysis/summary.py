"""Readable text summary of one result file, for ``snake-mpi show FILE``.

Uses only the fields a file has, so older, partial or other-scheme files still print.
Byte counts are exact integers (thousands separated by commas); rounds are numbered from 1,
as in the run's progress lines.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

from snake_mpi.store import Result

MIB = 2**20


MAX_CLASSES_SHOWN = 20
"""Up to this many classes every class's accuracy (and label count) is listed; with more,
the ``WORST_CLASSES`` lowest accuracies."""
WORST_CLASSES = 10
MAX_TURN_COLUMNS = 16
"""Up to this many training ranks the accuracy after each turn is a column per rank; with
more, the first, lowest, highest and last turn of each round."""


def format_summary(result: Result, *, max_round_rows: int = 40, max_turn_rows: int = 10) -> str:
    """Header, what could not be read (incomplete files), a per-round table, a per-rank
    table (with totals), where recorded the label skew (per-class test accuracy, training
    labels per rank, the accuracy after each turn), and the checkpoints and the attempts of
    the run, as fixed-width text.

    With more than ``max_round_rows`` rounds (or checkpoints) only the first and last are
    listed; of the accuracy after each turn, the last ``max_turn_rows`` rounds.
    """
    parts = [
        _header(result),
        _unreadable(result),
        _round_table(result, max_round_rows),
        _rank_table(result),
        _class_accuracy(result),
        _label_histogram(result),
        _turn_accuracy(result, max_turn_rows),
        _checkpoints(result, max_round_rows),
        _attempts(result),
    ]
    return "\n\n".join(p for p in parts if p) + "\n"


# ---------------------------------------------------------------------------- header


def _header(r: Result) -> str:
    prov = r.provenance
    status = r.status or "unknown"
    if r.in_use:
        status += (
            " (in use by a running job: HDF5 file lock held; read without the lock, so the"
            " round being written may be missing)"
        )
    elif status == "running":  # stored while writing: is its writer still there?
        status = _writer_state(r)
    elif status != "complete":
        status += " (incomplete: the run did not finish)"
    items: list[tuple[str, str]] = [
        ("file", str(r.path)),
        ("status", status),
        ("scheme", r.scheme or "-"),
        ("world size", str(r.world_size)),
        ("rounds", str(r.n_rounds)),
    ]
    for key in ("model", "dataset", "mode", "transfer", "keep"):
        if r.attrs.get(key, "") != "":
            items.append((key, str(r.attrs[key])))
    hosts = _hosts(r)
    if hosts:
        items.append(("hosts", hosts))
    device = _device(r)
    if device:
        items.append(("device", device))
    settings = _numerics(r)
    if settings:
        items.append(("numerics", settings))
    mpi = str(prov.get("mpi_library_version", "")).strip()
    if mpi:
        items.append(("MPI", mpi.splitlines()[0].strip()))
    commit = str(prov.get("git_commit", ""))
    if commit:
        dirty = " (dirty)" if prov.get("git_dirty") == "true" else ""
        items.append(("git", (commit[:12] if commit != "unknown" else commit) + dirty))
    job = str(prov.get("slurm_job_id", ""))
    if job:
        array = str(prov.get("slurm_array_job_id", ""))
        task = str(prov.get("slurm_array_task_id", ""))
        items.append(("slurm job", job + (f" (array {array}_{task})" if array else "")))
    if prov.get("created_utc"):
        items.append(("created", str(prov["created_utc"])))
    width = max(len(k) for k, _ in items)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in items)


def _writer_state(r: Result) -> str:
    """The status of a file that says "running" and no job holds locked for HDF5, from the
    run's output lock ``OUT.lock`` (host, pid: ``outlock``), which rank 0 holds from start to
    end: a live holder is a run still writing; none, or a dead one, is a run that stopped."""
    from snake_mpi.outlock import Holder, lock_path, read_holder, stale_reason

    lock = lock_path(str(r.path).removesuffix(".partial"))
    holder = read_holder(lock)
    if holder is None:
        why = f"no {lock.name} is held"
    else:
        me = Holder.me()
        gone = stale_reason(holder, me)
        if gone is None and holder.host == me.host:
            return f"running (its run holds {lock.name}: {holder.describe()})"
        if gone is None:
            return (
                f"incomplete: running or stopped ({lock.name} names {holder.describe()}, on "
                "another host: whether that run still writes cannot be told from here)"
            )
        why = f"{lock.name} is left over: {gone}"
    return (
        f"stopped, incomplete (the run that wrote it ended before finishing: {why}; the file"
        " still says 'running')"
    )


def _device(r: Result) -> str:
    """Where the ranks trained, e.g. "cpu" or "cuda: 4 ranks on 1 GPU (NVIDIA H100), shared;
    weights staged"; "" for files from before devices were recorded."""
    kind = str(r.attrs.get("device", ""))
    ranks = r.tables.get("ranks", {})
    if not kind or "gpu_uuid" not in ranks:
        return kind
    path = str(r.attrs.get("gpu_transfer", ""))
    uuids = [str(u) for u in ranks["gpu_uuid"] if str(u)]
    if not uuids:
        return f"{kind}; weights {path}" if path and path != "host" else kind
    names = sorted({str(n) for n in ranks.get("gpu_name", []) if str(n)})
    shared = ", shared" if np.any(np.asarray(ranks.get("gpu_shared", [0])) > 0) else ""
    n_gpus = len(set(uuids))
    what = f"{len(uuids)} rank(s) on {n_gpus} GPU(s) ({', '.join(names)}){shared}"
    return f"{kind}: {what}; weights {path}"


def _numerics(r: Result) -> str:
    """What the run's bits depend on besides config and seed (docs/reproducibility.md), e.g.
    "torch threads 1, CPU kernels AVX2, OMP_NUM_THREADS=1; data sha256 f51fd0f1a4c3"; each
    value once, "/" between values that differ among the ranks; "" for older files."""
    ranks = r.tables.get("ranks", {})
    if "torch_threads" not in ranks:
        return ""

    def values(key: str) -> str:
        return "/".join(dict.fromkeys(str(v) for v in ranks.get(key, [])))

    env = values("numeric_env") or "no math-library variable set"
    data = "/".join(dict.fromkeys(str(h)[:12] for h in ranks.get("data_sha256", [])))
    return (
        f"torch threads {values('torch_threads')}, CPU kernels {values('cpu_capability')}, "
        f"{env}; data sha256 {data}"
    )


def _hosts(r: Result) -> str:
    """Hosts with rank counts in first-seen order, e.g. "node1 x2, node2 x2"."""
    names: Sequence[str] = []
    if "host" in r.tables.get("ranks", {}):
        names = [str(h) for h in r.tables["ranks"]["host"]]
    elif r.provenance.get("hosts"):
        names = str(r.provenance["hosts"]).split(",")
    counts = Counter(names)
    return ", ".join(f"{h} x{n}" for h, n in counts.items())


def _unreadable(r: Result) -> str:
    """One line per object of an incomplete file that could not be read."""
    return "\n".join(f"unreadable: {where}: {why}" for where, why in r.unreadable)


# ---------------------------------------------------------------------------- tables


def _round_table(r: Result, max_rows: int) -> str:
    n = r.n_rounds
    if n == 0:
        return "no rounds recorded"
    ev = r.evaluation
    ev_row = _eval_rows(r)
    cols: list[tuple[str, Callable[[int], str]]] = [("round", lambda i: str(i + 1))]
    if "accuracy" in ev:
        cols.append(("accuracy", lambda i: _at(ev["accuracy"], ev_row.get(i), "{:.4f}")))
    if "loss" in ev:
        cols.append(("eval loss", lambda i: _at(ev["loss"], ev_row.get(i), "{:.4f}")))
    rounds = r.rounds
    if "bytes_sent" in rounds:
        cols.append(("sent bytes", lambda i: _int(rounds["bytes_sent"][i].sum())))
    if "round_s" in rounds:
        cols.append(("max round_s", lambda i: _float(rounds["round_s"][i].max(), "{:.3f}")))
    shown = list(range(n))
    if n > max_rows:
        half = max(1, max_rows // 2)
        shown = shown[:half] + [-1] + shown[-half:]
    body = [[f(i) if i >= 0 else "..." for _, f in cols] for i in shown]
    return "per round\n" + _table([h for h, _ in cols], body)


def _eval_rows(r: Result) -> dict[int, int]:
    """Round index -> row of ``/eval`` (the last evaluation of that round)."""
    ev = r.evaluation
    if "round" in ev:
        return {int(rnd): k for k, rnd in enumerate(ev["round"])}
    n_eval = max((len(v) for v in ev.values()), default=0)
    return {k: k for k in range(n_eval)} if n_eval == r.n_rounds else {}


def _rank_table(r: Result) -> str:
    rounds = r.rounds
    ranks_table = r.tables.get("ranks", {})
    ws = r.world_size
    head: list[str] = ["rank"]
    rows: list[list[str]] = [[str(k) for k in range(ws)]]
    total: list[str] = ["total"]
    if "host" in ranks_table and len(ranks_table["host"]) == ws:
        head.append("host")
        rows.append([str(h) for h in ranks_table["host"]])
        total.append("")
    for name, label in (("bytes_sent", "sent bytes"), ("bytes_received", "recv bytes")):
        if name in rounds:
            per_rank = rounds[name].sum(axis=0)
            head.append(label)
            rows.append([_int(v) for v in per_rank])
            total.append(_int(per_rank.sum()))
    for name in ("compute_s", "send_s", "wait_s", "checkpoint_s"):
        if name == "checkpoint_s" and not _checkpointed(r):
            continue
        if name in rounds:
            per_rank = np.nansum(rounds[name], axis=0)
            head.append(name)
            rows.append([_float(v, "{:.3f}") for v in per_rank])
            total.append(_float(per_rank.sum(), "{:.3f}"))
    memory = (
        ("peak_rss_bytes", "peak RSS MiB", "max"),
        ("train_state_bytes", "train state MiB", "max"),
        ("model_at_rest_bytes", "at rest MiB", "last"),
    )
    gpu = (
        ("gpu_max_allocated_bytes", "GPU alloc MiB", "max"),
        ("gpu_nvml_used_bytes", "GPU used MiB", "max"),
    )
    for name, label, how in memory + tuple(g for g in gpu if _measured(rounds.get(g[0]))):
        if name in rounds and len(rounds[name]):
            values = rounds[name]
            per_rank = max_over_rounds(values) if how == "max" else values[-1]
            head.append(label)
            rows.append([_float(v / MIB, "{:.1f}") for v in per_rank])
            total.append(_float(np.nanmax(per_rank) / MIB, "{:.1f}"))
    if _measured(rounds.get("gpu_energy_j")):
        per_rank = np.nansum(rounds["gpu_energy_j"], axis=0)
        head.append("GPU energy J")
        rows.append([_float(v, "{:.1f}") for v in per_rank])
        total.append("")  # ranks sharing a GPU each see all of its energy: no sum
    body = [list(row) for row in zip(*rows)] + [total]
    lines = ["per rank (sums over rounds; memory: max over rounds, at rest: last round)"]
    lines.append(_table(head, body, rule_before_last=True))
    lines.append("total row: sums over ranks; memory columns: max over ranks")
    lines.extend(_extras(r))
    return "\n".join(lines)


def _extras(r: Result) -> list[str]:
    """One-line figures outside the round loop, where recorded."""
    out = []
    sync_sent = _numbers(r.arrays.get("final_sync/bytes_sent"))
    if sync_sent is not None:
        recv = _numbers(r.arrays.get("final_sync/bytes_received"))
        recv_text = f", received {_int(np.sum(recv))} bytes" if recv is not None else ""
        out.append(f"final sync: sent {_int(np.sum(sync_sent))} bytes{recv_text}")
    control = _numbers(r.tables.get("ranks", {}).get("control_bytes_sent"))
    if control is not None:
        out.append(f"control (metric gathers): sent {_int(np.sum(control))} bytes")
    return out


# ---------------------------------------------------------------------------- label skew


def _class_accuracy(r: Result) -> str:
    """The last evaluation's test accuracy per class: every class up to
    ``MAX_CLASSES_SHOWN``, else the ``WORST_CLASSES`` lowest; "" where not recorded."""
    ca = _numbers(r.evaluation.get("class_accuracy"))
    if ca is None or ca.ndim != 2 or ca.shape[0] == 0 or ca.shape[1] == 0:
        return ""
    last, n = ca[-1].astype(float), ca.shape[1]
    rounds = _numbers(r.evaluation.get("round"))
    when = f"round {int(rounds[len(ca) - 1]) + 1}" if rounds is not None else "the last round"
    seen = np.flatnonzero(np.isfinite(last))
    head = f"per-class test accuracy after {when} ({n} classes"
    if seen.size:
        head += f"; min {last[seen].min():.3f}, mean {last[seen].mean():.3f}"
        head += f", max {last[seen].max():.3f}"
    if seen.size < n:
        head += f"; {n - seen.size} without test samples: -"
    shown = list(range(n))
    if n > MAX_CLASSES_SHOWN:
        shown = [int(c) for c in seen[np.argsort(last[seen], kind="stable")][:WORST_CLASSES]]
        head += f"; the {len(shown)} lowest"
    width = len(str(max(shown, default=0)))
    cells = [f"{c:>{width}}: {_float(last[c], '{:.3f}'):>5}" for c in shown]
    lines = [head + ")"]
    lines += ["  " + "   ".join(cells[i : i + 10]) for i in range(0, len(cells), 10)]
    return "\n".join(lines)


def _label_histogram(r: Result) -> str:
    """Training samples of each class on each rank that holds data (``/ranks/
    label_histogram``): a column per class up to ``MAX_CLASSES_SHOWN`` classes, else the
    classes each rank holds and its largest class's share; "" where not recorded."""
    hist = _numbers(r.tables.get("ranks", {}).get("label_histogram"))
    if hist is None or hist.ndim != 2 or hist.shape[1] == 0:
        return ""
    holders = [k for k in range(hist.shape[0]) if hist[k].sum() > 0]
    if not holders:
        return ""
    n = hist.shape[1]
    if n <= MAX_CLASSES_SHOWN:
        head = ["rank", *(str(c) for c in range(n)), "total"]
        body = [[str(k), *(_int(v) for v in hist[k]), _int(hist[k].sum())] for k in holders]
        what = "training samples per class (columns) on each rank holding data"
    else:
        head = ["rank", "classes held", "largest class", "its share"]
        body = []
        for k in holders:
            top = int(np.argmax(hist[k]))
            share = hist[k, top] / hist[k].sum()
            body.append([str(k), f"{np.count_nonzero(hist[k])}/{n}", str(top), f"{share:.3f}"])
        what = "training labels on each rank holding data"
    return f"{what} (/ranks/label_histogram)\n" + _table(head, body)


def trained_ranks(turn_accuracy: np.ndarray) -> list[int]:
    """The ranks with an accuracy after a turn in some round (those that trained), in rank
    order: Snake P2P's ring order 0..N-1, Snake CS's nodes 1..N, FedAvg's clients."""
    return [int(k) for k in np.flatnonzero(np.isfinite(turn_accuracy).any(axis=0))]


def _turn_accuracy(r: Result, max_rows: int) -> str:
    """``/rounds/turn_accuracy`` (``eval.after_each_turn``): a row per round (the last
    ``max_rows``) with the test accuracy after each training rank's turn, and the round's
    ``/eval`` accuracy; "" where not recorded."""
    turn = _numbers(r.rounds.get("turn_accuracy"))
    if turn is None or turn.ndim != 2 or not np.isfinite(turn).any():
        return ""
    ranks = trained_ranks(turn)
    n = turn.shape[0]
    shown = list(range(max(0, n - max_rows), n))
    ev_row = _eval_rows(r)
    acc = r.evaluation.get("accuracy")

    def at_eval(i: int) -> str:
        return _at(acc, ev_row.get(i), "{:.3f}") if acc is not None else "-"

    if len(ranks) <= MAX_TURN_COLUMNS:
        head = ["round", *(f"rank {k}" for k in ranks), "eval"]
        body = [
            [str(i + 1), *(_float(turn[i, k], "{:.3f}") for k in ranks), at_eval(i)] for i in shown
        ]
    else:
        head = ["round", "first turn", "lowest", "highest", "last turn", "eval"]
        body = []
        for i in shown:
            row = turn[i, ranks]
            done = np.flatnonzero(np.isfinite(row))
            if not done.size:
                body.append([str(i + 1), "-", "-", "-", "-", at_eval(i)])
                continue
            lo, hi = done[np.argmin(row[done])], done[np.argmax(row[done])]
            body.append(
                [
                    str(i + 1),
                    f"{row[done[0]]:.3f}",
                    f"{row[lo]:.3f} (rank {ranks[lo]})",
                    f"{row[hi]:.3f} (rank {ranks[hi]})",
                    f"{row[done[-1]]:.3f}",
                    at_eval(i),
                ]
            )
    which = f", last {len(shown)} of {n} rounds" if len(shown) < n else ""
    order = "clients side by side from one model" if r.scheme == "fedavg" else "turn order"
    return (
        f"test accuracy after each turn (columns: {order}; eval: the round's /eval "
        f"accuracy{which})\n" + _table(head, body)
    )


# ---------------------------------------------------------------------------- checkpoints


def _checkpointed(r: Result) -> bool:
    """Whether the run took checkpoints or agreed on the stop flag (``checkpoint.every > 0``):
    some ``checkpoint_s`` or ``checkpoint_bytes`` above 0."""
    return any(
        (v := _numbers(r.rounds.get(name))) is not None and bool(np.any(v > 0))
        for name in ("checkpoint_s", "checkpoint_bytes")
    )


def _checkpoints(r: Result, max_rows: int) -> str:
    """The checkpoints the run took: how many, each rank's total ``checkpoint_s`` (largest and
    rank 0's; every rank's is a column of the per-rank table), and one row per checkpoint (the
    row of round ``k + 1`` holds the one taken after round ``k``) with its files' bytes per
    rank and its seconds; "" for a run without checkpoints."""
    nbytes = _numbers(r.rounds.get("checkpoint_bytes"))
    secs = _numbers(r.rounds.get("checkpoint_s"))
    if nbytes is None or nbytes.ndim != 2 or not _checkpointed(r):
        return ""
    taken = [k for k in range(nbytes.shape[0]) if np.any(nbytes[k] > 0)]
    ws = nbytes.shape[1]
    per_rank_s = (
        np.nansum(secs, axis=0) if secs is not None and secs.shape == nbytes.shape else None
    )
    after = ", ".join(str(k) for k in taken[:max_rows]) + (", ..." if len(taken) > max_rows else "")
    lines = [f"checkpoints: {len(taken)} taken" + (f" (after rounds {after})" if taken else "")]
    if per_rank_s is not None:
        k_max = int(np.argmax(per_rank_s))
        lines.append(
            f"checkpoint_s per rank: max {per_rank_s[k_max]:.3f} s (rank {k_max}), rank 0"
            f" {per_rank_s[0]:.3f} s; with the stop-flag agreement of every round, in which a"
            " rank also waits for the slowest"
        )
    if not taken:
        return "\n".join(lines)
    head = ["after round", "files", "min bytes/rank", "max bytes/rank", "total bytes"]
    if per_rank_s is not None:
        head += ["rank 0 s", "max s"]
    shown = taken
    if len(taken) > max_rows:
        half = max(1, max_rows // 2)
        shown = taken[:half] + [-1] + taken[-half:]
    body = []
    for k in shown:
        if k < 0:
            body.append(["..."] * len(head))
            continue
        row = nbytes[k][nbytes[k] > 0]
        cells = [str(k), f"{row.size}/{ws}", _int(row.min()), _int(row.max()), _int(row.sum())]
        if per_rank_s is not None:
            assert secs is not None
            cells += [_float(secs[k, 0], "{:.3f}"), _float(np.nanmax(secs[k]), "{:.3f}")]
        body.append(cells)
    lines.append(_table(head, body))
    lines.append(
        "bytes: each rank's file (blocks changed since the model was built, versions, random"
        " states, counters); s: checkpoint_s of the round after it"
    )
    return "\n".join(lines)


def _attempts(r: Result) -> str:
    """The ``/attempts`` table: how many attempts made the run and the rounds each ran."""
    t = r.tables.get("attempts", {})
    starts, ends = _numbers(t.get("start_round")), _numbers(t.get("end_round"))
    if starts is None or ends is None or len(starts) == 0 or len(starts) != len(ends):
        return ""
    n = len(starts)
    if n == 1:
        return f"attempts: 1 (never interrupted; rounds {int(starts[0]) + 1}-{int(ends[0])})"
    restarts = _numbers(t.get("slurm_restart_count"))
    jobs = t.get("slurm_job_id")
    head = ["attempt", "slurm job", "restarts", "rounds", "ran", "resumed from"]
    resumed = _numbers(t.get("resumed_from_round"))
    body = []
    for i in range(n):
        a, b = int(starts[i]), int(ends[i])
        body.append(
            [
                str(i),
                str(jobs[i]) if jobs is not None and len(jobs) == n and str(jobs[i]) else "-",
                str(int(restarts[i])) if restarts is not None and len(restarts) == n else "-",
                f"{a + 1}-{b}" if b > a else "-",
                str(max(0, b - a)),
                f"after round {int(resumed[i])}"
                if resumed is not None and len(resumed) == n and i
                else "-",
            ]
        )
    lines = [f"attempts: {n} (resumed {n - 1} time(s) from a checkpoint)", _table(head, body)]
    lines.append(
        "rounds: those each attempt completed (an interrupted attempt's rounds after its last"
        " checkpoint were run again); memory series and whole-run memory figures are of the"
        " last attempt"
    )
    return "\n".join(lines)


def _measured(values: np.ndarray | None) -> bool:
    """A numeric figure with at least one value (GPU figures are NaN on CPU ranks)."""
    return values is not None and values.dtype.kind == "f" and bool(np.isfinite(values).any())


def max_over_rounds(values: np.ndarray) -> np.ndarray:
    """Per rank, the largest value over rounds; NaN where a rank has none (no warning)."""
    if values.dtype.kind != "f":
        return values.max(axis=0)
    finite = np.isfinite(values)
    return np.where(finite.any(axis=0), np.where(finite, values, -np.inf).max(axis=0), np.nan)


def _numbers(values: np.ndarray | None) -> np.ndarray | None:
    """``values`` if it is a numeric array, else None (a hand-made file may hold anything)."""
    return values if values is not None and values.dtype.kind in "biuf" else None


def _table(head: list[str], body: list[list[str]], *, rule_before_last: bool = False) -> str:
    """Right-aligned fixed-width columns with a rule under the header."""
    widths = [max([len(h)] + [len(row[c]) for row in body]) for c, h in enumerate(head)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(f"{cell:>{w}}" for cell, w in zip(cells, widths)).rstrip()

    rule = "  ".join("-" * w for w in widths)
    out = [line(head), rule]
    for k, row in enumerate(body):
        if rule_before_last and k == len(body) - 1:
            out.append(rule)
        out.append(line(row))
    return "\n".join(out)


def _at(values: np.ndarray, k: int | None, fmt: str) -> str:
    return "-" if k is None else _float(values[k], fmt)


def _int(value: float) -> str:
    return f"{int(value):,}"


def _float(value: float, fmt: str) -> str:
    value = float(value)
    return "-" if math.isnan(value) else fmt.format(value)
