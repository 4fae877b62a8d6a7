"""Run configuration: TOML file + ``--set key=value`` overrides -> frozen, validated dataclasses.

Pure data: each section checks its own fields (a ``Literal`` field its choices) in
``__post_init__``, ``RunConfig`` the settings that go together across sections. What needs more
than the config (the scheme registry, the model presets, the number of ranks) is checked by
``schemes/rules.py``, through which every run loads its config. Every rank loads and checks the
same file, so a bad config gives the same answer everywhere before any message is sent
(``EXIT_CONFIG`` on every rank, see ``run.py``). Imports nothing else of the package.
"""

from __future__ import annotations

import dataclasses
import math
import os
import tomllib
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

import tomli_w

MAX_NOISE = 1e6
"""The largest ``data.noise``: far past where synthetic data are noise alone (about 10), far
below where their float32 samples overflow to infinity (about 1e37)."""

SEED_LIMIT = 2**63
"""Seeds are stored as int64 (HDF5 attributes) and fed to numpy's SeedSequence: ``[0, 2**63)``."""


class ConfigError(ValueError):
    """A configuration the run cannot accept; the message says which key and why."""


EXIT_CONFIG = 2
"""The exit status of every rank when a run's config (or its start-up checks) is refused."""


def _cfg(**kw: Any) -> Any:
    return dataclass(frozen=True, kw_only=True, slots=True, **kw)


