"""Local training of a node's trainable blocks, and evaluation. No MPI here.

Frozen blocks get no gradients and no optimiser state, and the blocks below the lowest
trainable one run without autograd, so no activations are kept for them.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
import torch.nn.functional as F

from snake_mpi.blocks import (
    BlockModel,
    block_tensors,
    copy_modules,
    model_device,
    module_tensors,
    optimizer_state_bytes,
    set_trainable,
    training_state_bytes,
)
from snake_mpi.config import TrainConfig
from snake_mpi.probes.memory import release_free_memory


@dataclass(frozen=True, slots=True)
class KDSpec:
    """Knowledge distillation against the model as the node received it."""

    weight: float
    """lambda: the KD term's weight in the loss (0 leaves the gradient exactly unchanged)."""
    temperature: float
    """T: logits are divided by T; the KD term is scaled by T^2 (Hinton et al.)."""


def _rows(logits: torch.Tensor) -> torch.Tensor:
    """Logits as (predictions, classes) in float32: a language model's (B, T, V) becomes
    (B*T, V), one prediction per token."""
    if logits.dim() == 3:
        logits = logits.reshape(-1, logits.shape[-1])
    return logits.float()


def task_loss(logits: torch.Tensor, y: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy: per sample (classification) or per token (language model, y = the next
    tokens, shape (B, T))."""
    return F.cross_entropy(_rows(logits), y.reshape(-1), reduction=reduction)


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the predictions
    (samples, or tokens of a language model)."""
    t = temperature
    return (t * t) * F.kl_div(
        F.log_softmax(_rows(student) / t, dim=1),
        F.log_softmax(_rows(teacher) / t, dim=1),
        log_target=True,
        reduction="batchmean",
    )


class Teacher:
    """The model as it was at the start of the turn, for KD: a frozen copy of only the blocks
    that train, and of blocks that share a tensor with them (tied weights); the other blocks do
    not change during the turn and are shared."""

    def __init__(self, model: BlockModel, trainable: Sequence[int]) -> None:
        self.model = model
        ids = set(trainable)
        if model.tied_tensors():
            trained = {id(t) for b in trainable for t in block_tensors(model, b)}
            ids |= {
                b
                for b in range(model.n_blocks)
                if any(id(t) in trained for t in module_tensors(model.blocks[b]))
            }
        # one copy, so that tensors shared between the copied blocks stay shared
        self.copies = copy_modules({b: model.blocks[b] for b in sorted(ids)})
        for m in self.copies.values():
            m.eval()
            for p in m.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for b in range(self.model.n_blocks):
            x = self.copies.get(b, self.model.blocks[b])(x)
        return x

    def nbytes(self) -> int:
        """Bytes of the copied blocks (part of the node's training state), each tensor once."""
        seen = {id(t): t for m in self.copies.values() for t in module_tensors(m)}
        return sum(t.numel() * t.element_size() for t in seen.values())


@dataclass(frozen=True, slots=True)
class TurnOptions:
    """Changes to a turn's loss and step size against label skew (all off by default)."""

    logit_shift: torch.Tensor | None = None
    """Per class, ``tau * log(prior)`` of the node's own labels: added to the logits in the
    training loss only (logit adjustment / balanced softmax, Menon et al. 2021), so the turn
    learns the class-conditional likelihood, not the node's label prior. None: plain loss."""
    prox_mu: float = 0.0
    """mu of the proximal term ``mu/2 * ||w - w_received||^2`` over the trainable parameters
    (FedProx, Li et al. 2020); 0 adds nothing (the gradient is exactly the plain one)."""
    lr: float | None = None
    """This turn's learning rate (a schedule over rounds); None: ``train.lr``."""


def label_log_prior(y: torch.Tensor, n_classes: int, *, floor: float = 1e-6) -> torch.Tensor:
    """``log(prior)`` of the labels ``y`` over ``n_classes`` classes, each prior at least
    ``floor`` (a class the node never sees gets a large negative shift: it is left alone by
    the node's loss rather than pushed down)."""
    counts = torch.bincount(y.reshape(-1).long(), minlength=n_classes)[:n_classes].double()
    prior = counts / counts.sum().clamp(min=1.0)
    return prior.clamp(min=floor).log().float()


def adjusted_task_loss(
    logits: torch.Tensor, y: torch.Tensor, shift: torch.Tensor | None
) -> torch.Tensor:
    """Cross-entropy of ``logits + shift`` (the shift broadcast over the class axis); plain
    ``task_loss`` when ``shift`` is None."""
    if shift is None:
        return task_loss(logits, y)
    return task_loss(_rows(logits) + shift.to(logits.device), y)  # a no-op once on it


def prox_term(params: Sequence[torch.Tensor], anchors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum ||p - a||^2`` over the parameters and their values at the turn's start."""
    total = torch.zeros((), device=params[0].device, dtype=torch.float32)
    for p, a in zip(params, anchors, strict=True):
        total = total + (p.float() - a.float()).pow(2).sum()
    return total


class NonFiniteLoss(FloatingPointError):
    """Training produced a NaN or infinite loss: nothing after it means anything."""

    def __init__(self, value: float, step: int) -> None:
        super().__init__(f"non-finite training loss ({value}) at step {step}")
        self.value = value
        self.step = step


def checked_loss(loss: torch.Tensor, step: int) -> float:
    """The loss as a float; ``NonFiniteLoss`` if it is NaN or infinite (before the step that
    would spread it into the weights)."""
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLoss(value, step)
    return value


@dataclass(frozen=True, slots=True)
class LocalResult:
    """What one turn of local training did and held."""

    loss: float
    """Mean task (cross-entropy) loss over the turn's batches."""
    kd_loss: float
    """Mean KD term (before weighting) over the turn's batches; NaN without KD."""
    samples: int
    steps: int
    trainable_params: int
    train_state_bytes: int
    """Weights held + gradients + optimiser state at the end of the turn."""


def round_lr(cfg: TrainConfig, round_: int) -> float:
    """The learning rate of round ``round_`` (0-based) under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * round_ / cfg.rounds))
    return cfg.lr


def make_optimizer(
    params: list[torch.nn.Parameter], cfg: TrainConfig, lr: float | None = None
) -> torch.optim.Optimizer:
    """The configured optimiser over exactly the trainable parameters (at ``lr`` if given,
    else ``cfg.lr``)."""
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum)
    fused = True if cfg.fused_kernel else None  # None: torch's default (its eager step here)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, fused=fused)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused)
    if cfg.optimizer == "adamw8bit":
        return lean_adamw8bit(
            params,
            lr=lr,
            weight_decay=cfg.weight_decay,
            stochastic_rounding=cfg.stochastic_rounding,
        )
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def adamw8bit_class() -> Callable[..., torch.optim.Optimizer]:
    """torchao's ``AdamW8bit``; ``ImportError`` naming the install if torchao is absent."""
    try:
        from torchao.optim import AdamW8bit
    except ImportError as e:
        raise ImportError(
            "train.optimizer = 'adamw8bit' needs torchao: pip install 'snake-mpi[lean]' "
            f"(or pip install torchao) ({e})"
        ) from e
    return AdamW8bit


def lean_adamw8bit(
    params: list[torch.nn.Parameter],
    *,
    lr: float,
    weight_decay: float,
    stochastic_rounding: bool = False,
) -> torch.optim.Optimizer:
    """torchao's ``AdamW8bit``: 8-bit moments with a scale per block of 256 (parameters under
    4,096 elements keep fp32 moments); ``stochastic_rounding``: bf16 parameters are stepped in
    place, each update rounded to bf16 stochastically."""
    return adamw8bit_class()(
        params, lr=lr, weight_decay=weight_decay, bf16_stochastic_round=stochastic_rounding
    )


def preload_optimizer(cfg: TrainConfig) -> None:
    """Import the optimiser's library now (``adamw8bit``: torchao and torch's compiler), so
    that it counts in the baseline memory as the other libraries do, and a missing one stops
    the run before the model is built."""
    if cfg.optimizer == "adamw8bit":
        adamw8bit_class()


def master_bounds(n: int, chunk: int) -> list[tuple[int, int]]:
    """The element ranges of the fp32 masters of an ``n``-element parameter: chunks of
    ``chunk`` elements (``train.master_chunk_elements``), or one master (0, or ``n`` no larger)."""
    if not chunk or n <= chunk:
        return [(0, n)]
    return [(a, min(n, a + chunk)) for a in range(0, n, chunk)]


class Optimiser:
    """The configured optimiser; parameters held in a low precision (bf16) get fp32 master
    copies, so that the optimiser state and the update are fp32 (mixed precision): after each
    step the master is rounded back into the model's parameter. With
    ``cfg.stochastic_rounding`` there are no masters: the optimiser (torchao's) steps the bf16
    parameter itself and rounds the update stochastically.

    ``fused``: one optimiser per parameter, stepped by a hook as soon as that parameter's
    gradient is complete in the backward pass; the gradient is dropped right after, so at most
    one parameter's gradient (and its fp32 copy) exists at a time. The optimisers are
    per-element, so the weights are those of the unfused step. ``close`` removes the hooks.

    ``cfg.master_chunk_elements`` > 0: a parameter's fp32 master is held as separate chunks of
    that many elements (of the flattened parameter), each its own optimiser parameter, and its
    gradient is converted to fp32 one chunk at a time, so the step's fp32 copies and
    temporaries are a chunk's, not the parameter's. Per-element optimisers, chunks aligned to
    the kernels' vector and thread blocks: the same weights as whole masters.
    """

    def __init__(
        self,
        params: list[torch.nn.Parameter],
        cfg: TrainConfig,
        lr: float | None = None,
        *,
        fused: bool = False,
    ) -> None:
        self.params = params
        self.masters: dict[int, list[torch.nn.Parameter]] = {}
        """Per low-precision parameter, its fp32 master: one tensor, or its chunks in order."""
        self._bounds: dict[int, list[tuple[int, int]]] = {}
        targets: list[list[torch.nn.Parameter]] = []
        for i, p in enumerate(params):
            if p.dtype == torch.float32 or cfg.stochastic_rounding:  # stepped in place
                targets.append([p])
                continue
            chunk = cfg.master_chunk_elements if p.is_contiguous() else 0
            self._bounds[i] = master_bounds(p.numel(), chunk)
            # new fp32 tensors: no clone
            self.masters[i] = [torch.nn.Parameter(t.detach().float()) for t in self._pieces(i, p)]
            targets.append(self.masters[i])
        self.fused = fused
        self.opts = (
            [make_optimizer(t, cfg, lr) for t in targets]
            if fused
            else [make_optimizer([m for t in targets for m in t], cfg, lr)]
        )
        self._hooks = (
            [p.register_post_accumulate_grad_hook(self._step_hook(i)) for i, p in enumerate(params)]
            if fused
            else []
        )

    def master_parameters(self) -> list[torch.nn.Parameter]:
        """Every fp32 master tensor (chunks counted one by one)."""
        return [m for ms in self.masters.values() for m in ms]

    def _pieces(self, i: int, t: torch.Tensor) -> list[torch.Tensor]:
        """Parameter ``i``'s tensor ``t`` (the parameter or its gradient) as its masters cut
        it: ``t`` itself, or views of its flattened elements, one per chunk."""
        bounds = self._bounds[i]
        if len(bounds) == 1:
            return [t]
        flat = t.reshape(-1)
        return [flat[a:b] for a, b in bounds]

    def _take_grads(self, i: int) -> list[torch.Tensor]:
        """Parameter ``i``'s gradient, taken off it, as its chunks in reverse order: each is
        popped, made fp32 and let go, so the whole low-precision gradient goes with its last
        chunk (empty: no gradient)."""
        p = self.params[i]
        grad, p.grad = p.grad, None
        return [] if grad is None else self._pieces(i, grad)[::-1]

    def _step_hook(self, i: int) -> Callable[[torch.Tensor], None]:
        def hook(_: torch.Tensor) -> None:
            self._step_one(i)

        return hook

    @torch.no_grad()
    def _step_one(self, i: int) -> None:
        p = self.params[i]
        ms = self.masters.get(i)
        if ms is None:
            self.opts[i].step()
        else:  # a chunk at a time: only the master with a gradient steps
            grads = self._take_grads(i)
            for m, piece in zip(ms, self._pieces(i, p), strict=True):
                m.grad = grads.pop().float() if grads else None
                self.opts[i].step()
                m.grad = None
                piece.copy_(m)
        p.grad = None

    def zero_grad(self) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """The step over every parameter (nothing when fused: the backward pass stepped)."""
        if self.fused:
            return
        for i, ms in self.masters.items():
            grads = self._take_grads(i)  # the fp32 copies replace it
            for m in ms:
                m.grad = grads.pop().float() if grads else None
        self.opts[0].step()
        for i, ms in self.masters.items():
            for m, piece in zip(ms, self._pieces(i, self.params[i]), strict=True):
                piece.copy_(m)

    def close(self) -> None:
        """Remove the fused step's hooks (the parameters train unhooked afterwards)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []

    def state_bytes(self) -> int:
        """Bytes of the optimiser state (moments, momentum, step counters)."""
        return sum(optimizer_state_bytes(opt) for opt in self.opts)

    def master_bytes(self) -> int:
        """The fp32 master weights and their gradients (0 for fp32 models)."""
        return sum(
            t.numel() * t.element_size()
            for m in self.master_parameters()
            for t in (m, m.grad)
            if t is not None
        )


def turn_batches(n: int, cfg: TrainConfig, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches for one turn: ``local_steps`` steps, or ``local_epochs`` passes, each pass
    a fresh permutation drawn from ``generator``."""
    if cfg.local_steps > 0:
        done = 0
        while done < cfg.local_steps:
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.batch_size):
                yield perm[start : start + cfg.batch_size]
                done += 1
                if done == cfg.local_steps:
                    return
    else:
        for _ in range(cfg.local_epochs):
            perm = torch.randperm(n, generator=generator)
            for start in range(0, n, cfg.batch_size):
                yield perm[start : start + cfg.batch_size]


def turn_batch_sizes(n: int, cfg: TrainConfig) -> list[int]:
    """Sizes of the batches ``turn_batches`` yields for ``n`` samples (pure: no permutation), so
    that a split-learning server knows how many steps a client takes, and analysis the bytes."""
    if n <= 0:
        return []
    epoch = [min(cfg.batch_size, n - start) for start in range(0, n, cfg.batch_size)]
    if cfg.local_steps > 0:
        return [epoch[i % len(epoch)] for i in range(cfg.local_steps)]
    return epoch * cfg.local_epochs


class StepObserver(Protocol):
    """Looks at every training step of ``train_local`` (measurement, e.g. the memory ledger of
    bench/memory_ledger.py); installed with ``observe_steps``. It must not change anything."""

    def forward_context(self, model: BlockModel) -> contextlib.AbstractContextManager[object]:
        """Entered around each step's forward and backward pass of ``model`` (e.g. saved-tensor
        hooks)."""
        ...

    def after_backward(self, params: Sequence[torch.nn.Parameter], opt: Optimiser) -> None:
        """After the backward pass, before the optimiser step (the gradients exist)."""
        ...

    def after_step(self, params: Sequence[torch.nn.Parameter], opt: Optimiser) -> None:
        """After the optimiser step (its state and the fp32 masters' gradients exist)."""
        ...


_OBSERVERS: list[StepObserver] = []


@contextlib.contextmanager
def observe_steps(observer: StepObserver) -> Iterator[None]:
    """Call ``observer`` at every step of ``train_local`` in this process while the block runs;
    without one a step pays nothing for this."""
    _OBSERVERS.append(observer)
    try:
        yield
    finally:
        _OBSERVERS.remove(observer)


_UNOBSERVED = contextlib.nullcontext()
"""The step's context without observers: one object, reused by every step."""


def _observed(
    model: BlockModel, observers: Sequence[StepObserver]
) -> contextlib.AbstractContextManager[object]:
    if not observers:
        return _UNOBSERVED
    stack = contextlib.ExitStack()
    for o in observers:
        stack.enter_context(o.forward_context(model))
    return stack


def seed_rounding(generator: torch.Generator) -> None:
    """Seed torch's global generators, which torchao's stochastic rounding draws from (also
    inside its compiled step), from the turn's generator: the rounding's random bits then
    follow the run's seed and this node's data stream, not whatever else used the global
    generator before the turn."""
    torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))


