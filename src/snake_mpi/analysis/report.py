"""``snake-mpi report RESULTS_DIR --out REPORT_DIR``: a directory
of result files becomes a report a person reads: ``report.md`` and ``report.html`` with PNG
figures in ``figures/``.

Runs are grouped by workload (model and data configuration). For each group: the model and
data keys that apply to it; the provenance of its runs (hosts, MPI library, git commit,
threads); the comparison table of ``snake-mpi compare`` as three narrower tables; bytes per
round by run (measured beside the analytic count); training state per node (and, for real
models, the peak RSS increase over the pre-model baseline); time per round split into
compute / send / wait / other per rank; accuracy (perplexity for language models) against
rounds, time and bytes; the test accuracy per class over rounds and, where recorded, the
accuracy after each turn; scaling against the number of ranks with the analytic bytes as lines,
where a scheme ran at several N; and the paper-claims table (measured ratio beside the claimed
one, with the verdict). Where the results directory holds ``ring_bw.csv`` and
``transfer.csv`` (``bench/hop_vs_ring.sh``), the hop throughput against the ring_bw limit.
Matplotlib is the ``analysis`` extra.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from snake_mpi.analysis.claims import HEAD, claim_rows, paper_claims
from snake_mpi.analysis.expected import run_config
from snake_mpi.analysis.figures import (
    MIB,
    class_accuracy_of,
    fig_bytes,
    fig_class_accuracy,
    fig_hops,
    fig_memory,
    fig_metric,
    fig_scaling,
    fig_time_split,
    fig_turn_accuracy,
    is_lm,
    read_csv,
    run_name,
    scaling_groups,
    turn_accuracy_of,
)
from snake_mpi.analysis.render import Doc
from snake_mpi.analysis.runs import cells, default_target, label, row_of, scan, workload
from snake_mpi.analysis.summary import _device, _hosts
from snake_mpi.config import RunConfig
from snake_mpi.provenance import parse_cpu_ranges
from snake_mpi.store import Result

TABLE_GROUPS = (
    ("bytes", ("rounds", "MiB/round", "MiB/round max rank", "analytic MiB/round", "= analytic")),
    (
        "memory and time",
        (
            "peak RSS MiB max",
            "peak RSS MiB mean",
            "train state KiB max",
            "train state KiB mean",
            "round s",
            "compute s",
            "send s",
            "wait s",
        ),
    ),
    ("accuracy", ("final acc", "best acc", "rounds to target", "MiB to target")),
)
"""The comparison table (``runs.cells``) as three narrower tables of related columns, each
led by the run's name; a column of no group (a new one) joins the last table."""


def comparison_tables(
    names: Sequence[str], head: Sequence[str], body: Sequence[Sequence[str]]
) -> list[tuple[str, list[str], list[list[str]]]]:
    """``(what, header, rows)`` per group of ``TABLE_GROUPS``; "scheme" and "N" are in the
    run's name and not repeated."""
    placed = {c for _, cols in TABLE_GROUPS for c in cols} | {"scheme", "N"}
    extra = tuple(c for c in head if c not in placed)
    out = []
    for k, (what, cols) in enumerate(TABLE_GROUPS):
        cols = cols + extra if k == len(TABLE_GROUPS) - 1 else cols
        idx = [head.index(c) for c in cols if c in head]
        out.append(
            (
                what,
                ["run"] + [head[i] for i in idx],
                [[name] + [row[i] for i in idx] for name, row in zip(names, body, strict=True)],
            )
        )
    return out


