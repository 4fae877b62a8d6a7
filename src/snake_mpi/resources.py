"""Memory a run will hold, estimated from its config before anything is allocated, against
what its host (or process) can give: a config that cannot fit is a ``ConfigError`` (exit 2 on
every rank, before any message), not the kernel's out-of-memory killer halfway through a job.

A rank holds, for the whole run (``resident``):

- data: the dataset as generated or loaded (every rank builds all of it from the seed;
  synthetic generation holds the pixel noise beside the samples, a file loader the file as
  read), and this rank's shard copied out of it;
- weights: the whole model, and one copy in flight (a hop's payload, FedAvg's sum);
- runtime: the Python, torch and MPI baseline of a rank still to be started (``validate``);
  a running rank's own baseline is already out of the memory it finds available;

and while it trains (``turn``):

- training: gradient, optimiser state, fp32 master (bf16 weights), Snake's teacher and anchor
  copies, for the parameters this rank trains (a Snake node: its segment);
- activations: what a training step keeps for its backward pass (every layer's output for a
  batch, from a forward pass on torch's ``meta`` device, which holds shapes and no data) and
  their gradients, or an evaluation batch's widest outputs, whichever is more.

Snake's nodes train one after another, so a host holds every rank's resident parts and one
turn; FedAvg's clients train at once. The limits: the host's available memory and the room
under the job's control group limit (Slurm's ``--mem``, a container's), for the ranks on that
host together; the room under the address-space or data-size limit (``ulimit -v``, ``-d``),
for the ranks one process runs. ``--max-memory`` replaces the host's figures.
"""

from __future__ import annotations

import math
import os
import re
import resource
from dataclasses import dataclass, field
from pathlib import Path

from snake_mpi.config import ConfigError, RunConfig
from snake_mpi.data.synthetic import LATENT_DIM
from snake_mpi.schemes.rules import data_ranks

FLOAT_BYTES = 4
INDEX_BYTES = 8
_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}


@dataclass(frozen=True, slots=True)
class MemoryEstimate:
    """Bytes one rank of the run holds, by part: ``resident`` parts for the whole run, ``turn``
    parts only while the rank trains; ``concurrent_turns`` ranks train at once."""

    resident: dict[str, int]
    """``data``, ``weights`` (and ``runtime`` for a rank still to be started), in bytes."""
    turn: dict[str, int]
    """``training`` (gradients, optimiser state, copies) and ``activations``, in bytes."""
    concurrent_turns: int
    """How many ranks train at the same time at most (Snake: one, turn after turn; FedAvg:
    every client)."""
    notes: dict[str, str] = field(default_factory=dict)
    """What each part counts, in words, for the message."""
    advice: dict[str, str] = field(default_factory=dict)
    """What to change for a part, where it is not ``PART_ADVICE``'s."""

    @property
    def parts(self) -> dict[str, int]:
        return self.resident | self.turn

    def rank_bytes(self) -> int:
        """One rank at its peak (during its turn)."""
        return sum(self.parts.values())

    def ranks_bytes(self, ranks: int) -> int:
        """``ranks`` ranks together at their peak: each holds its resident parts, and as many
        as train at once hold their turn's parts too."""
        ranks = max(1, ranks)
        resident, turn = sum(self.resident.values()), sum(self.turn.values())
        return ranks * resident + min(ranks, self.concurrent_turns) * turn

    @property
    def largest(self) -> str:
        parts = self.parts
        return max(parts, key=lambda k: parts[k])


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units with three significant digits (e.g. "1.14 TiB"); above
    1024 TiB in whole TiB with separators."""
    if n >= 2**50:
        return f"{n / 2**40:,.0f} TiB"
    for unit, scale in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{int(n)} B"


def parse_size(text: str) -> int:
    """``"8GiB"``, ``"512M"``, ``"1.5e9"`` -> bytes (decimal k/M/G/T, binary KiB/MiB/GiB/TiB);
    ``ValueError`` for anything else or a size that is not positive."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", text)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{text!r} is not a size (e.g. 8GiB, 512MiB, 2G, 1.5e9)")
    value = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"{text!r} is not a positive size")
    return int(value)


# ---------------------------------------------------------------- the estimate