def train_local(
    model: BlockModel,
    trainable: Sequence[int],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    cfg: TrainConfig,
    generator: torch.Generator,
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
    kd: KDSpec | None = None,
    options: TurnOptions = TurnOptions(),
    on_step: Callable[[int], None] | None = None,
) -> LocalResult:
    """Train blocks ``trainable`` on ``(x, y)``; everything else stays frozen and bit-identical.

    With ``kd`` the loss is ``task + weight * kd_term(student, teacher)``, the teacher being the
    model as it was when the turn began; ``options`` add logit adjustment, a proximal term and
    the turn's learning rate (``TurnOptions``). ``on_step`` is called after each step with the steps
    done so far (progress of a long turn: ``Recorder.step_reporter``).
    """
    if not trainable:
        raise ValueError("a turn needs at least one trainable block")
    teacher = Teacher(model, trainable) if kd is not None else None
    params = set_trainable(model, trainable)
    refuse_recompute_with_batch_norm(model, trainable, cfg)
    if cfg.stochastic_rounding:
        seed_rounding(generator)
    opt = Optimiser(params, cfg, options.lr, fused=cfg.fused_step)
    mu = options.prox_mu
    anchors = [p.detach().clone() for p in params] if mu > 0 else []
    lowest = min(trainable)
    dev = model_device(model)
    shift = None if options.logit_shift is None else options.logit_shift.to(dev)  # once a turn
    total_loss, total_kd, samples, steps = 0.0, 0.0, 0, 0
    observers = tuple(_OBSERVERS)  # once a turn, not looked up each step
    try:
        for idx in turn_batches(len(x), cfg, generator):
            opt.zero_grad()
            xb = x[idx] if augment is None else augment(x[idx], generator)
            xb, yb = xb.to(dev, non_blocking=True), y[idx].to(dev, non_blocking=True)
            with _observed(model, observers):
                logits = model(xb, no_grad_below=lowest, recompute=cfg.activation_checkpointing)
                task = adjusted_task_loss(logits, yb, shift)
                task_value = checked_loss(task, steps)
                loss = task
                if teacher is not None and kd is not None:
                    distil = kd_term(logits, teacher(xb), kd.temperature)
                    loss = loss + kd.weight * distil
                    total_kd += checked_loss(distil, steps) * len(idx)
                if mu > 0:
                    loss = loss + (mu / 2) * prox_term(params, anchors)
                loss.backward()
            for o in observers:
                o.after_backward(params, opt)
            opt.step()
            for o in observers:
                o.after_step(params, opt)
            total_loss += task_value * len(idx)
            samples += len(idx)
            steps += 1
            if on_step is not None:
                on_step(steps)
    finally:
        opt.close()  # a fused step's hooks go with the turn, also when it fails
    synchronize(model)  # the last step's kernels belong to the turn's compute time
    state = training_state_bytes(model, None)["total"] + opt.state_bytes() + opt.master_bytes()
    state += teacher.nbytes() if teacher else 0
    state += sum(a.numel() * a.element_size() for a in anchors)
    opt.zero_grad()
    used_kd = teacher is not None
    del opt, teacher, anchors
    set_trainable(model, [])
    release_free_memory()  # the turn's state is gone: let the RSS show it
    return LocalResult(
        loss=total_loss / max(samples, 1),
        kd_loss=total_kd / max(samples, 1) if used_kd else math.nan,
        samples=samples,
        steps=steps,
        trainable_params=sum(p.numel() for p in params),
        train_state_bytes=state,
    )


