"""``snake-mpi memory``: the training-state memory of a configured model, per scheme and node,
beside the paper's figures (OPT-1.3B: 19.37 GB full fine-tuning, 3.13 GB per Snake node), and
the measured peak memory of result files (RSS; on GPU runs also torch's and NVML's figures).

Two accountings (both in the table, see docs/memory.md):

* *paper* — what the paper reports: 16 bytes per **trainable** parameter (fp32 weight, gradient
  and two Adam moments). Full fine-tuning: ``16 P``; a Snake node: ``16 p_i``.
* *held* — what a process must hold: every weight it keeps (a Snake node keeps the frozen
  blocks too, at the model's dtype) plus, for its trainable part, gradients and Adam moments in
  fp32, and with bf16 weights an fp32 master copy and its gradient (``train.py``).

Parameter counts come from the model built on the meta device for language models (so
Llama-3-8B costs no memory) and from the model itself for the small families.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from snake_mpi.config import ConfigError, RunConfig, stored_config
from snake_mpi.schemes.registry import scheme_spec
from snake_mpi.schemes.rules import checked_config

if TYPE_CHECKING:
    from snake_mpi.store import Result

GIB = 2**30


class PaperMemory(TypedDict):
    """The paper's memory figures (GB as printed) and the model they are for."""

    full_gb: float
    snake_node_gb: float
    model: str


PAPER: PaperMemory = {"full_gb": 19.37, "snake_node_gb": 3.13, "model": "OPT-1.3B"}
"""The paper's memory figures for fine-tuning OPT-1.3B (GB as printed; they equal GiB of
1.3e9 x 16 bytes and about 210 M x 16 bytes)."""
PAPER_PARAMS = 1.3e9
"""The parameter count the paper's full fine-tuning figure is of: OPT-1.3B's name, not its exact
count (``19.37 = 16 x 1.3e9 / 2**30``)."""


PAPER_LAYERS = 24
"""OPT-1.3B's decoder layers: the paper's ring shares them among its nodes."""

READINGS = {
    "A": "16 B per trainable parameter; the frozen weights a node holds are not counted",
    "B": "the whole model in 16-bit (2 B per parameter) + 14 B per trainable parameter "
    "(fp32 master 4, Adam moments 8, 16-bit gradient 2)",
}
"""Two readings of the paper's 3.13 GB per Snake node (docs/memory.md): A at 6 nodes of 4
decoder layers, B at 24 nodes of one layer. Its 19.37 GB full fine-tuning is 16 B per
parameter under both."""


def reading_bytes(reading: str, params_total: float, trainable: float) -> float:
    """A node's bytes under ``reading`` (``READINGS``): A ``16 t``; B ``2 P + 14 t``."""
    if reading == "A":
        return 16 * trainable
    if reading == "B":
        return 2 * params_total + 14 * trainable
    raise ValueError(f"unknown reading {reading!r}")


def like_for_like(params_total: int, trainable: int) -> dict[str, float]:
    """Full fine-tuning over one Snake node holding the whole model and training ``trainable``
    parameters, each side in the same precision: ``bf16 mixed`` (16-bit weights and gradients,
    fp32 master and Adam: 16 B per trained parameter, 2 B per frozen one), ``bf16 held here``
    (``held_bytes``: this code keeps the master's gradient in fp32) and ``fp32`` (16 B per
    trained parameter, 4 B per frozen one)."""
    p, t = params_total, trainable
    return {
        "bf16 mixed": 16 * p / (2 * p + 14 * t),
        "bf16 held here": held_bytes(p, p, 2) / held_bytes(p, t, 2),
        "fp32": 16 * p / (4 * p + 12 * t),
    }