CONCURRENT_TURNS = {"snake": 1, "split": 2, "centralised": 1}
"""Ranks that train at once, by scheme (every rank where a scheme is not named: FedAvg's and
SplitFed's clients train together). Snake's nodes train turn after turn; split learning's
clients take turns with the server."""
PART_ADVICE = {
    "data": "lower data.n_train, data.n_test or data.sample_shape",
    "weights": "lower model.width or model.middle_blocks (a language model: a smaller "
    "model.preset, or model.dtype = 'bfloat16')",
    "training": "lower model.width or model.middle_blocks, or use train.optimizer = 'sgd' "
    "(one state value per parameter, not two)",
    "activations": "lower train.batch_size or train.eval_batch_size (data.seq_len for text)",
    "runtime": "run fewer ranks per host",
}
"""What to change when a part is the largest, for the refusal's message."""


def estimate(cfg: RunConfig, world_size: int, *, runtime_bytes: int = 0) -> MemoryEstimate:
    """What the busiest rank of ``cfg`` on ``world_size`` ranks holds (bytes by part);
    ``runtime_bytes``: the baseline of a rank process still to be started."""
    data, data_note = _data_bytes(cfg, world_size)
    blocks, act, model_note, head_share = _model_figures(cfg)
    params = sum(blocks)
    trainable = _trainable_params(cfg, blocks, world_size)
    weight, per_trained, copies = _bytes_per_param(cfg)
    resident = {"data": data, "weights": params * weight * (1 + copies), "runtime": runtime_bytes}
    turn = {"training": trainable * per_trained, "activations": act}
    notes = {
        "data": data_note,
        "weights": f"{params:,} parameters, {model_note}",
        "training": f"{trainable:,} parameters trained by one rank, {cfg.train.optimizer}",
        "activations": f"train.batch_size = {cfg.train.batch_size}, "
        f"train.eval_batch_size = {cfg.train.eval_batch_size}",
    }
    advice = {}
    if head_share > 0.5:  # the classifier's outputs make the model: the classes are the cause
        for part in ("weights", "training", "activations"):
            notes[part] += f"; mostly the head's data.n_classes = {cfg.data.n_classes:,} outputs"
            advice[part] = f"lower data.n_classes, or {PART_ADVICE[part].removeprefix('lower ')}"
    concurrent = CONCURRENT_TURNS.get(cfg.scheme, world_size)
    return MemoryEstimate(
        resident=resident, turn=turn, concurrent_turns=concurrent, notes=notes, advice=advice
    )


def _trainable_params(cfg: RunConfig, blocks: list[int], world_size: int) -> int:
    """Parameters the busiest rank trains: a Snake node its segment (and the ends it trains),
    every other scheme's ranks the whole model (an upper bound for split learning's parts)."""
    if cfg.scheme != "snake":
        return sum(blocks)
    from snake_mpi.schemes.snake import plan_from_params

    nodes = len(data_ranks(cfg, world_size))
    if not 1 <= nodes <= len(blocks) - 2:
        return sum(blocks)  # the world check refuses it; nothing to share out
    caps = cfg.snake.capabilities if len(cfg.snake.capabilities) == nodes else None
    plan = plan_from_params(blocks, cfg.snake, nodes, capabilities=caps)
    return max(sum(blocks[b] for b in ids) for ids in plan)


def _bytes_per_param(cfg: RunConfig) -> tuple[int, int, int]:
    """(bytes of a weight, bytes per trained parameter during a turn, copies of the whole
    model beside it). A trained parameter has a gradient, optimiser state, an fp32 master
    and its gradient where the weights are bf16, and Snake's teacher (distillation) and
    anchor (proximal term) copies. A copy of the model is in flight where hops are packed
    (``comm.hop_buffers = "copy"``) and in the other distributed schemes (FedAvg's sum, split
    learning's exchanges); Snake's hops land in the block buffers themselves."""
    bf16 = cfg.model.family == "lm" and cfg.model.dtype == "bfloat16"
    weight = 2 if bf16 else FLOAT_BYTES
    moment_bytes = {
        "sgd": FLOAT_BYTES if cfg.train.momentum > 0 else 0,
        "adam": 2 * FLOAT_BYTES,
        "adamw": 2 * FLOAT_BYTES,
        "adamw8bit": 2,  # two 8-bit moments (their per-block scales are under 1 %)
    }
    fused = cfg.train.fused_step  # a gradient (and its fp32 copy) one parameter at a time
    trained = (0 if fused else weight) + moment_bytes[cfg.train.optimizer]
    if bf16:
        trained += FLOAT_BYTES if fused else 2 * FLOAT_BYTES
    copies = 0 if cfg.scheme == "centralised" else 1
    if cfg.scheme == "snake":
        trained += weight * (int(cfg.snake.kd.weight > 0) + int(cfg.snake.prox_mu > 0))
        copies = int(cfg.comm.hop_buffers == "copy")
    elif cfg.scheme == "fedavg":
        trained += weight * int(cfg.fedavg.prox_mu > 0)
    return weight, trained, copies