def refuse_recompute_with_batch_norm(
    model: BlockModel, trainable: Sequence[int], cfg: TrainConfig
) -> None:
    """``ValueError`` for activation checkpointing over a trainable block with batch-norm: the
    recomputed forward pass would update its running statistics a second time."""
    if not cfg.activation_checkpointing:
        return
    for b in trainable:
        if any(
            isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.blocks[b].modules()
        ):
            raise ValueError(
                f"train.activation_checkpointing: block {b} has batch-norm, whose running "
                "statistics the recomputed forward pass would update twice; turn it off for "
                "this model"
            )


def synchronize(model: BlockModel) -> None:
    """Wait for the model's GPU to finish its queued kernels (nothing on a CPU), so that a clock
    read afterwards times the work rather than its launch."""
    device = model_device(model)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass(frozen=True, slots=True)
class Evaluation:
    """A test-set evaluation: mean loss, accuracy, and accuracy per class."""

    loss: float
    accuracy: float
    class_accuracy: np.ndarray
    """Accuracy on each class's test samples (NaN for a class with none); empty unless the
    number of classes was given."""


def evaluate(
    model: BlockModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) on ``(x, y)``, in eval mode; for a language
    model both are per token (next-token loss, whose exp is the perplexity, and top-1 accuracy).
    """
    e = evaluate_detail(model, x, y, batch_size=batch_size)
    return e.loss, e.accuracy


@torch.no_grad()
def evaluate_detail(
    model: BlockModel,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 512,
    n_classes: int = 0,
) -> Evaluation:
    """``evaluate``, and with ``n_classes`` > 0 the accuracy on each class (where label skew
    shows: a class the last trainers did not see falls to 0)."""
    was_training = [m.training for m in model.blocks]
    model.eval()
    dev = model_device(model)
    loss_sum, correct = 0.0, 0
    hits = torch.zeros(max(n_classes, 0), dtype=torch.float64)
    seen = torch.zeros(max(n_classes, 0), dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size].to(dev))
        yb = y[start : start + batch_size].to(dev)
        loss_sum += float(task_loss(out, yb, reduction="sum"))
        right = _rows(out).argmax(1) == yb.reshape(-1)
        correct += int(right.sum())
        if n_classes > 0:
            labels = yb.reshape(-1).long().cpu()
            seen += torch.bincount(labels, minlength=n_classes)[:n_classes].double()
            hits += torch.bincount(labels[right.cpu()], minlength=n_classes)[:n_classes].double()
    for m, t in zip(model.blocks, was_training, strict=True):
        m.train(t)
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.where(seen.numpy() > 0, hits.numpy() / seen.numpy(), np.nan)
    return Evaluation(loss_sum / y.numel(), correct / y.numel(), per_class)