def readings_table(counts: BlockCounts) -> list[str]:
    """The paper's two figures under both readings (``READINGS``): first with its nominal
    1.3 x 10^9 parameters in 24 equal layers, then with this model's exact counts (a node
    trains middle blocks only); then full / node ratios like for like (``like_for_like``)."""
    paper = {"A": (6, 4), "B": (PAPER_LAYERS, 1)}  # nodes, layers per node
    mids = counts.params[1:-1]
    mine = {k: (len(mids) // per, per) for k, (_n, per) in paper.items() if len(mids) >= per}
    exact = {
        k: reading_bytes(k, counts.total, max(_sums(mids, per))) for k, (_n, per) in mine.items()
    }
    unit, scale = _unit(max(exact.values(), default=GIB))
    lines = [
        "the paper's 3.13 GB per Snake node, read two ways (docs/memory.md):",
        *(f"  {k}: {text}" for k, text in READINGS.items()),
        f"{'reading':<8} {'paper layout':<22} {'GiB (1.3e9)':>11} {'full/node':>9}   "
        f"{'this model':<22} {unit:>9}",
    ]
    for k, (n, per) in paper.items():
        nominal = reading_bytes(k, PAPER_PARAMS, PAPER_PARAMS * per / PAPER_LAYERS)
        line = (
            f"{k:<8} {f'{n} nodes x {per} layer(s)':<22} {nominal / GIB:>11.2f} "
            f"{16 * PAPER_PARAMS / nominal:>8.2f}x"
        )
        if k in mine:
            m, per = mine[k]
            line += f"   {f'{m} nodes x {per} layer(s)':<22} {exact[k] / scale:>9.2f}"
        lines.append(line)
    lines.append(
        f"(paper: 19.37 / 3.13 = 6.2x; full fine-tuning is 16 B x 1.3e9 = "
        f"{16 * PAPER_PARAMS / GIB:.2f} GiB under both readings)"
    )
    lines.append("full fine-tuning / one Snake node, like for like (this model's counts):")
    for m, per in mine.values():
        ratios = like_for_like(counts.total, max(_sums(mids, per)))
        cells = ", ".join(f"{k} {v:.2f}x" for k, v in ratios.items())
        lines.append(f"  {m} nodes x {per} layer(s): {cells}")
    return lines


def _sums(values: Sequence[int], group: int) -> list[int]:
    """Sums of consecutive groups of ``group`` values (the last may be shorter)."""
    return [sum(values[i : i + group]) for i in range(0, len(values), group)]


@dataclass(frozen=True, slots=True)
class BlockCounts:
    names: list[str]
    params: list[int]
    bytes_per_value: int
    """Bytes per weight value at the configured dtype (4 fp32, 2 bf16)."""

    @property
    def total(self) -> int:
        return sum(self.params)


def block_counts(cfg: RunConfig) -> BlockCounts:
    """Parameters per block of the configured model (meta device for language models)."""
    if cfg.model.family == "lm":
        from snake_mpi.models.lm import count_params

        c = count_params(cfg.model)
        return BlockCounts(c["names"], c["params"], 2 if cfg.model.dtype == "bfloat16" else 4)
    from snake_mpi.blocks import block_params
    from snake_mpi.models import build_model

    model = build_model(
        cfg.model,
        sample_shape=tuple(cfg.data.sample_shape),
        n_classes=cfg.data.n_classes,
        seed=0,
    )
    return BlockCounts(
        list(model.names), [block_params(model, b) for b in range(model.n_blocks)], 4
    )


def held_bytes(params_held: int, params_trainable: int, bytes_per_value: int) -> int:
    """Weights held at their dtype + what training adds for the trainable part: fp32 weights:
    gradient 4 + Adam moments 8 bytes; bf16 weights: fp32 master 4 + its gradient 4 + moments 8
    (the bf16 gradient is handed to the master at each step). The 4-byte step counter per tensor
    is left out (negligible)."""
    extra = 12 if bytes_per_value == 4 else 16
    return params_held * bytes_per_value + params_trainable * extra


@dataclass(frozen=True, slots=True)
class Row:
    scheme: str
    nodes: int
    role: str
    trainable: int
    paper_bytes: int
    held_bytes: int


def rows_for(cfg: RunConfig, counts: BlockCounts, node_counts: Sequence[int]) -> list[Row]:
    """Full fine-tuning, then for each node count the Snake node with the most trainable
    parameters and the one with the fewest (ends per ``snake.ends``)."""
    from snake_mpi.schemes.snake import plan_from_params

    p, b = counts.total, counts.bytes_per_value
    rows = [
        Row("full fine-tuning (centralised, FedAvg client)", 1, "-", p, 16 * p, held_bytes(p, p, b))
    ]
    for n in node_counts:
        if n > len(counts.params) - 2:
            continue
        caps = cfg.snake.capabilities if len(cfg.snake.capabilities) == n else None
        plan = plan_from_params(counts.params, cfg.snake, n, capabilities=caps)
        trainable = [sum(counts.params[i] for i in ids) for ids in plan]
        scheme = f"snake (ends={cfg.snake.ends})"
        if min(trainable) == max(trainable):
            picks = [("every node", 0)]
        else:
            picks = [
                (f"largest: node {int(np.argmax(trainable))}", int(np.argmax(trainable))),
                (f"smallest: node {int(np.argmin(trainable))}", int(np.argmin(trainable))),
            ]
        for role, k in picks:
            t = trainable[k]
            rows.append(Row(scheme, n, role, t, 16 * t, held_bytes(p, t, b)))
    return rows


def run_accounting(cfg: RunConfig, world_size: int) -> Row:
    """The accounting row of a configured run on ``world_size`` ranks: the Snake node with the
    most trainable parameters for Snake (rank 0 is the server in ``cs`` mode), full
    fine-tuning for the other schemes (a FedAvg client trains every block)."""
    counts = block_counts(cfg)
    rows = rows_for(cfg, counts, [])
    if cfg.scheme != "snake":
        return rows[0]
    nodes = world_size - 1 if cfg.snake.mode == "cs" else world_size
    node_rows = rows_for(cfg, counts, [nodes])[1:]
    if not node_rows:
        raise ValueError(f"{nodes} Snake nodes do not fit {len(counts.params) - 2} middle blocks")
    return node_rows[0]


def _unit(largest_bytes: float) -> tuple[str, float]:
    """GiB, MiB or KiB, whichever shows ``largest_bytes`` with digits before the point."""
    for name, scale in (("GiB", GIB), ("MiB", 2**20)):
        if largest_bytes >= scale:
            return name, scale
    return "KiB", 2**10


def format_table(
    cfg: RunConfig, counts: BlockCounts, rows: list[Row], node_counts: Sequence[int] = ()
) -> str:
    """The blocks and the accounting as text, with the paper's figures beside them; node
    counts of ``node_counts`` that the model cannot be shared among are named with why."""
    name = cfg.model.preset or cfg.model.checkpoint or cfg.model.family
    dtype = "bf16" if counts.bytes_per_value == 2 else "fp32"
    n_blocks = len(counts.params)
    lines = [f"model {name}: {counts.total:,} parameters in {n_blocks} blocks ({dtype} weights)"]
    shown = counts.params if len(counts.params) <= 8 else None
    if shown is not None:
        lines += [f"  {n:<10} {q:>15,}" for n, q in zip(counts.names, counts.params, strict=True)]
    else:
        mids = counts.params[1:-1]
        lines.append(f"  {counts.names[0]:<10} {counts.params[0]:>15,}")
        lines.append(
            f"  {len(mids)} middle blocks of {min(mids):,}"
            + (f" to {max(mids):,}" if max(mids) != min(mids) else "")
            + " each"
        )
        lines.append(f"  {counts.names[-1]:<10} {counts.params[-1]:>15,}")
    lines.append("")
    unit, scale = _unit(max(max(r.paper_bytes, r.held_bytes) for r in rows))
    head = (
        f"{'scheme':<46} {'nodes':>5}  {'node':<18} {'trainable':>15} "
        f"{'paper ' + unit:>10} {'held ' + unit:>9}"
    )
    lines += [head, "-" * len(head)]
    for r in rows:
        lines.append(
            f"{r.scheme:<46} {r.nodes:>5}  {r.role:<18} {r.trainable:>15,} "
            f"{r.paper_bytes / scale:>10.2f} {r.held_bytes / scale:>9.2f}"
        )
    middle = n_blocks - 2
    dropped = [n for n in node_counts if n > middle]
    if dropped:
        lines.append(
            f"(not shown: {', '.join(map(str, dropped))} nodes; the model has {middle} middle "
            "blocks and every Snake node trains at least one)"
        )
    lines.append("")
    ratio = PAPER["full_gb"] / PAPER["snake_node_gb"]
    lines.append(
        f"paper ({PAPER['model']}): {PAPER['full_gb']} GB full fine-tuning, "
        f"{PAPER['snake_node_gb']} GB per Snake node (ratio {ratio:.1f}x)"
    )
    lines.append(
        f"  (its {PAPER['full_gb']} GB is 16 bytes x {PAPER_PARAMS / 1e9:g} x 10^9 parameters,"
        f" in GiB: {16 * PAPER_PARAMS / GIB:.2f}; the paper column above is 16 bytes x this"
        f" model's exact count, {counts.total:,}: {16 * counts.total / GIB:.2f} GiB)"
    )
    full = rows[0].paper_bytes
    lines.append("")
    lines += readings_table(counts)
    lines.append("")
    for r in rows[1:]:
        if r.role.startswith("largest") or r.role == "every node":
            lines.append(
                f"here, paper accounting, {r.nodes} nodes: full / largest Snake node = "
                f"{full / r.paper_bytes:.2f}x; held: {rows[0].held_bytes / r.held_bytes:.2f}x"
            )
    return "\n".join(lines)


GPU_FIELDS = {
    "gpu_max_allocated_bytes": "torch alloc",
    "gpu_max_reserved_bytes": "torch reserved",
    "gpu_nvml_used_bytes": "NVML used",
    "gpu_nvml_process_bytes": "NVML process",
}
"""``/rounds`` GPU memory fields (float64, NaN where unavailable) and their column labels:
torch's caching allocator (tensors; the pool), NVML's device-wide use (every process on the
GPU, the CUDA contexts included) and this process's NVML figure."""


def is_gpu_result(res: Result) -> bool:
    """Whether a run trained on a GPU: its ``device`` attribute names CUDA, or a GPU memory
    field holds a number. Files older than the GPU fields count as CPU runs."""
    if "cuda" in str(res.attrs.get("device", "")):
        return True
    return any(
        res.rounds[k].size and np.isfinite(res.rounds[k]).any()
        for k in GPU_FIELDS
        if k in res.rounds
    )


def gpu_peaks(res: Result) -> dict[str, np.ndarray] | None:
    """Per rank, the largest value over rounds of each GPU memory field (NaN where a rank
    never recorded one, or the file lacks the field); None for a CPU run."""
    from snake_mpi.analysis.summary import max_over_rounds

    if not is_gpu_result(res):
        return None
    out = {}
    for key in GPU_FIELDS:
        arr = res.rounds.get(key)
        if arr is None or arr.size == 0:
            out[key] = np.full(res.world_size, np.nan)
            continue
        out[key] = max_over_rounds(np.asarray(arr, dtype=np.float64))
    return out


def largest(values: np.ndarray) -> float:
    """The largest finite value, NaN if there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.max()) if finite.size else float("nan")


def _cell(value: float, scale: float, width: int) -> str:
    return f"{value / scale:>{width}.2f}" if np.isfinite(value) else f"{'n/a':>{width}}"


def measured_table(paths: Sequence[str]) -> str:
    """Per result file and rank: RSS baseline before the model, peak RSS, their difference and
    the training-state bytes counted from the tensors; and the Snake / full ratio of the largest
    per-node peak increase. Where a file ran on a GPU, its peak GPU memory per rank too (max
    over rounds: torch's allocated and reserved, NVML's device-wide and per-process figures)."""
    from snake_mpi.store import read_result

    results = [read_result(p) for p in paths]
    gpus = [gpu_peaks(r) for r in results]
    biggest = max(float(r.tables["ranks"]["peak_rss_bytes"].max()) for r in results)
    unit, scale = ("GiB", GIB) if biggest >= 4 * GIB else ("MiB", 2**20)
    gpu_biggest = max(
        [largest(v) for g in gpus if g is not None for v in g.values()], default=float("nan")
    )
    gunit, gscale = ("MiB", 2**20) if gpu_biggest < 4 * GIB else ("GiB", GIB)
    gheads = [f"{label} {gunit}" for label in GPU_FIELDS.values()]
    gwidths = [max(len(h), 9) for h in gheads]
    lines = [
        f"{'run':<28} {'scheme':<12} {'rank':>4} {'baseline ' + unit:>12} {'peak ' + unit:>9} "
        f"{'increase ' + unit:>12} {'train state ' + unit:>15}"
    ]
    if any(g is not None for g in gpus):
        lines[0] += "".join(f" {h:>{w}}" for h, w in zip(gheads, gwidths, strict=True))
    lines.append("-" * len(lines[0]))
    worst: dict[str, float] = {}
    judged: dict[str, bool] = {}
    gpu_worst: dict[str, dict[str, float]] = {}
    for res, gpu in zip(results, gpus, strict=True):
        ranks = res.tables["ranks"]
        base = ranks["rss_before_model_bytes"]
        peak = np.maximum(ranks["peak_rss_bytes"], ranks["ru_maxrss_bytes"])
        state = res.rounds["train_state_bytes"].max(axis=0)
        cfg = stored_config(res.config_toml)
        spec = scheme_spec(cfg.scheme)
        label = spec.label_of(cfg, tags=False)
        for k in range(res.world_size):
            line = (
                f"{res.path.name[:28]:<28} {label:<12} {k:>4} {base[k] / scale:>12.2f} "
                f"{peak[k] / scale:>9.2f} {(peak[k] - base[k]) / scale:>12.2f} "
                f"{state[k] / scale:>15.2f}"
            )
            if gpu is not None:
                line += "".join(
                    f" {_cell(gpu[key][k], gscale, w)}"
                    for key, w in zip(GPU_FIELDS, gwidths, strict=True)
                )
            elif any(g is not None for g in gpus):
                line += "".join(f" {'-':>{w}}" for w in gwidths)
            lines.append(line)
        trained = state > 0
        inc = float((peak - base)[trained].max()) if trained.any() else float("nan")
        name = f"{res.path.name} ({label}, {res.world_size} ranks)"
        worst[name] = inc
        judged[name] = spec.judged
        if gpu is not None:
            gpu_worst[name] = {key: largest(v) for key, v in gpu.items()}
    full = {k: v for k, v in worst.items() if not judged[k]}
    lines.append("")
    for name, inc in worst.items():
        lines.append(f"largest per-node increase: {inc / scale:8.2f} {unit}  {name}")
    for f_name, f_inc in full.items():
        for name, inc in worst.items():
            if judged[name]:
                lines.append(f"ratio {f_name.split()[0]} / {name.split()[0]}: {f_inc / inc:.2f}x")
    if gpu_worst:
        lines += _gpu_summary(gpu_worst, judged, gunit, gscale)
    return "\n".join(lines)


def _gpu_summary(
    gpu_worst: dict[str, dict[str, float]], judged: dict[str, bool], gunit: str, gscale: float
) -> list[str]:
    """``measured_table``'s GPU lines: each run's largest rank's peaks, and the full / Snake
    ratio of torch's allocated peak."""
    lines: list[str] = []
    lines.append("")
    lines.append(f"largest rank's GPU peak ({gunit}; NVML used is the whole device):")
    for name, peaks in gpu_worst.items():
        cells = ", ".join(
            f"{label} {_cell(peaks[key], gscale, 0).strip()}" for key, label in GPU_FIELDS.items()
        )
        lines.append(f"  {cells}  {name}")
    key = "gpu_max_allocated_bytes"
    for f_name, f_peaks in gpu_worst.items():
        for name, peaks in gpu_worst.items():
            if judged[name] and not judged[f_name]:
                ratio = f_peaks[key] / peaks[key]
                lines.append(
                    f"GPU ratio (torch alloc) {f_name.split()[0]} / {name.split()[0]}: "
                    + (f"{ratio:.2f}x" if np.isfinite(ratio) else "n/a")
                )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """``snake-mpi memory CONFIG [--nodes 2,4,6,8] [--set k=v] [--measured RESULT.h5 ...]``."""
    ap = argparse.ArgumentParser(
        prog="snake-mpi memory",
        description="Training-state memory per scheme and node (paper accounting and what a "
        "process holds) for a config's model, beside the paper's OPT-1.3B figures; with "
        "--measured, the measured peak memory of result files.",
    )
    ap.add_argument("config", help="run config (TOML); its model, dtype and snake.ends are used")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, as for `run` (repeatable)",
    )
    ap.add_argument(
        "--nodes", default="2,4,6,8", help="Snake node counts to tabulate (default 2,4,6,8)"
    )
    ap.add_argument(
        "--measured",
        nargs="*",
        default=[],
        metavar="RESULT.h5",
        help="also print the measured memory of these result files: per rank the RSS before "
        "the model, its peak and the training state (and the GPU peaks of GPU runs)",
    )
    args = ap.parse_args(argv)
    try:
        cfg = checked_config(args.config, args.set)
        nodes = [int(x) for x in args.nodes.split(",") if x.strip()]
        if not nodes or min(nodes) < 1:
            raise ConfigError(f"--nodes must be positive integers, got {args.nodes!r}")
    except (ConfigError, ValueError) as e:
        print(f"snake-mpi memory: {e}", file=sys.stderr)
        return 2
    counts = block_counts(cfg)
    print(format_table(cfg, counts, rows_for(cfg, counts, nodes), nodes))
    if args.measured:
        print()
        print(measured_table(args.measured))
    return 0
