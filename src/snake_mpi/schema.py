"""Every metric of a result file, once: its name, dtype, unit and meaning.

The recorder (``record.py``) takes its ``/rounds`` and ``/eval`` fields from here, run.py
checks its ``/ranks`` and ``/final_sync`` figures against it, the export and the readers name
groups by it, and the metric tables of docs/results-schema.md are generated from it
(``python -m snake_mpi.schema --write docs/results-schema.md``; ``--check`` says whether the
page is current). Adding a metric is one entry here (and the code that measures it).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

NAN = math.nan


@dataclass(frozen=True, slots=True)
class Metric:
    """One dataset or table column of a result file."""

    name: str
    """The HDF5 name (``/rounds/<name>``, ``/ranks/<name>``, ...)."""
    dtype: str
    """``int64``, ``float64`` or ``str`` (variable-length UTF-8)."""
    unit: str
    """``bytes``, ``s``, ... ; ``—`` for a count or a dimensionless value."""
    meaning: str
    """What the number is, as docs/results-schema.md states it (Markdown)."""
    shape: str = ""
    """The shape, for groups whose datasets differ in shape (``/final_sync``, ``/assignment``)."""
    columns: str = ""
    """A second dimension (``"n_classes"``): one value per class in each row; "" for none."""
    unset: float = 0.0
    """``/rounds``: the value of a round in which nothing set the figure (NaN: unavailable)."""
    additive: bool = False
    """``/rounds``: a figure a scheme adds to during a round (``Recorder.add``)."""


ROUNDS: tuple[Metric, ...] = (
    Metric(
        "bytes_sent",
        "int64",
        "bytes",
        (
            "model-transfer bytes this rank sent in the round: application payload + int64 "
            "header, exactly as sent by `comm.py`'s point-to-point transfers"
        ),
    ),
    Metric(
        "bytes_received",
        "int64",
        "bytes",
        ("the same, received"),
    ),
    Metric(
        "messages_sent",
        "int64",
        "—",
        ("point-to-point model messages sent"),
    ),
    Metric(
        "messages_received",
        "int64",
        "—",
        ("point-to-point model messages received"),
    ),
    Metric(
        "compute_s",
        "float64",
        "s",
        ("time in local training"),
        additive=True,
    ),
    Metric(
        "eval_s",
        "float64",
        "s",
        (
            "time in evaluation (the round's evaluation, and with `eval.after_each_turn` the "
            "one after the rank's turn)"
        ),
        additive=True,
    ),
    Metric(
        "send_s",
        "float64",
        "s",
        ("time inside sends"),
    ),
    Metric(
        "wait_s",
        "float64",
        "s",
        ("time waiting for a peer's message to start"),
    ),
    Metric(
        "recv_s",
        "float64",
        "s",
        ("time receiving a message's payload once it has started"),
    ),
    Metric(
        "pack_s",
        "float64",
        "s",
        (
            "time copying hop payloads between the model and transfer buffers: packing blocks "
            "before a send and copying a received payload into the model. 0 up to timer "
            "resolution where hops send and land in the model's own block buffers "
            '(`comm.hop_buffers = "views"` on a CPU rank or a GPU rank\'s direct path); the '
            'staged path\'s device ↔ pinned copies and `comm.hop_buffers = "copy"` show here. '
            "A hop received between rounds (at a checkpoint) counts in the next round. Absent "
            "from files written before it existed"
        ),
        additive=True,
    ),
    Metric(
        "link_emulated_s",
        "float64",
        "s",
        (
            "time added by sleeping so that transfers last as long as the emulated links say "
            "(`[emulate]` bandwidth and latency); `send_s`, `wait_s`, `recv_s` stay the "
            "measured times"
        ),
    ),
    Metric(
        "slowdown_s",
        "float64",
        "s",
        (
            "time added by sleeping to emulate a slower device (`emulate.slowdown`); "
            "`compute_s` stays the measured time"
        ),
        additive=True,
    ),
    Metric(
        "round_s",
        "float64",
        "s",
        (
            "wall time of the round on this rank: from the moment the previous round's figures "
            "were taken (so its end-of-round gather is inside this round) to the moment this "
            "round's were; the rounds tile the rank's time from the first round's start to the "
            "last round's figures"
        ),
    ),
    Metric(
        "gather_s",
        "float64",
        "s",
        (
            "time this rank spent in the previous round's end-of-round gather of figures to "
            "rank 0 — waiting there for the slowest rank (rank 0 of Snake P2P waits here while "
            "the others train) — and, while `checkpoint.every > 0`, in the agreement on the "
            "checkpoint stop flag that follows it (every rank waits there for the slowest); "
            "part of this round's `round_s`; 0 in the first round"
        ),
    ),
    Metric(
        "checkpoint_s",
        "float64",
        "s",
        (
            "time this rank spent taking the checkpoint after the previous round: writing its "
            "file (rank 0: and waiting for every rank's report, writing the manifest, deleting "
            "old checkpoints); the receive of a hop taken in at the checkpoint counts in "
            "`wait_s`/`recv_s`. Part of this round's `round_s`; 0 when no checkpoint was taken"
        ),
    ),
    Metric(
        "checkpoint_bytes",
        "int64",
        "bytes",
        (
            "size of this rank's checkpoint file written after the previous round (0 when none "
            "was taken); on a resumed run's first round, the file it resumed from"
        ),
    ),
    Metric(
        "peak_rss_bytes",
        "int64",
        "bytes",
        (
            "peak resident set size during the round (sampled every `probes.interval_s`, plus "
            "a sample at the round's end)"
        ),
    ),
    Metric(
        "train_state_bytes",
        "int64",
        "bytes",
        (
            "weights held + gradients + optimiser state at the end of local training; 0 if the "
            "rank did not train this round"
        ),
    ),
    Metric(
        "trainable_params",
        "int64",
        "—",
        ("parameters this rank trained this round"),
    ),
    Metric(
        "model_at_rest_bytes",
        "int64",
        "bytes",
        (
            "bytes of model tensors the rank holds at the end of the round, i.e. after its "
            "turn, between turns (measured from the tensors whose memory exists). Snake `keep "
            '= "all"`, FedAvg, centralised: the whole model. Snake `keep = "own"`: a node\'s '
            "own trained blocks only (`p_k · b`), except the P2P last node in the last round, "
            "which hands nothing on and keeps the final model, and the CS controller (rank 0), "
            "which always holds the whole model; `analysis.expected.expected_at_rest_bytes` "
            "gives the analytic count"
        ),
    ),
    Metric(
        "disk_write_bytes",
        "int64",
        "bytes",
        ('bytes this rank\'s process wrote to storage during the round (see "Probes")'),
    ),
    Metric(
        "loss",
        "float64",
        "—",
        (
            "mean training loss of the rank's turn; NaN when it did not train, and on "
            "split-learning clients (the server computes the loss)"
        ),
        unset=NAN,
    ),
    Metric(
        "kd_loss",
        "float64",
        "—",
        (
            "mean knowledge-distillation term (before weighting) of the rank's turn; NaN "
            "without KD (`snake.kd.weight = 0`)"
        ),
        unset=NAN,
    ),
    Metric(
        "turn_accuracy",
        "float64",
        "fraction 0..1",
        (
            "with `eval.after_each_turn = true`: test accuracy of the model right after this "
            "rank's training turn, before it is handed on (the same test set and metric as "
            "`/eval/accuracy`; its time is in `eval_s`). Snake P2P's turns run in rank order "
            "0..N-1 (the last one's equals the round's `/eval/accuracy`), Snake CS's nodes are "
            "ranks 1..N; FedAvg: each sampled client's local model. NaN where the rank did not "
            "train in the round, and everywhere when the option is off"
        ),
        unset=NAN,
    ),
    Metric(
        "samples",
        "int64",
        "samples",
        ("training samples processed"),
        additive=True,
    ),
    Metric(
        "steps",
        "int64",
        "—",
        ("optimiser steps taken"),
        additive=True,
    ),
    Metric(
        "gpu_max_allocated_bytes",
        "float64",
        "bytes",
        (
            "torch's peak of allocated tensor memory on the rank's GPU during the round "
            "(`max_memory_allocated`, reset at the round's start); NaN on a CPU rank"
        ),
        unset=NAN,
    ),
    Metric(
        "gpu_max_reserved_bytes",
        "float64",
        "bytes",
        (
            "torch's peak of the caching allocator's reserved memory during the round "
            "(`max_memory_reserved`); NaN on a CPU rank"
        ),
        unset=NAN,
    ),
    Metric(
        "gpu_nvml_used_bytes",
        "float64",
        "bytes",
        (
            "NVML's device memory in use, peak of the round's samples (sampler ticks and a "
            "sample at the round's end); includes CUDA contexts and every process on the GPU; "
            "NaN on a CPU rank or without NVML"
        ),
        unset=NAN,
    ),
    Metric(
        "gpu_nvml_process_bytes",
        "float64",
        "bytes",
        (
            "NVML's memory of this rank's process on its GPU, peak of the round's samples; NaN "
            "where the driver does not list the process (PID namespaces in containers) or "
            "without NVML — unavailable, not 0"
        ),
        unset=NAN,
    ),
    Metric(
        "gpu_energy_j",
        "float64",
        "J",
        (
            "energy of the rank's GPU over the round, from NVML's total-energy counter (delta; "
            "Volta and later; the whole device's, so ranks sharing a GPU each see all of it); "
            "rounds under ~1 s are approximate (the counter updates every 20–100 ms); NaN "
            "where unsupported"
        ),
        unset=NAN,
    ),
    Metric(
        "gpu_power_w",
        "float64",
        "W",
        (
            "time-averaged power of the round: `gpu_energy_j / (time from the round's start to "
            "its end)`; NaN where the energy is"
        ),
        unset=NAN,
    ),
    Metric(
        "host_cpu_energy_j",
        "float64",
        "J",
        (
            "CPU-package energy of the rank's host over the round, from RAPL "
            "(`/sys/class/powercap/*-rapl:*`, package domains, not DRAM), read by the host's "
            "local rank 0 only; NaN on the other ranks of the host and where RAPL is absent or "
            "unreadable"
        ),
        unset=NAN,
    ),
)

EVAL: tuple[Metric, ...] = (
    Metric(
        "round",
        "int64",
        "—",
        ("round index (0-based, row of `/rounds`)"),
    ),
    Metric(
        "rank",
        "int64",
        "—",
        ("rank that evaluated"),
    ),
    Metric(
        "accuracy",
        "float64",
        "fraction 0..1",
        ("test accuracy; language models: next-token top-1 accuracy"),
    ),
    Metric(
        "loss",
        "float64",
        "—",
        ("test loss (cross-entropy; language models: per token, in nats)"),
    ),
    Metric(
        "perplexity",
        "float64",
        "—",
        (
            "`exp(loss)`: the test perplexity of a language model (for classifiers the same "
            "formula, rarely useful)"
        ),
    ),
    Metric(
        "wall_s",
        "float64",
        "s",
        ("time since the start of training on the evaluating rank"),
    ),
    Metric(
        "cum_bytes_sent",
        "int64",
        "bytes",
        ("model-transfer bytes sent by all ranks up to and including the round"),
    ),
    Metric(
        "class_accuracy",
        "float64",
        "fraction 0..1",
        (
            "shape `(n_evals, n_classes)`: the same evaluation's accuracy on the test samples "
            "of each class (NaN for a class with no test sample), so that label skew shows (a "
            "class the last nodes to train did not hold falls towards 0). Weighted by the test "
            "set's class counts it gives `accuracy`. Classifiers only: absent for language "
            'models (`model.family = "lm"`, whose classes would be the vocabulary) and in '
            "files written before it"
        ),
        columns="n_classes",
    ),
)

BLOCKS: tuple[Metric, ...] = (
    Metric(
        "name",
        "str",
        "—",
        ("block name"),
    ),
    Metric(
        "role",
        "str",
        "—",
        ('`"stem"`, `"middle"` or `"head"`'),
    ),
    Metric(
        "params",
        "int64",
        "—",
        (
            "parameters in the block (a tensor shared by several blocks, such as a language "
            "model's tied embedding and LM head, counts in the first block only)"
        ),
    ),
    Metric(
        "dtype",
        "str",
        "—",
        (
            'dtypes of the block\'s tensors, e.g. `"float32"`, `"bfloat16"`, `"float32+int64"` '
            "(batch-norm counters); bytes follow them"
        ),
    ),
    Metric(
        "bytes",
        "int64",
        "bytes",
        ("bytes of the block's tensors (parameters and buffers)"),
    ),
    Metric(
        "owner",
        "int64",
        "rank",
        (
            "rank that trains the block as its segment; `-1` = trained by several ranks "
            "(Snake's shared ends, every FedAvg client, the client part of split schemes); "
            "`-2` = never trained; split schemes: `0` for the server's part"
        ),
    ),
)

RANKS: tuple[Metric, ...] = (
    Metric(
        "host",
        "str",
        "—",
        ("host name of the rank"),
    ),
    Metric(
        "peak_rss_bytes",
        "int64",
        "bytes",
        ("peak RSS over the whole run (sampled)"),
    ),
    Metric(
        "ru_maxrss_bytes",
        "int64",
        "bytes",
        ("the kernel's maximum RSS of the process (`getrusage`), exact"),
    ),
    Metric(
        "rss_before_model_bytes",
        "int64",
        "bytes",
        (
            "RSS just before the model was built (interpreter, libraries, data): the baseline; "
            "`peak_rss_bytes` minus this is what the model and training added"
        ),
    ),
    Metric(
        "rss_model_built_bytes",
        "int64",
        "bytes",
        ("RSS just after the model was built (before training)"),
    ),
    Metric(
        "disk_write_bytes",
        "int64",
        "bytes",
        ("bytes written to storage over the whole run"),
    ),
    Metric(
        "data_samples",
        "int64",
        "samples",
        ("training samples in the rank's shard (0 for a server or controller)"),
    ),
    Metric(
        "label_histogram",
        "int64",
        "samples",
        (
            "shape `(world_size, n_classes)`: training samples of each class in each rank's "
            "shard (classification only: absent for language models)"
        ),
        columns="n_classes",
    ),
    Metric(
        "control_bytes_sent",
        "int64",
        "bytes",
        (
            "bytes this rank sent in metric gathers to rank 0 (control traffic, not model "
            "transfers), whole run; 0 on rank 0"
        ),
    ),
    Metric(
        "model_sha256",
        "str",
        "—",
        (
            "SHA-256 (hex) of the rank's final model state; equal hashes mean bit-identical "
            'models. Of the blocks the rank holds: with Snake `keep = "own"` and `final_sync = '
            "false` a node's hash covers its own blocks only"
        ),
    ),
    Metric(
        "model_end_held_bytes",
        "int64",
        "bytes",
        (
            "bytes of model tensors the rank holds at the end of the run, after any final sync "
            "(the final sync gives every rank the whole model under either `snake.keep`; "
            "without it, what it held at the end of the last round)"
        ),
    ),
    Metric(
        "device",
        "str",
        "—",
        (
            'the rank\'s device: `"cpu"` or `"cuda:<index>"` (torch\'s index, after '
            "`CUDA_VISIBLE_DEVICES`)"
        ),
    ),
    Metric(
        "local_rank",
        "int64",
        "—",
        (
            "the rank's index among the ranks on its host (from `OMPI_COMM_WORLD_LOCAL_RANK`, "
            "`SLURM_LOCALID`, `MPI_LOCALRANKID`/`PMI_LOCAL_RANK`, else a shared-memory split); "
            "picks its GPU"
        ),
    ),
    Metric(
        "local_rank_source",
        "str",
        "—",
        (
            "where `local_rank` came from: the launcher's variable (e.g. "
            '`"OMPI_COMM_WORLD_LOCAL_RANK"`), `"MPI_COMM_TYPE_SHARED split"`, or `""` '
            "(in-process runs: the rank)"
        ),
    ),
    Metric(
        "gpu_name",
        "str",
        "—",
        ('the GPU\'s name, e.g. `"NVIDIA H100 80GB HBM3"`; `""` on a CPU rank'),
    ),
    Metric(
        "gpu_uuid",
        "str",
        "—",
        ('the GPU\'s UUID (`GPU-…`, as NVML and `nvidia-smi -L` show it); `""` on a CPU rank'),
    ),
    Metric(
        "gpu_shared",
        "int64",
        "—",
        (
            "`1` if other ranks of this host used the same GPU (more ranks than GPUs: "
            "round-robin), else `0`"
        ),
    ),
    Metric(
        "cpu_affinity",
        "str",
        "—",
        (
            'the CPUs the rank\'s process may run on, as ranges (`"0-3,8"`): its affinity mask '
            "(what `mpirun` or Slurm bound it to), else every CPU of the host; ranks of one "
            "process (in-process runs) share one"
        ),
    ),
    Metric(
        "host_cpu_count",
        "int64",
        "CPUs",
        (
            "CPUs of the rank's host (`os.cpu_count()`); with `cpu_affinity` and the torch "
            "threads it says whether a host was oversubscribed"
        ),
    ),
    Metric(
        "data_sha256",
        "str",
        "—",
        (
            "SHA-256 (hex) of the dataset the rank generated or read (train and test tensors: "
            "dtype, shape, bytes); a run whose ranks disagree stops before training, naming "
            "them"
        ),
    ),
    Metric(
        "torch_threads",
        "int64",
        "threads",
        (
            "torch's intra-op threads on the rank (`train.torch_threads`, else Slurm's "
            "`--cpus-per-task`, else the host's usable CPUs shared among its ranks): how "
            "reductions are split, so runs compare bit for bit only with the same count"
        ),
    ),
    Metric(
        "cpu_capability",
        "str",
        "—",
        (
            "the CPU kernels torch dispatched to (`torch.backends.cpu.get_cpu_capability()`: "
            "`DEFAULT`, `AVX2`, `AVX512`, ...); another kernel gives other bits"
        ),
    ),
    Metric(
        "numeric_env",
        "str",
        "—",
        (
            "`NAME=value` of each math-library variable set for the rank (`OMP_NUM_THREADS`, "
            "`MKL_NUM_THREADS`, `OPENBLAS_NUM_THREADS`, `OPENBLAS_CORETYPE`, `MKL_CBWR`, "
            "`ATEN_CPU_CAPABILITY`, `CUBLAS_WORKSPACE_CONFIG`, ...: "
            '`numerics.NUMERIC_ENV_VARS`), comma-separated; `""` when none is'
        ),
    ),
    Metric(
        "gpu_transfer",
        "str",
        "—",
        ('the path this rank\'s weights took: `"host"`, `"staged"` or `"direct"`'),
    ),
    Metric(
        "transfer_buffer_bytes",
        "int64",
        "bytes",
        (
            "the reusable buffers the path held at the end: pinned host memory (`staged`) or "
            "GPU memory (`direct`), grown to the largest payload sent and the largest "
            "received; 0 on the `host` path (a new array per transfer). Part of the rank's "
            "memory, not of the model's; torch's pinned-memory cache rounds each block up to a "
            "power of two, so the pinned memory taken can be up to twice this"
        ),
    ),
)

ATTEMPTS: tuple[Metric, ...] = (
    Metric(
        "attempt",
        "int64",
        "—",
        ("0, 1, ...: the order of the attempts"),
    ),
    Metric(
        "slurm_job_id",
        "str",
        "—",
        ('`SLURM_JOB_ID` of the attempt, `""` outside Slurm'),
    ),
    Metric(
        "slurm_restart_count",
        "int64",
        "—",
        (
            "`SLURM_RESTART_COUNT` of the attempt (how often Slurm had requeued the job), 0 "
            "outside Slurm"
        ),
    ),
    Metric(
        "start_round",
        "int64",
        "rounds",
        ("rounds done when the attempt started (0, or the checkpoint it resumed from)"),
    ),
    Metric(
        "end_round",
        "int64",
        "rounds",
        (
            "rounds the attempt completed: for an interrupted attempt as many as its "
            "`.partial` held when the next attempt started (rounds after the checkpoint were "
            "run again, and their rows replaced)"
        ),
    ),
    Metric(
        "resumed_from_round",
        "int64",
        "rounds",
        ("the checkpoint the attempt resumed from (rounds done), 0 for the first"),
    ),
    Metric(
        "started_unix_s",
        "float64",
        "s",
        ("when the attempt started (Unix time)"),
    ),
)

FINAL_SYNC: tuple[Metric, ...] = (
    Metric(
        "bytes_sent",
        "int64",
        "bytes",
        ("bytes each rank sent in the final sync"),
        shape="`(world_size,)`",
    ),
    Metric(
        "bytes_received",
        "int64",
        "bytes",
        ("bytes each rank received in the final sync"),
        shape="`(world_size,)`",
    ),
)

ASSIGNMENT: tuple[Metric, ...] = (
    Metric(
        "capability",
        "float64",
        "relative",
        (
            "capability of each node used by the assignment: declared (`snake.capabilities`, "
            "or all 1) or measured"
        ),
        shape="`(n_nodes,)`",
    ),
    Metric(
        "block_time_s",
        "float64",
        "s",
        (
            'only with `snake.capability = "measure"`: each rank\'s time of one forward + '
            "backward step of each block, the least of many samples spread over the "
            "measurement (emulated slowdown included); the figures the assignment used"
        ),
        shape="`(world_size, n_blocks)`",
    ),
    Metric(
        "block_time_spread",
        "float64",
        "relative",
        (
            'only with `snake.capability = "measure"`: how noisy each of those timings was, '
            "median / min − 1 of its samples (0 = every sample equal)"
        ),
        shape="`(world_size, n_blocks)`",
    ),
)

SERIES: tuple[Metric, ...] = (
    Metric(
        "t_s",
        "float64",
        "s",
        ("time of the sample since the sampler started (strictly increasing)"),
    ),
    Metric(
        "rss_bytes",
        "int64",
        "bytes",
        ("resident set size of the rank's process"),
    ),
    Metric(
        "cpu_percent",
        "float64",
        "percent",
        (
            "CPU use of the process since the previous sample (may exceed 100 with several "
            "threads; the first sample is 0)"
        ),
    ),
    Metric(
        "gpu_power_w",
        "float64",
        "W",
        (
            "NVML power draw of the rank's GPU at each sample (same ticks as `t_s`); empty on "
            "a CPU rank"
        ),
    ),
    Metric(
        "gpu_util_percent",
        "float64",
        "percent",
        (
            "NVML GPU utilisation (fraction of time a kernel ran) at each sample; empty on a "
            "CPU rank"
        ),
    ),
    Metric(
        "gpu_nvml_used_bytes",
        "float64",
        "bytes",
        ("NVML device memory in use at each sample; empty on a CPU rank"),
    ),
)


@dataclass(frozen=True, slots=True)
class Group:
    """A group of the result file whose metrics docs/results-schema.md tables."""

    key: str
    """The HDF5 group (and the page's marker, ``<!-- schema: KEY -->``)."""
    metrics: tuple[Metric, ...]
    label: str
    """The head of the name column: ``field``, ``column`` or ``dataset``."""
    with_shape: bool = False


GROUPS: tuple[Group, ...] = (
    Group("rounds", ROUNDS, "field"),
    Group("eval", EVAL, "field"),
    Group("blocks", BLOCKS, "column"),
    Group("ranks", RANKS, "column"),
    Group("attempts", ATTEMPTS, "column"),
    Group("final_sync", FINAL_SYNC, "dataset", with_shape=True),
    Group("assignment", ASSIGNMENT, "dataset", with_shape=True),
    Group("series", SERIES, "dataset"),
)
"""Every metric group, in the page's order."""

EXPORTED = ("rounds", "eval", "ranks", "final_sync")
"""The groups ``snake-mpi export`` writes rows of (its ``source`` column), in row order."""


def group(key: str) -> Group:
    """The group named ``key``; ``KeyError`` naming the groups there are."""
    for g in GROUPS:
        if g.key == key:
            return g
    raise KeyError(f"no metric group {key!r}; there are {', '.join(g.key for g in GROUPS)}")


def names(metrics: Sequence[Metric]) -> tuple[str, ...]:
    """The metrics' names, in order."""
    return tuple(m.name for m in metrics)


def dtypes(metrics: Sequence[Metric], *, one_per_row: bool = False) -> dict[str, str]:
    """Name -> dtype, in order; ``one_per_row``: only the metrics without ``columns``."""
    return {m.name: m.dtype for m in metrics if not (one_per_row and m.columns)}


def path(key: str, name: str) -> str:
    """The HDF5 path of metric ``name`` of group ``key``, checked: ``final_sync/bytes_sent``."""
    if name not in names(group(key).metrics):
        raise KeyError(f"{name!r} is not a metric of /{key}")
    return f"{key}/{name}"


# ---------------------------------------------------------------------------- the page

BEGIN = "<!-- schema: {key} (generated from src/snake_mpi/schema.py; do not edit) -->"
END = "<!-- /schema: {key} -->"


def markdown_table(g: Group) -> str:
    """The Markdown table of group ``g``: name, dtype, (shape,) unit, meaning."""
    head = [g.label, "dtype", *(["shape"] if g.with_shape else []), "unit", "meaning"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---" for _ in head) + " |"]
    for m in g.metrics:
        cells = [f"`{m.name}`", m.dtype, *([m.shape] if g.with_shape else []), m.unit, m.meaning]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def render(page: str) -> str:
    """``page`` with every group's table between its markers generated afresh; ``ValueError``
    when a group's markers are missing."""
    for g in GROUPS:
        begin, end = BEGIN.format(key=g.key), END.format(key=g.key)
        found = re.compile(re.escape(begin) + r"\n.*?" + re.escape(end), re.DOTALL).search(page)
        if found is None:
            raise ValueError(f"no '{begin}' ... '{end}' section in the page")
        block = f"{begin}\n{markdown_table(g)}\n{end}"
        page = page[: found.start()] + block + page[found.end() :]
    return page


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m snake_mpi.schema``: ``--markdown`` prints every table; ``--write PAGE``
    regenerates the tables in PAGE; ``--check PAGE`` exits 1 when PAGE's tables are stale."""
    import argparse

    p = argparse.ArgumentParser(
        prog="python -m snake_mpi.schema", description="The result file's metric tables."
    )
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--markdown", action="store_true", help="print every group's table")
    how.add_argument("--write", metavar="PAGE", help="regenerate the tables in PAGE")
    how.add_argument("--check", metavar="PAGE", help="exit 1 when PAGE's tables are stale")
    args = p.parse_args(argv)
    if args.markdown:
        for g in GROUPS:
            print(f"/{g.key}\n\n{markdown_table(g)}\n")
        return 0
    page_path = Path(args.write or args.check)
    page = page_path.read_text()
    fresh = render(page)
    if args.write:
        if fresh != page:
            page_path.write_text(fresh)
        return 0
    if fresh != page:
        print(
            f"{page_path}: its metric tables differ from src/snake_mpi/schema.py; run "
            f"python -m snake_mpi.schema --write {page_path}",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