@_cfg()
class ModelConfig:
    family: Literal["cnn", "mlp", "vgg11", "lm"] = "cnn"
    """Model family: ``cnn`` (image-shaped input), ``mlp`` (any input, flattened), ``vgg11``, or
    ``lm`` (a decoder language model from ``preset`` or ``checkpoint``; needs data.name text)."""
    width: int = 16
    """Channels (cnn) or hidden units (mlp) of the first block."""
    middle_blocks: int = 4
    """Number of middle blocks between the stem and the head; shared out over the nodes
    (``lm``: ignored, the decoder layers are the middle blocks)."""
    preset: str = ""
    """``lm``: a named configuration with random initialisation (``opt-125m``, ``opt-1.3b``,
    ``llama-3-8b``, ``opt-tiny``, ``llama-tiny``)."""
    checkpoint: str = ""
    """``lm``: a local directory saved by transformers' ``save_pretrained`` (never downloaded);
    instead of ``preset``."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """``lm``: weights in ``float32`` or ``bfloat16`` (optimiser state and master weights fp32)."""

    def __post_init__(self) -> None:
        _check_choices(self, "model.")
        _positive("model.width", self.width)
        _positive("model.middle_blocks", self.middle_blocks)
        if self.family == "vgg11" and self.middle_blocks != 4:
            raise ConfigError(
                "model.family 'vgg11' has 4 middle blocks (its conv stages after the stem); "
                f"set model.middle_blocks = 4, got {self.middle_blocks}"
            )
        if self.family != "lm" and self.dtype != "float32":
            raise ConfigError("model.dtype other than float32 is for model.family 'lm' only")
        if self.family == "lm" and bool(self.preset) == bool(self.checkpoint):
            raise ConfigError(
                "model.family 'lm' needs exactly one of model.preset (random init) and "
                "model.checkpoint (a local directory)"
            )


@_cfg()
class DataConfig:
    name: Literal["synthetic", "cifar10", "arrays", "text", "idx"] = "synthetic"
    """Dataset: ``synthetic`` (generated from the seed, learnable), ``cifar10`` (the binary
    release from ``path`` or $CIFAR10_DIR), ``arrays`` (an .npz file at ``path``), ``text``
    (local text files at ``path``, packed into sequences; empty path: Python's standard library
    sources), ``idx`` (the MNIST family's IDX files, plain or gzipped, in the directory ``path``,
    else $IDX_DIR, else Debian's Fashion-MNIST: ``make fashion-mnist``)."""
    path: str = ""
    """Where ``cifar10``, ``arrays``, ``text`` or ``idx`` data lie (never downloaded)."""
    pad_to: int = 0
    """``idx``: zero-pad the images to ``pad_to`` x ``pad_to`` (32: 28x28 images for VGG-11,
    with ``sample_shape = [1, 32, 32]``); 0: as stored (``[1, 28, 28]``)."""
    augment: bool = False
    """Images: random crop (padding 4) and horizontal flip of every training batch."""
    n_train: int = 4096
    """Training samples in total (split over the nodes)."""
    n_test: int = 1024
    """Held-out samples for evaluation."""
    n_classes: int = 10
    """Number of classes."""
    sample_shape: tuple[int, ...] = (3, 32, 32)
    """Shape of one sample, e.g. [3, 32, 32] (image) or [64] (vector)."""
    noise: float = 1.0
    """Synthetic data: noise scale; larger is harder (0 to ``MAX_NOISE``)."""
    partition: Literal["iid", "dirichlet", "shards"] = "iid"
    """How training samples are shared over nodes: ``iid``, ``dirichlet`` (label skew, by
    ``alpha``) or ``shards`` (label-sorted shards, ``shards_per_node`` per node)."""
    alpha: float = 0.5
    """Dirichlet concentration (smaller: more skew); used when partition = dirichlet."""
    shards_per_node: int = 2
    """partition = shards: label-sorted shards dealt to each node (about that many classes)."""
    seq_len: int = 64
    """``text``: tokens per training sequence (a sample is seq_len inputs and the next tokens)."""
    tokenizer: Literal["auto", "bytes", "checkpoint"] = "auto"
    """``text``: ``bytes`` (byte-level, 256 tokens), ``checkpoint`` (model.checkpoint's), or
    ``auto`` (the checkpoint's where it has one, otherwise bytes)."""

    def __post_init__(self) -> None:
        _check_choices(self, "data.")
        for key in ("n_train", "n_test", "shards_per_node"):
            _positive(f"data.{key}", getattr(self, key))
        if self.n_classes < 2:
            raise ConfigError(f"data.n_classes must be at least 2, got {self.n_classes}")
        if not self.sample_shape or any(d <= 0 for d in self.sample_shape):
            raise ConfigError(
                f"data.sample_shape must be positive sizes, got {list(self.sample_shape)}"
            )
        if self.name == "text":
            _check_text(self)
        if self.name == "cifar10" and (
            tuple(self.sample_shape) != (3, 32, 32) or self.n_classes != 10
        ):
            raise ConfigError(
                "data.name 'cifar10' has 10 classes of [3, 32, 32] images; got data.sample_shape"
                f" = {list(self.sample_shape)}, data.n_classes = {self.n_classes}"
            )
        if self.augment and len(self.sample_shape) != 3:
            raise ConfigError("data.augment needs image-shaped samples [C, H, W]")
        if not (math.isfinite(self.noise) and 0 <= self.noise <= MAX_NOISE):
            raise ConfigError(
                f"data.noise must be a number from 0 to {MAX_NOISE:g} (past about 10 the data "
                f"are noise alone; far past it they overflow float32), got {self.noise!r}"
            )
        _check_alpha(self.alpha)


MASTER_CHUNK_ALIGN = 65536
"""``train.master_chunk_elements`` is a multiple of this: chunk bounds at multiples of every
vector width and of ATen's element-wise grain (32768), so a chunk's elements take the same
kernel paths as in the whole tensor."""


@_cfg()
class TrainConfig:
    rounds: int = 5
    """Rounds: in Snake Learning, one round is one visit of the model to every node."""
    local_epochs: int = 1
    """Passes over the node's own data at each turn (ignored when local_steps > 0)."""
    local_steps: int = 0
    """If > 0: optimiser steps per turn instead of epochs."""
    batch_size: int = 64
    """Training mini-batch size."""
    lr: float = 0.05
    """Learning rate."""
    optimizer: Literal["sgd", "adam", "adamw", "adamw8bit"] = "sgd"
    """``sgd`` (momentum), ``adam``, ``adamw``, or ``adamw8bit`` (lean: torchao's AdamW with
    8-bit moments in blocks of 256, 2 bytes per parameter instead of 8; needs ``torchao``, the
    ``lean`` extra; compiled by ``torch.compile`` on its first step); state only for trainable
    blocks, only during a turn."""
    momentum: float = 0.9
    """SGD momentum (0 disables the momentum buffer)."""
    weight_decay: float = 0.01
    """AdamW's decoupled weight decay (``adamw`` and ``adamw8bit`` only)."""
    eval_batch_size: int = 512
    """Batch size for evaluation."""
    lr_schedule: Literal["constant", "cosine"] = "constant"
    """Learning rate over rounds: ``constant`` (``lr`` throughout) or ``cosine`` (round r of R
    trains at ``lr * (1 + cos(pi * r / R)) / 2``); every scheme."""
    fused_step: bool = False
    """Lean: step the optimiser inside the backward pass, one parameter as soon as its gradient
    is complete (torch's post-accumulate-grad hooks), so the whole segment's gradient is never
    held at once. Same weights as off (the optimisers are per-element); needs no global
    gradient norm (there is none)."""
    mmap_threshold_bytes: int = 0
    """Lean: glibc's ``M_MMAP_THRESHOLD`` for this process, set before the model is built
    (``mallopt``): allocations at least this large are mapped and handed back to the OS when
    freed. 0 keeps glibc's default, a threshold that grows to 32 MiB as large blocks are freed,
    after which a step's freed tensors stay in the heap and in the RSS. No effect on numbers."""
    activation_checkpointing: bool = False
    """Lean: blocks that run with autograd keep only their input and recompute their
    activations in the backward pass (``torch.utils.checkpoint``, RNG state preserved: same
    weights as off). Refused for a trainable block with batch-norm (its statistics would update
    twice)."""
    fused_kernel: bool = False
    """Lean: ``adam`` and ``adamw`` step each parameter in one fused kernel (torch's
    ``fused=True``, CPU or GPU) instead of a chain of element-wise operations, so the step
    holds no temporaries (the eager step holds two fp32 tensors the size of the parameter it
    steps, and the previous one's denominator). Its rounding differs from the eager step's in
    the last bit, so the weights differ from off; they are the same on any thread count."""
    master_chunk_elements: int = 0
    """Lean: hold the fp32 master copy of a larger bf16 parameter as chunks of this many
    elements, each stepped on its own with its gradient made fp32 one chunk at a time, so the
    step's fp32 gradient copy and temporaries are a chunk's, not the largest parameter's. 0:
    one master per parameter. A multiple of 65536 (the kernels' vector and thread blocks stay
    aligned): the same weights as 0."""
    stochastic_rounding: bool = False
    """Lean: a bf16 parameter keeps no fp32 master copy; the optimiser steps it in place and
    rounds each update to bf16 stochastically (torchao's ``bf16_stochastic_round``: up or down
    with the probabilities of the fp32 value's distance to each, so the rounding is unbiased
    and small updates are not lost), saving 4 bytes per trained parameter. ``adamw8bit`` and
    ``model.dtype = "bfloat16"`` only; the weights differ from off. Its random bits come from
    torch's global generator, seeded at each turn from the node's own generator (the run's
    seed): the same config and seed give the same weights."""

    def __post_init__(self) -> None:
        _check_choices(self, "train.")
        if self.stochastic_rounding and self.optimizer != "adamw8bit":
            raise ConfigError(
                "train.stochastic_rounding applies to train.optimizer = 'adamw8bit' (torchao's "
                f"bf16 stochastic rounding), not {self.optimizer!r}"
            )
        if self.stochastic_rounding and self.master_chunk_elements:
            raise ConfigError(
                "train.master_chunk_elements does not apply with train.stochastic_rounding: "
                "there are no fp32 masters to chunk"
            )
        if self.master_chunk_elements < 0 or self.master_chunk_elements % MASTER_CHUNK_ALIGN:
            raise ConfigError(
                "train.master_chunk_elements must be 0 (one master per parameter) or a positive "
                f"multiple of {MASTER_CHUNK_ALIGN}, got {self.master_chunk_elements}"
            )
        if self.fused_kernel and self.optimizer not in ("adam", "adamw"):
            raise ConfigError(
                "train.fused_kernel applies to train.optimizer = 'adam' or 'adamw' (torch's "
                f"fused kernels), not {self.optimizer!r}"
            )
        for key in ("rounds", "local_epochs", "batch_size", "lr", "eval_batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        if self.rounds > 100_000:
            raise ConfigError(f"train.rounds = {self.rounds} is implausibly large (limit 100000)")
        if self.local_steps < 0:
            raise ConfigError(f"train.local_steps must be >= 0, got {self.local_steps}")
        if not (0 <= self.momentum < 1):
            raise ConfigError(f"train.momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ConfigError(f"train.weight_decay must be >= 0, got {self.weight_decay}")
        if not 0 <= self.mmap_threshold_bytes <= 2**25:
            raise ConfigError(
                "train.mmap_threshold_bytes must be 0 (glibc's default) or at most 32 MiB "
                f"(33554432), got {self.mmap_threshold_bytes}"
            )


@_cfg()
class KDConfig:
    weight: float = 1.0
    """Knowledge distillation weight lambda (0: off); the teacher is the model as received.
    1 by default (why: the label-skew study, docs/label-skew.md);
    a language model that does not set it gets 0 (``LM_KD_WEIGHT``)."""
    temperature: float = 2.0
    """Distillation temperature T (> 0)."""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise ConfigError(f"snake.kd.weight must be a finite number >= 0, got {self.weight}")
        _positive("snake.kd.temperature", self.temperature)


@_cfg()
class SnakeConfig:
    mode: Literal["p2p", "cs"] = "p2p"
    """``p2p``: each node hands the model straight to the next node on the ring; ``cs``: rank 0
    is a controller that holds the model and does not train, nodes are ranks 1..N-1."""
    ends: Literal["all", "owner", "frozen"] = "all"
    """Stem and head: ``all`` nodes train them, ``owner`` (node 0: stem, last: head), ``frozen``.
    ``all`` by default: under label skew a head only the last node trains learns
    that node's classes; a classifier's stem and head are small, so little traffic is added.
    A language model that does not set it gets ``owner`` (``LM_ENDS``): its embeddings and head
    are large."""
    transfer: Literal["delta", "full"] = "delta"
    """``delta``: a hop carries blocks newer than the receiver's copy; ``full``: the whole model."""
    capabilities: tuple[float, ...] = ()
    """Relative compute capability per node (empty: all equal); weaker nodes get fewer blocks."""
    capability: Literal["declared", "measure"] = "declared"
    """``declared`` (``capabilities``) or ``measure``: every node times a few training steps of
    each block at start-up and the assignment follows the measured speeds."""
    block_cost: Literal["params", "equal"] = "params"
    """Cost of a middle block for the assignment: ``params`` (parameter count) or ``equal``."""
    final_sync: bool = True
    """After the last round, pass the final model around the ring so every rank holds it."""
    keep: Literal["all", "own"] = "all"
    """What a node stores between turns: ``all`` (the whole model) or ``own`` (only the blocks it
    trains; the others are freed once it has handed the model on, and travel to it again)."""
    frozen_weights: Literal["full", "int8"] = "full"
    """How the middle blocks that one node trains (or none does) are held and sent: ``full``
    (the model's dtype) or ``int8`` (torchao's weight-only int8 of their linear layers, 1 byte
    per weight, at every rank; the owner trains a full-precision copy it keeps and sends its
    blocks quantised after each turn: ``schemes/frozen.py``). A lean-node option of a language
    model (docs/memory.md); not with checkpoints (``checkpoint.every = 0``)."""
    kd: KDConfig = field(default_factory=KDConfig)
    """Knowledge distillation at every turn (``[snake.kd]``)."""
    logit_adjust: float = 1.0
    """tau of logit adjustment: each turn's training loss is the cross-entropy of ``logits +
    tau * log(prior)``, the prior being the node's own label frequencies (Menon et al. 2021;
    balanced softmax), so a node does not pull the head toward its own labels; 0: plain
    cross-entropy. Classification only (a language model's loss is unchanged). No traffic."""
    prox_mu: float = 0.01
    """mu of a proximal term ``mu/2 * ||w - w_received||^2`` on the trainable blocks at every turn
    (FedProx, Li et al. 2020); 0: off. 0.01 by default (with the distillation and logit
    adjustment, the best variant of the label-skew study, docs/label-skew.md); a language
    model that does not set it gets 0 (``LM_PROX_MU``)."""

    def __post_init__(self) -> None:
        _check_choices(self, "snake.")
        _off_or_positive("snake.logit_adjust", self.logit_adjust)
        _off_or_positive("snake.prox_mu", self.prox_mu)
        for i, cap in enumerate(self.capabilities):
            if not (math.isfinite(cap) and cap > 0):
                raise ConfigError(
                    f"snake.capabilities[{i}] must be a positive finite number, got {cap}"
                )


@_cfg()
class FedAvgConfig:
    clients_per_round: int = 0
    """Clients sampled (seeded, without replacement) each round; 0: every client."""
    logit_adjust: float = 0.0
    """tau of logit adjustment with the client's own label prior (see ``snake.logit_adjust``);
    0 (default): plain FedAvg, the paper's baseline."""
    prox_mu: float = 0.0
    """FedProx's mu: ``mu/2 * ||w - w_global||^2`` in every client's loss; 0: plain FedAvg."""

    def __post_init__(self) -> None:
        if self.clients_per_round < 0:
            raise ConfigError(
                f"fedavg.clients_per_round must be >= 0 (0: all), got {self.clients_per_round}"
            )
        _off_or_positive("fedavg.logit_adjust", self.logit_adjust)
        _off_or_positive("fedavg.prox_mu", self.prox_mu)


@_cfg()
class SplitConfig:
    cut: int = 2
    """Split learning and SplitFed: clients hold blocks ``0 .. cut-1``, the server the rest."""


@_cfg()
class EmulateConfig:
    slowdown: tuple[float, ...] = ()
    """Per-rank compute slowdown factor (>= 1; empty: none): a rank's measured compute time is
    stretched by sleeping, so a fast machine can stand in for a weak edge device."""
    bandwidth_bps: float = 0.0
    """Every link's bandwidth in bits/s (0: as fast as the machine): a transfer of B bytes takes
    at least ``latency_s + 8 B / bandwidth_bps`` (the real transfer still happens)."""
    latency_s: float = 0.0
    """Every link's latency in seconds."""
    edges: tuple[str, ...] = ()
    """Per-edge overrides, each ``"SRC->DST BANDWIDTH_BPS LATENCY_S"`` (directed, ranks)."""

    def __post_init__(self) -> None:
        for i, f in enumerate(self.slowdown):
            if not (math.isfinite(f) and f >= 1):
                raise ConfigError(f"emulate.slowdown[{i}] must be a finite number >= 1, got {f}")
        _off_or_positive("emulate.bandwidth_bps", self.bandwidth_bps)
        _off_or_positive("emulate.latency_s", self.latency_s)
        for e in self.edges:
            parse_edge(e)


@_cfg()
class CommConfig:
    deadline_s: float = 600.0
    """Longest wait for any one message from a peer before the job aborts naming it."""
    gpu_transfer: Literal["auto", "direct", "staged"] = "auto"
    """How weights leave a GPU rank: ``direct`` (device buffers to a CUDA-aware MPI),
    ``staged`` (through one pinned host buffer per direction), ``auto`` (direct only where the
    MPI library confirms CUDA support). Ignored on CPU ranks."""
    hop_buffers: Literal["views", "copy"] = "views"
    """Where a hop's bytes come from and land: ``views`` (each block's state lives in one
    contiguous buffer that its parameters view; a hop sends it and a receive lands in it, no
    copy on a CPU rank) or ``copy`` (the blocks are packed into a new payload before each send
    and copied back after each receive: how hops worked before; kept to measure against).
    The bytes on the wire and the training math are the same."""
    hop_plans: bool = True
    """With ``views`` on a CPU rank: a hop that repeats (the ring's) is sent and received by a
    plan made once (header words and persistent MPI requests over the block buffers) instead
    of building the transfer every hop; ``false``: the general path every hop, to measure
    against. Same bytes, messages and training math."""
    pipelined_min_bytes: int = 0
    """0 (off): every payload message goes as it is, which Open MPI's shared-memory transport
    moves by one copy (CMA, the receiver's core alone). N > 0, where every rank's hops move
    host memory: messages of at least N bytes between ranks on the same host go as a
    non-contiguous datatype (the buffer's halves swapped), which that transport moves by its
    copy-in/copy-out pipeline (sender and receiver copying at once, two cores). With
    N = 64 MiB the benchmarks here ran 23 % faster from 64 MiB (``bench/one_message.py``), but
    the OPT-1.3B Snake hop did not (0.31-0.48 s against 0.36-0.39 s): both ranks must keep
    polling at once, so measure on your machine. Same bytes, messages and training math."""

    def __post_init__(self) -> None:
        _check_choices(self, "comm.")
        _positive("comm.deadline_s", self.deadline_s)
        if self.pipelined_min_bytes < 0:  # an integer: from_dict checks the type
            raise ConfigError(
                "comm.pipelined_min_bytes must be an integer >= 0 (0: off), "
                f"got {self.pipelined_min_bytes}"
            )


@_cfg()
class ProbeConfig:
    enabled: bool = True
    """Run the per-rank memory/CPU sampler thread."""
    interval_s: float = 0.1
    """Sampler period in seconds."""

    def __post_init__(self) -> None:
        _positive("probes.interval_s", self.interval_s)


@_cfg()
class DebugConfig:
    fail_rank: int = -1
    """Test hook: rank that fails on purpose (-1: none)."""
    fail_round: int = 0
    """Test hook: round at whose start the fault happens."""
    fail_kind: Literal["exception", "exit", "hang", "kill", "kill_in_checkpoint"] = "exception"
    """Test hook: ``exception``, ``exit`` (sys.exit(3)), ``hang`` (never sends again),
    ``kill`` (SIGKILL, as the OOM killer would: no handler runs), or ``kill_in_checkpoint``
    (SIGKILL inside the checkpoint taken after round ``fail_round``, once this rank's file is
    written under its temporary name and before it is renamed and the manifest is written)."""

    def __post_init__(self) -> None:
        _check_choices(self, "debug.")


@_cfg()
class CheckpointConfig:
    every: int = 5
    """Rounds between checkpoints (after round ``every``, ``2 * every``, ...; never after the
    last round); 0: no periodic checkpoints, and no SIGUSR1 handling either."""
    keep: int = 2
    """Committed checkpoints kept (older ones are deleted once a newer one is committed)."""
    dir: str = ""
    """Directory of the checkpoints; empty: ``OUT.ckpt`` beside the result file ``OUT``.
    Every rank writes its own file there, so on a cluster it must be a shared file system."""

    def __post_init__(self) -> None:
        if self.every < 0:
            raise ConfigError(f"checkpoint.every must be 0 (off) or positive, got {self.every}")
        if self.keep < 1:
            raise ConfigError(f"checkpoint.keep must be at least 1, got {self.keep}")


@_cfg()
class EvalConfig:
    after_each_turn: bool = False
    """Every rank that trains also evaluates the model right after its turn, before handing it
    on (``/rounds/turn_accuracy``; time in ``eval_s``): the accuracy across the ring, turn by
    turn. One test-set evaluation per turn; schemes whose training rank holds the whole model
    only (not ``split``, ``splitfed``)."""


@_cfg()
class RunConfig:
    scheme: str = "snake"
    """Distributed learning scheme to run."""
    seed: int = 0
    """Root seed; per-rank streams come from numpy SeedSequence(seed).spawn(world_size)."""
    torch_threads: int = 0
    """torch threads per rank; 0: the host's cores divided by the ranks on that host."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each rank trains: ``auto`` (its GPU when torch sees one, else the CPU), ``cpu``,
    or ``cuda`` (an error on a host without a usable GPU). GPUs by local rank, round-robin."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    snake: SnakeConfig = field(default_factory=SnakeConfig)
    fedavg: FedAvgConfig = field(default_factory=FedAvgConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    emulate: EmulateConfig = field(default_factory=EmulateConfig)
    comm: CommConfig = field(default_factory=CommConfig)
    probes: ProbeConfig = field(default_factory=ProbeConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)

    def __post_init__(self) -> None:
        _check_choices(self, "")
        if not 0 <= self.seed < SEED_LIMIT:
            raise ConfigError(f"seed must be an integer in [0, 2**63), got {self.seed}")
        if self.torch_threads < 0:
            raise ConfigError(
                f"torch_threads must be >= 0 (0: automatic), got {self.torch_threads}"
            )
        _check_model_for_data(self)
        _check_lm(self)
        _check_split(self)
        _check_latencies(self)


# ---------------------------------------------------------------- loading


def load_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """Read a TOML file (defaults if ``path`` is None), apply ``key=value`` overrides, validate
    what the config alone says (a run's config: ``schemes.rules.checked_config``)."""
    raw: dict[str, Any] = {}
    if path is not None:
        raw = _read_toml(Path(path))
    for item in overrides:
        _apply_override(raw, item)
    return from_dict(raw)


def _read_toml(p: Path) -> dict[str, Any]:
    """The TOML table of a config file; any file that is not readable TOML text is a
    ``ConfigError`` naming it."""
    if p.is_dir():
        raise ConfigError(f"config path {p} is a directory; give a TOML file")
    try:
        text = p.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {p}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{p} is not a text file (not UTF-8 at byte {e.start}); give a TOML config"
        ) from None
    except OSError as e:
        raise ConfigError(f"config file {p} cannot be read: {e.strerror or e}") from None
    if "\x00" in text:
        raise ConfigError(f"{p} is not a text file (it contains NUL bytes); give a TOML config")
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None


STORED_BEFORE_IT_EXISTED: dict[tuple[str, str], Any] = {
    ("snake", "logit_adjust"): 0.0,
    ("snake", "prox_mu"): 0.0,
    ("comm", "hop_buffers"): "copy",
    ("comm", "hop_plans"): False,
}
"""Settings whose default differs from what the code did before they existed: a stored
config (a result file's, a checkpoint's) that lacks one was made without it."""


def stored_config(text: str) -> RunConfig:
    """The config a result file or checkpoint stored (``to_toml`` text), with every setting it
    lacks because it was written before that setting existed taken as the code then behaved
    (``STORED_BEFORE_IT_EXISTED``), not as today's default."""
    raw = tomllib.loads(text)
    for (section, key), value in STORED_BEFORE_IT_EXISTED.items():
        table = raw.get(section)
        if isinstance(table, dict) and key not in table:
            table[key] = value
    return from_dict(raw)


LM_ENDS = "owner"
"""``snake.ends`` of a language model that does not set it: its embeddings and head are most
of its bytes, and its loss has no label prior to correct (``SnakeConfig.ends``)."""
LM_KD_WEIGHT = 0.0
"""``snake.kd.weight`` of a language model that does not set it: the teacher's forward pass
would cost as much as the student's, its copy of the trained blocks adds to the memory the
paper's claim is about, and the label-skew measurements behind the classifiers' default do
not apply to next-token prediction."""
LM_PROX_MU = 0.0
"""``snake.prox_mu`` of a language model that does not set it: its anchors would be one more
copy of the trained blocks (the same reasons as ``LM_KD_WEIGHT``)."""


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, checked as far as the config alone tells (the rest:
    ``schemes.rules.check``); unknown keys are errors. A language model
    (``model.family = "lm"``) gets ``LM_ENDS``, ``LM_KD_WEIGHT`` and ``LM_PROX_MU`` for the
    ``[snake]`` settings it does not set, not the classifiers' defaults (the resolved values
    are what the result file stores)."""
    model, snake = raw.get("model"), raw.get("snake")
    is_lm = isinstance(model, dict) and model.get("family") == "lm"
    if is_lm and (snake is None or isinstance(snake, dict)):
        snake = dict(snake or {})
        snake.setdefault("ends", LM_ENDS)
        snake.setdefault("prox_mu", LM_PROX_MU)
        kd = snake.get("kd")
        if kd is None or isinstance(kd, dict):
            snake["kd"] = {"weight": LM_KD_WEIGHT, **(kd or {})}
        raw = {**raw, "snake": snake}
    return _build(RunConfig, raw, "")


def _apply_override(raw: dict[str, Any], item: str) -> None:
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. train.rounds=3)")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()  # a bare word is a string: --set scheme=snake
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a table")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str) -> Any:
    where = prefix.rstrip(".") or "the top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a table, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {prefix + unknown[0]!r} in {where}; "
            f"known keys: {', '.join(sorted(names))}"
        )
    kwargs = {}
    for name, value in raw.items():
        kwargs[name] = _coerce(hints[name], value, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except TypeError as e:  # pragma: no cover - dataclass signature mismatch
        raise ConfigError(f"{where}: {e}") from None


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin = typing.get_origin(tp)
    if origin is tuple:
        (item_tp, _ellipsis) = typing.get_args(tp)
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(item_tp, v, f"{key}[{i}]") for i, v in enumerate(value))
    if origin is Literal:  # its values: _check_choices, once the section is built
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    if origin is types.UnionType:  # pragma: no cover - no optional fields yet
        raise ConfigError(f"{key}: unsupported type")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp}")  # pragma: no cover


# ---------------------------------------------------------------- validation


_CHOICES: dict[type, tuple[tuple[str, tuple[str, ...]], ...]] = {}


def _choice_fields(cls: type) -> tuple[tuple[str, tuple[str, ...]], ...]:
    """(name, allowed values) of every ``Literal`` field of config section ``cls``."""
    if cls not in _CHOICES:
        hints = typing.get_type_hints(cls)
        _CHOICES[cls] = tuple(
            (f.name, typing.get_args(hints[f.name]))
            for f in fields(cls)
            if typing.get_origin(hints[f.name]) is Literal
        )
    return _CHOICES[cls]


def _check_choices(section: object, prefix: str) -> None:
    """Every ``Literal`` field of ``section`` holds one of its values (keys named ``prefix``
    + field name)."""
    for name, allowed in _choice_fields(type(section)):
        value = getattr(section, name)
        if value not in allowed:
            raise ConfigError(
                f"unknown {prefix}{name} {value!r}; choose one of: {', '.join(allowed)}"
            )


def choices(cls: type, name: str) -> tuple[str, ...]:
    """The values the ``Literal`` field ``name`` of config section ``cls`` allows."""
    return dict(_choice_fields(cls))[name]


DEVICES = choices(RunConfig, "device")
GPU_TRANSFERS = choices(CommConfig, "gpu_transfer")
"""The choices of ``device`` and ``comm.gpu_transfer`` (``device.py`` reads them)."""


def _positive(key: str, value: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
        raise ConfigError(f"{key} must be a positive finite number, got {value!r}")


def _off_or_positive(key: str, value: float) -> None:
    if not (math.isfinite(value) and value >= 0):
        raise ConfigError(f"{key} must be a finite number >= 0 (0: off), got {value}")


def _check_alpha(a: float) -> None:
    """The Dirichlet concentration: positive and finite."""
    if math.isnan(a) or math.isinf(a) or a <= 0:
        what = "NaN" if math.isnan(a) else ("infinite" if math.isinf(a) else "not positive")
        raise ConfigError(
            f"data.alpha (Dirichlet concentration) must be > 0 and finite, got {a} ({what})"
        )


def _check_text(d: DataConfig) -> None:
    """Text data: IID sequences of a positive length, no image augmentation."""
    if d.partition != "iid":
        raise ConfigError("data.name 'text' supports data.partition = 'iid' only")
    if d.augment:
        raise ConfigError("data.augment is for images, not data.name 'text'")
    _positive("data.seq_len", d.seq_len)


def _check_model_for_data(c: RunConfig) -> None:
    """The image models get images of sizes they take."""
    shape = list(c.data.sample_shape)
    if c.model.family in ("cnn", "vgg11") and len(shape) != 3:
        raise ConfigError(
            f"model.family {c.model.family!r} needs image-shaped samples [C, H, W], "
            f"got data.sample_shape = {shape}"
        )
    if c.model.family == "vgg11" and any(side % 32 for side in shape[1:]):
        raise ConfigError(
            f"model.family 'vgg11' needs image sides that are multiples of 32, "
            f"got data.sample_shape = {shape}"
        )


def _check_lm(c: RunConfig) -> None:
    """A language model goes with text data (and a checkpoint's tokenizer with a checkpoint);
    its preset's name and its scheme are ``schemes.rules``' checks."""
    lm, text = c.model.family == "lm", c.data.name == "text"
    if lm != text:
        raise ConfigError(
            "model.family 'lm' and data.name 'text' go together; got model.family = "
            f"{c.model.family!r} with data.name = {c.data.name!r}"
        )
    if lm and c.data.tokenizer == "checkpoint" and not c.model.checkpoint:
        raise ConfigError("data.tokenizer = 'checkpoint' needs model.checkpoint")
    if c.scheme == "snake" and c.snake.frozen_weights == "int8":
        if not lm:
            raise ConfigError(
                "snake.frozen_weights = 'int8' quantises a language model's decoder layers: "
                f"it needs model.family = 'lm', got {c.model.family!r}"
            )
        if c.checkpoint.every:
            raise ConfigError(
                "snake.frozen_weights = 'int8': the owners' full-precision copies are not in "
                f"checkpoints; set checkpoint.every = 0 (got {c.checkpoint.every})"
            )
    if c.train.stochastic_rounding and c.model.dtype != "bfloat16":
        raise ConfigError(
            "train.stochastic_rounding rounds bf16 weights: it needs model.dtype = 'bfloat16' "
            f"(an lm), got {c.model.dtype!r}"
        )


def _check_split(c: RunConfig) -> None:
    """Split learning's cut leaves the clients and the server at least one block each."""
    n_blocks = c.model.middle_blocks + 2
    if c.model.family != "lm" and not (1 <= c.split.cut <= n_blocks - 1):
        raise ConfigError(
            f"split.cut must be between 1 and {n_blocks - 1} (the model has {n_blocks} blocks: "
            f"clients hold blocks 0..cut-1, the server the rest), got {c.split.cut}"
        )


def _check_latencies(c: RunConfig) -> None:
    """Every emulated link's latency is below the deadline of a message."""
    for key, lat in [("emulate.latency_s", c.emulate.latency_s)] + [
        (f"emulate.edges entry {e!r}: latency", parse_edge(e)[3]) for e in c.emulate.edges
    ]:
        if lat >= c.comm.deadline_s:
            raise ConfigError(
                f"{key} = {lat:g} s is not below comm.deadline_s = {c.comm.deadline_s:g} s: "
                "every hop would outlast the deadline"
            )


def parse_edge(text: str) -> tuple[int, int, float, float]:
    """``"SRC->DST BANDWIDTH_BPS LATENCY_S"`` -> (src, dst, bandwidth_bps, latency_s)."""
    try:
        pair, bps, lat = text.split()
        src, dst = (int(v) for v in pair.split("->"))
        out = (src, dst, float(bps), float(lat))
    except ValueError:
        raise ConfigError(
            f'emulate.edges entry {text!r} is not of the form "SRC->DST BANDWIDTH_BPS '
            f'LATENCY_S", e.g. "0->1 1e8 0.002"'
        ) from None
    if out[0] < 0 or out[1] < 0 or out[0] == out[1]:
        raise ConfigError(f"emulate.edges entry {text!r}: ranks must be two different ranks >= 0")
    if not all(math.isfinite(v) and v >= 0 for v in out[2:]):
        raise ConfigError(f"emulate.edges entry {text!r}: bandwidth and latency must be >= 0")
    return out


def check_output(out: str | os.PathLike[str], *, overwrite: bool) -> Path:
    """The result path must be new (or --overwrite) and its directory writable."""
    p = Path(out)
    if p.is_symlink():
        target = os.readlink(p)
        state = "" if p.exists() else ", which does not exist"
        raise ConfigError(
            f"output {p} is a symbolic link (to {target}{state}); give the path of the file "
            "itself: a result is written beside its name and renamed into place, which would "
            "replace the link, not write its target"
        )
    if p.is_dir():
        raise ConfigError(f"output {p} is a directory; give a file name such as {p / 'run.h5'}")
    if p.exists() and not overwrite:
        raise ConfigError(f"output file {p} exists; pass --overwrite to replace it")
    parent = p.parent if str(p.parent) else Path(".")
    if not parent.is_dir():
        raise ConfigError(f"output directory {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"output directory {parent} is not writable")
    return p


# ---------------------------------------------------------------- TOML out


def to_toml(c: Any) -> str:
    """The resolved config as TOML text (stored in every result file; loads back identically).

    Written by ``tomli-w`` (a well-kept writer that escapes every string TOML can hold) from
    the dataclasses as plain dicts; tuples become arrays."""
    return tomli_w.dumps(_plain(c))


def _plain(v: Any) -> Any:
    """Dataclasses as dicts and tuples as lists, recursively: what ``tomli_w`` writes."""
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in fields(v)}
    if isinstance(v, tuple | list):
        return [_plain(x) for x in v]
    return v