def _sample_elements(cfg: RunConfig) -> int:
    d = cfg.data
    return d.seq_len if d.name == "text" else math.prod(d.sample_shape)


def _data_bytes(cfg: RunConfig, world_size: int) -> tuple[int, str]:
    """The dataset every rank builds, the generator's or reader's transient copies, and the
    largest shard (the whole training set where the partition is not even)."""
    d = cfg.data
    per = _sample_elements(cfg)
    holders = max(1, len(data_ranks(cfg, world_size)))
    shard = -(-d.n_train // holders) if d.partition == "iid" else d.n_train
    if d.name == "text":  # int64 inputs and targets, and the token list they are cut from
        seq = INDEX_BYTES * (per + 1)
        total = 3 * (d.n_train + d.n_test) * seq + 2 * shard * seq
        return total, f"{d.n_train:,} + {d.n_test:,} sequences of {per} tokens"
    sample = per * FLOAT_BYTES + INDEX_BYTES
    held = (d.n_train + d.n_test) * sample
    if d.name == "synthetic":
        # the training samples beside their pixel noise while they are made, then the float64
        # deviations that standardising them takes; latent codes and the map are small
        transient = d.n_train * per * 2 * FLOAT_BYTES
        transient += max(d.n_train, d.n_test) * LATENT_DIM * 16 + LATENT_DIM * per * 20
        transient += d.n_classes * LATENT_DIM * 8
    else:  # the file as read, before the configured samples are drawn from it
        path = d.path or (os.environ.get("CIFAR10_DIR", "") if d.name == "cifar10" else "")
        transient = _file_bytes(path) * (FLOAT_BYTES + 1) if path else 0
    shape = list(d.sample_shape)
    total = held + max(transient, shard * sample)  # the shard is copied once the data are made
    return total, f"{d.n_train:,} + {d.n_test:,} samples of {shape} float32"


def _file_bytes(path: str) -> int:
    """Bytes under ``path`` (a file or a directory; 0 when there is none: the loader says so)."""
    p = Path(path).expanduser()
    try:
        if p.is_file():
            return p.stat().st_size
        if p.is_dir():
            return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    except OSError:
        return 0
    return 0


_REAL_FORWARD_BYTES = 64 * 2**20
"""Up to these model and sample sizes the model whose outputs are measured is built and run on
the CPU (milliseconds); a larger one on torch's ``meta`` device, which holds no data but takes
seconds to set up on first use."""


def _model_figures(cfg: RunConfig) -> tuple[list[int], int, str, float]:
    """(parameters and buffers per block, activation bytes of a training step, words, the
    head's share of the model and of a sample's activations, whichever is larger)."""
    if cfg.model.family == "lm":
        blocks, act, words = _lm_figures(cfg)
        return blocks, act, words, 0.0
    import torch

    from snake_mpi.blocks import block_tensors
    from snake_mpi.models import build_model

    d = cfg.data
    try:
        with torch.device("meta"):
            model = build_model(
                cfg.model, sample_shape=tuple(d.sample_shape), n_classes=d.n_classes, seed=0
            )
        blocks = [sum(t.numel() for t in block_tensors(model, b)) for b in range(model.n_blocks)]
        small = sum(blocks) * FLOAT_BYTES <= _REAL_FORWARD_BYTES
        if small and math.prod(d.sample_shape) * FLOAT_BYTES <= _REAL_FORWARD_BYTES:
            # meta tensors' first use costs seconds of set-up; a small model is built for real
            model = build_model(
                cfg.model, sample_shape=tuple(d.sample_shape), n_classes=d.n_classes, seed=0
            )
        act, outputs_share = _activation_bytes(model, cfg)
    except (RuntimeError, ValueError, OverflowError, TypeError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(
            f"model.family {cfg.model.family!r} cannot be built for data.sample_shape = "
            f"{list(d.sample_shape)}, model.width = {cfg.model.width}, data.n_classes = "
            f"{d.n_classes}: {first}"
        ) from None
    share = max(blocks[-1] / max(1, sum(blocks)), outputs_share)
    words = f"model.family = {cfg.model.family!r}, model.width = {cfg.model.width}"
    return blocks, act, words, share


def _activation_bytes(model: object, cfg: RunConfig) -> tuple[int, float]:
    """Outputs of every leaf module for one training batch (what autograd keeps) and as much
    again for their gradients, or an evaluation batch's widest output twice, whichever is
    more; and the model's outputs' (the logits') share of that."""
    import torch
    from torch import nn

    assert isinstance(model, nn.Module)
    sizes: list[int] = []

    def hook(_m: nn.Module, _inp: object, out: object) -> None:
        if isinstance(out, torch.Tensor):
            sizes.append(out.numel() * out.element_size())

    shape = tuple(cfg.data.sample_shape)
    device = next(model.parameters()).device
    model.eval()  # shapes only: batch norm takes a batch of one
    leaves = [m for m in model.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            out = model(torch.zeros((1, *shape), device=device))
    finally:
        for h in handles:
            h.remove()
    one = sum(sizes) + math.prod(shape) * FLOAT_BYTES
    widest = max(sizes, default=0)
    train = 2 * one * cfg.train.batch_size
    evaluate = 2 * widest * cfg.train.eval_batch_size
    logits = out.numel() * out.element_size()
    share = logits / max(1, one) if train >= evaluate else logits / max(1, widest)
    return max(train, evaluate), share


def _lm_figures(cfg: RunConfig) -> tuple[list[int], int, str]:
    """A language model's parameters per block (counted on ``meta``) and a decoder step's
    activations: per token and layer about 17 hidden-size values and 2.5 attention scores per
    head and position (Korthikanti et al. 2022), and the logits with their softmax and gradient
    in fp32."""
    from snake_mpi.models.lm import count_params, hf_config

    try:
        blocks = [int(p) for p in count_params(cfg.model)["params"]]
        conf = hf_config(cfg.model)
    except (OSError, ValueError, RuntimeError) as e:
        raise ConfigError(f"model {cfg.model.preset or cfg.model.checkpoint}: {e}") from None
    hidden = int(getattr(conf, "hidden_size", 0))
    layers = int(getattr(conf, "num_hidden_layers", 0))
    heads = int(getattr(conf, "num_attention_heads", 0))
    vocab = int(getattr(conf, "vocab_size", 0))
    seq = cfg.data.seq_len
    tokens = max(cfg.train.batch_size, cfg.train.eval_batch_size) * seq
    value = 2 if cfg.model.dtype == "bfloat16" else FLOAT_BYTES
    per_token = layers * (17 * hidden + 3 * heads * seq) * value + 3 * vocab * FLOAT_BYTES
    act = tokens * per_token
    name = cfg.model.preset or cfg.model.checkpoint
    return blocks, act, f"model {name}, model.dtype = {cfg.model.dtype!r}"


# ---------------------------------------------------------------- what is available


def _cgroup_room_bytes() -> int | None:
    """Room left under this process's memory control group limit (cgroup v2's ``memory.max``
    or v1's ``memory.limit_in_bytes``), the tightest along its path; None where none is set."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rooms = []
    for line in lines:
        _id, controllers, path = line.split(":", 2)
        if controllers == "":
            base, limit_name, usage_name = Path("/sys/fs/cgroup"), "memory.max", "memory.current"
        elif "memory" in controllers.split(","):
            base = Path("/sys/fs/cgroup/memory")
            limit_name, usage_name = "memory.limit_in_bytes", "memory.usage_in_bytes"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            try:
                limit = (here / limit_name).read_text().strip()
                usage = int((here / usage_name).read_text().strip())
                if limit != "max" and int(limit) < 2**60:
                    rooms.append(max(0, int(limit) - usage))
            except (OSError, ValueError):
                pass
            if here == base or here.parent == here:
                break
            here = here.parent
    return min(rooms) if rooms else None


def _vm_bytes(field_name: str) -> int:
    """A ``/proc/self/status`` size (``VmSize``, ``VmData``) in bytes; 0 where unreadable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def _process_room_bytes() -> tuple[int, str] | None:
    """Room left under this process's address-space (``ulimit -v``) or data (``ulimit -d``)
    limit, the tighter one, and its name; None where neither is set."""
    rooms = []
    for which, status, name in (
        (resource.RLIMIT_AS, "VmSize", "the address-space limit (ulimit -v)"),
        (resource.RLIMIT_DATA, "VmData", "the data-size limit (ulimit -d)"),
    ):
        soft, _hard = resource.getrlimit(which)
        if soft != resource.RLIM_INFINITY:
            rooms.append((max(0, soft - _vm_bytes(status)), name))
    return min(rooms) if rooms else None


@dataclass(frozen=True, slots=True)
class Limit:
    """Memory that a group of ranks may hold together, and where the figure comes from."""

    room_bytes: int
    ranks: int
    """How many of the run's ranks share it (a host's ranks, or one process's thread-ranks)."""
    source: str


def limits(
    ranks_on_host: int,
    *,
    ranks_in_process: int = 1,
    max_memory_bytes: int | None = None,
    hostname: str = "",
) -> list[Limit]:
    """What the ranks here may hold: the host's available memory and the room under this
    job's control group limit (both shared by ``ranks_on_host``), and the room under the
    process's address-space or data-size limit (shared by ``ranks_in_process``, the ranks one
    process runs). ``max_memory_bytes`` (``--max-memory``, for the ranks of one host together)
    replaces the host's and the control group's figures."""
    import psutil

    n = max(1, ranks_on_host)
    if max_memory_bytes is not None:
        found = [Limit(max_memory_bytes, n, "the limit given by --max-memory")]
    else:
        avail = int(psutil.virtual_memory().available)
        found = [Limit(avail, n, "available on the host")]
        cgroup = _cgroup_room_bytes()
        if cgroup is not None:
            found.append(Limit(cgroup, n, "left under this control group's memory limit"))
    process = _process_room_bytes()
    if process is not None:
        room, name = process
        found.append(Limit(room, max(1, ranks_in_process), f"left under {name}"))
    return found


def _ranks(n: int) -> str:
    return f"{n} rank{'s' if n != 1 else ''}"


def _listed(parts: dict[str, int]) -> str:
    return ", ".join(f"{k} {format_bytes(v)}" for k, v in parts.items() if v)


def check_fits(est: MemoryEstimate, found: list[Limit], hostname: str = "") -> None:
    """``ConfigError`` (one line: what the ranks need, by part, against the memory there and
    where that figure comes from, and the keys to change) where ``est`` exceeds a limit."""
    for limit in found:
        need = est.ranks_bytes(limit.ranks)
        if need <= limit.room_bytes:
            continue
        n = limit.ranks
        resident, turn = sum(est.resident.values()), sum(est.turn.values())
        at_once = min(n, est.concurrent_turns)
        where = f"on host {hostname}" if hostname else "here"
        how = (
            f"{_ranks(n)}, each holding {format_bytes(resident)} ({_listed(est.resident)}) "
            f"and while it trains {format_bytes(turn)} more ({_listed(est.turn)}), "
            f"{at_once} training at a time"
        )
        big = est.largest
        detail = f" ({est.notes[big]})" if est.notes.get(big) else ""
        fewer = "" if big == "runtime" else ", or run fewer ranks per host"
        advice = est.advice.get(big, PART_ADVICE[big])
        raise ConfigError(
            f"this run needs about {format_bytes(need)} of memory {where} ({how}), but "
            f"{format_bytes(limit.room_bytes)} is {limit.source}; {big} is the largest "
            f"part{detail}: {advice}{fewer}; --max-memory SIZE sets the limit by hand where "
            "this estimate is wrong for your host"
        )


def check_memory(
    cfg: RunConfig,
    world_size: int,
    *,
    ranks_on_host: int,
    ranks_in_process: int = 1,
    max_memory_bytes: int | None = None,
    runtime_bytes: int = 0,
    hostname: str = "",
) -> MemoryEstimate:
    """Estimate the run's memory and refuse it (``ConfigError``) where its ranks on this host
    (or in this process) cannot fit; returns the estimate. Allocates nothing that grows with
    the config."""
    est = estimate(cfg, world_size, runtime_bytes=runtime_bytes)
    found = limits(
        ranks_on_host,
        ranks_in_process=ranks_in_process,
        max_memory_bytes=max_memory_bytes,
        hostname=hostname,
    )
    check_fits(est, found, hostname or os.uname().nodename)
    return est