def workload_keys(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """The ``[model]`` and ``[data]`` keys that apply to this model family and dataset (no
    language-model keys for a CNN, no image keys for text, ``alpha`` only for Dirichlet)."""
    m, d = cfg.model, cfg.data
    if m.family == "lm":
        model = ["family", "preset" if m.preset else "checkpoint", "dtype"]
    elif m.family == "vgg11":
        model = ["family"]
    else:
        model = ["family", "width", "middle_blocks"]
    data = ["name"] + (["path"] if d.name != "synthetic" else []) + ["n_train", "n_test"]
    if d.name == "text":
        data += ["seq_len", "tokenizer"]
    else:
        data += ["n_classes", "sample_shape"]
        data += ["noise"] if d.name == "synthetic" else []
        data += ["augment"] if len(d.sample_shape) == 3 else []
    data.append("partition")
    data += {"dirichlet": ["alpha"], "shards": ["shards_per_node"]}.get(d.partition, [])
    return model, data


def workload_text(cfg: RunConfig) -> str:
    """ "Model: family = "cnn"; width = 16 ... Data: name = "synthetic"; ..." with only the
    keys of ``workload_keys``."""
    model_keys, data_keys = workload_keys(cfg)

    def pick(section: object, keys: list[str]) -> str:
        return "; ".join(
            f"{k} = {_shown(getattr(section, k))}" for k in keys if hasattr(section, k)
        )

    text = f"Model: {pick(cfg.model, model_keys)}. Data: {pick(cfg.data, data_keys)}."
    if cfg.data.name == "text" and not cfg.data.path:
        text += " (Empty path: the Python standard library's sources.)"
    return text


def _shown(value: object) -> str:
    """A config value on one line as TOML writes it: strings quoted, arrays inline."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, tuple | list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    return str(value)


def _mpi(prov: dict) -> str:
    """The MPI library's name and version, e.g. "Open MPI v5.0.11" (first line, up to the
    first comma)."""
    lines = str(prov.get("mpi_library_version", "")).strip().splitlines()
    return lines[0].split(",")[0].strip() if lines else "-"


def provenance_of(res: Result) -> dict[str, str]:
    """Where and how a run ran, from its file: hosts, launcher, MPI library, git commit,
    torch threads per rank, ranks and threads per host, device, when."""
    prov = res.provenance
    commit = str(prov.get("git_commit", "")) or "-"
    if commit not in ("-", "unknown"):
        commit = commit[:12] + (" (dirty)" if prov.get("git_dirty") == "true" else "")
    threads = str(prov.get("torch_num_threads", "")) or "-"
    hosts = _hosts(res) or "-"
    per_host = [int(h.rsplit(" x", 1)[1]) for h in hosts.split(", ") if " x" in h]
    load = "-"
    if per_host and threads.isdigit():
        most = max(per_host)
        load = f"{most} x {threads} = {most * int(threads)}"
    return {
        "hosts (ranks)": hosts,
        "launcher": str(prov.get("launcher", "")) or "-",
        "MPI": _mpi(prov),
        "git commit": commit,
        "torch threads/rank": threads,
        "busiest host: ranks x threads": load,
        "oversubscribed": oversubscription(res, int(threads) if threads.isdigit() else 1),
        "device": _device(res) or "-",
        "created (UTC)": str(prov.get("created_utc", "")).replace("+00:00", "") or "-",
    }


def oversubscription(res: Result, threads: int) -> str:
    """Whether any host ran more threads than the CPUs its ranks could use: ``"yes (vm: 4
    x 1 threads on 2 CPUs)"``, ``"no"``, or ``"not recorded"`` (files before
    ``/ranks/cpu_affinity``)."""
    ranks = res.tables.get("ranks", {})
    if "cpu_affinity" not in ranks or "host" not in ranks:
        return "not recorded"
    by_host: dict[str, list[str]] = {}
    for host, cpus in zip(ranks["host"], ranks["cpu_affinity"], strict=True):
        by_host.setdefault(str(host), []).append(str(cpus))
    over = []
    for host, masks in by_host.items():
        cpus = set().union(*(parse_cpu_ranges(m) for m in masks))
        if len(masks) * threads > len(cpus):
            over.append(f"{host}: {len(masks)} x {threads} threads on {len(cpus)} CPUs")
    return f"yes ({'; '.join(over)})" if over else "no"


def provenance_section(doc: Doc, names: Sequence[str], runs: Sequence[Result]) -> None:
    """What every run of a workload shares as one line; what differs as a table by run."""
    provs = [provenance_of(r) for r in runs]
    keys = list(provs[0])
    same = [k for k in keys if len({p[k] for p in provs}) == 1 and k != "created (UTC)"]
    differ = [k for k in keys if k not in same]
    doc.p(
        "Provenance"
        + (" (every run): " if len(runs) > 1 else ": ")
        + "; ".join(f"{k}: {provs[0][k]}" for k in same)
        + ". Oversubscribed: a host ran more torch threads (ranks x threads) than the CPUs its "
        "ranks were allowed (the union of their affinity masks, /ranks/cpu_affinity)."
    )
    if differ and len(runs) > 1:
        doc.table(["run", *differ], [[n, *(p[k] for k in differ)] for n, p in zip(names, provs)])


def label_skew_figures(doc: Doc, runs: Sequence[Result], figs: Path, prefix: str) -> None:
    """Where the runs recorded them: the per-class accuracy heat map and the accuracy after
    each turn (``eval.after_each_turn``), each figure added to ``doc``."""
    if any(class_accuracy_of(r) is not None for r in runs):
        fig_class_accuracy(runs, figs / f"{prefix}_class_acc.png")
        doc.img(
            f"figures/{prefix}_class_acc.png",
            "Test accuracy per class (rows) after each evaluated round (columns), per run: "
            "label skew shows as classes that stay dark or fall back when the nodes that hold "
            "them have trained longest ago. Grey: no test sample of the class.",
        )
    if any(turn_accuracy_of(r) is not None for r in runs):
        fig_turn_accuracy(runs, figs / f"{prefix}_turns.png")
        doc.img(
            f"figures/{prefix}_turns.png",
            "Test accuracy after each turn (eval.after_each_turn), per run that recorded it, "
            "in turn order: each round's turns between dotted lines, the round's evaluation as "
            "a cross. A saw-tooth is the model forgetting other nodes' classes as it learns "
            "the next node's. FedAvg's clients train side by side from one model (points only).",
        )


def build(
    paths: Sequence[str],
    out_dir: Path,
    *,
    title: str = "snake_mpi report",
    scanned: tuple[list[Result], list[tuple[Path, str]]] | None = None,
) -> Path:
    """Write ``report.md``, ``report.html`` and ``figures/*.png`` into ``out_dir``.

    ``scanned`` is ``runs.scan(paths)`` where the caller has it already."""
    results, skipped = scanned if scanned is not None else scan(paths)
    figs = out_dir / "figures"
    figs.mkdir(parents=True, exist_ok=True)
    doc = Doc()
    doc.h(1, title)
    doc.p(
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S %Z')} from {len(results)} complete result "
        f"file(s) in {', '.join(paths)}."
        + (f" Left out (incomplete or unreadable): {len(skipped)}." if skipped else "")
    )
    if skipped:
        doc.table(["file", "why left out"], [[p.name, why] for p, why in skipped])
    groups: dict[str, list[Result]] = defaultdict(list)
    for r in results:
        groups[workload(r)].append(r)
    all_claims: list[list[str]] = []
    for gi, runs in enumerate(groups.values(), 1):
        runs.sort(key=lambda r: (label(r), r.world_size, run_config(r).seed))
        cfg = run_config(runs[0])
        model = cfg.model.preset or cfg.model.family
        doc.h(2, f"Workload {gi}: {model} on {cfg.data.name} ({len(runs)} runs)")
        doc.p(workload_text(cfg))
        target = default_target(runs)
        rows = [row_of(r, target) for r in runs]
        names = [run_name(r) for r in runs]
        provenance_section(doc, names, runs)
        doc.p(
            f"Comparison (target accuracy {target:.4f}: 90 % of the best run's), in three "
            "tables: bytes, memory and time, accuracy. Runs are named scheme, N ranks, seed."
        )
        for what, head, body in comparison_tables(names, *cells(rows)):
            doc.p(f"Comparison: {what}.")
            doc.table(head, body)
        prefix = f"w{gi}"
        fig_bytes(rows, names, figs / f"{prefix}_bytes.png")
        doc.img(
            f"figures/{prefix}_bytes.png",
            "Bytes per round by run: measured (bars), analytic (black dashes). A run that "
            "sends no model bytes (centralised) is a red marker labelled 0 B at the bottom.",
        )
        caption = fig_memory(runs, rows, names, figs / f"{prefix}_memory.png")
        doc.img(f"figures/{prefix}_memory.png", caption)
        fig_time_split(runs, figs / f"{prefix}_time.png")
        doc.img(
            f"figures/{prefix}_time.png",
            "Time per round per rank: compute, send, wait for a peer, and the rest.",
        )
        metric = fig_metric(runs, figs / f"{prefix}_{'ppl' if is_lm(runs[0]) else 'acc'}.png")
        doc.img(
            f"figures/{prefix}_{'ppl' if is_lm(runs[0]) else 'acc'}.png",
            f"Test {metric} against rounds, wall time and bytes (log). A run that sends no "
            "model bytes (centralised) has its points on the dotted line marked 0 bytes.",
        )
        label_skew_figures(doc, runs, figs, prefix)
        scal = scaling_groups(runs, rows)
        if scal:
            fig_scaling(scal, figs / f"{prefix}_scaling.png")
            doc.img(
                f"figures/{prefix}_scaling.png",
                "Scaling against the number of ranks: bytes (analytic lines, measured points), "
                "round time, peak RSS and training state.",
            )
            doc.table(
                ["run", "N", "MiB/round", "analytic MiB/round", "round s", "peak RSS MiB max"],
                [
                    [
                        name,
                        str(r.ranks),
                        f"{r.bytes_per_round / MIB:.3f}",
                        f"{r.analytic_bytes_per_round / MIB:.3f}",
                        f"{r.round_s:.3f}",
                        f"{r.peak_rss_max_bytes / MIB:.1f}",
                    ]
                    for name, rs in scal.items()
                    for r in rs
                ],
            )
        found = claim_rows(paper_claims(runs, target))
        if found:
            doc.p(
                "The paper's claims, measured on this workload: each Snake configuration "
                "against FedAvg with as many data holders, on the seeds both have; figures are "
                "means over seeds [min–max, seeds] (rules: docs/compare.md):"
            )
            doc.table(HEAD, found)
            all_claims += [[f"workload {gi}", *c] for c in found]
    hop_dirs = [Path(p) for p in paths if Path(p).is_dir()]
    for d in hop_dirs:
        ring_csv, hop_csv = d / "ring_bw.csv", d / "transfer.csv"
        if ring_csv.exists() and hop_csv.exists():
            ring, hops = read_csv(ring_csv), read_csv(hop_csv)
            both = d / "ring_bw_sendrecv.csv"
            fig_hops(ring, hops, figs / "hops.png", read_csv(both) if both.exists() else None)
            doc.h(2, "Hop throughput against the machine's limit")
            doc.p(
                "ring_bw (bench/c/ring_bw.c) in token mode passes one message round the ring, "
                "hop after hop, as Snake's weights travel; snake_mpi's comm layer is timed with "
                "the same pattern (token) and one way (bench/transfer.py, in the same job: "
                "bench/hop_vs_ring.sh)."
            )
            doc.img("figures/hops.png", "Throughput against message size; comm / ring_bw ratio.")
            doc.table(
                [
                    "bytes",
                    "ring_bw token GB/s",
                    "bare GB/s",
                    "comm GB/s",
                    "comm token GB/s",
                    "comm token / ring_bw",
                ],
                [
                    [f"{int(b):,}", f"{r:.2f}", f"{bb:.2f}", f"{c:.2f}", f"{t:.2f}", f"{t / r:.3f}"]
                    for b, bb, c, t, r in zip(
                        hops["bytes"],
                        hops["bare_GBps"],
                        hops["comm_GBps"],
                        hops["comm_token_GBps"],
                        hops["ring_bw_GBps"],
                        strict=True,
                    )
                ],
            )
            e2e_csv = d / "e2e.csv"
            if e2e_csv.exists():
                e2e_table(doc, e2e_csv)
            break
    if all_claims:
        doc.h(2, "All claims")
        doc.table(["workload", *HEAD], all_claims)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.md").write_text(doc.markdown())
    (out_dir / "report.html").write_text(doc.html(title))
    return out_dir / "report.md"


def e2e_table(doc: Doc, path: Path) -> None:
    """``bench/transfer.py``'s end-to-end hops (``e2e.csv``): model to model through the
    schemes' own send and receive, block buffers sent as they are (views) against packed
    copies, with the limit of the same bytes and the benchmark that set it."""
    import csv

    with path.open() as f:
        rows = list(csv.DictReader(line for line in f if not line.startswith("#")))
    doc.h(3, "Model hops end to end")
    doc.p(
        "A model's blocks hop between two ranks through the schemes' send_blocks and "
        "receive_blocks, one transfer in flight: from the blocks' own buffers (views, "
        'comm.hop_buffers = "views") and packed into a new payload per hop (copy, as before); '
        "the limit is the best of ring_bw and mpi4py's pingpong for the same bytes "
        "(bench/limit.py), bare a plain mpi4py transfer with the same pattern."
    )
    doc.table(
        [
            "blocks per hop",
            "bytes",
            "limit GB/s (set by)",
            "bare GB/s",
            "views GB/s",
            "views / limit",
            "views / bare",
            "copy GB/s",
            "page faults per hop views / copy",
        ],
        [
            [
                r["blocks_per_hop"],
                f"{int(r['bytes']):,}",
                f"{float(r['limit_GBps']):.2f} ({r['limit_set_by']})",
                f"{float(r['bare_token_GBps']):.2f}",
                f"{float(r['views_GBps']):.2f}",
                f"{float(r['views_vs_limit']):.3f}",
                f"{float(r['views_vs_bare']):.3f}",
                f"{float(r['copy_GBps']):.2f}",
                f"{float(r['faults_per_hop_views']):.0f} / {float(r['faults_per_hop_copy']):.0f}",
            ]
            for r in rows
        ],
    )


def main(argv: Sequence[str] | None = None) -> int:
    """``snake-mpi report RESULTS [RESULTS ...] --out REPORT_DIR``: 0, or 1 if no complete,
    usable result was found. Every file left out is named on stderr with the reason."""
    import argparse

    p = argparse.ArgumentParser(
        prog="snake-mpi report",
        description="Turn result files (or directories of them) into a Markdown + HTML report "
        "with PNG figures.",
    )
    p.add_argument("results", nargs="+", help="result files or directories")
    p.add_argument("--out", required=True, help="report directory (report.md, report.html)")
    p.add_argument("--title", default="snake_mpi report")
    args = p.parse_args(argv)
    results, skipped = scan(args.results)
    for bad, why in skipped:
        print(f"snake-mpi report: skipped {bad}: {why}", file=sys.stderr)
    if not results:
        where = ", ".join(args.results)
        why = f" ({len(skipped)} file(s) skipped, each for the reason above)" if skipped else ""
        print(f"snake-mpi report: no complete result files found in {where}{why}", file=sys.stderr)
        return 1
    path = build(args.results, Path(args.out), title=args.title, scanned=(results, skipped))
    print(f"snake-mpi report: wrote {path} and {path.with_suffix('.html')}")
    return 0
