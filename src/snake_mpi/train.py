"""Local training of a node's trainable blocks, and evaluation. No MPI here.

Frozen blocks get no gradients and no optimiser state, and the blocks below the lowest
trainable one run without autograd, so no activations are kept for them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from snake_mpi.blocks import BlockModel, module_tensors, set_trainable, training_state_bytes
from snake_mpi.config import TrainConfig


@dataclass(frozen=True, slots=True)
class KDSpec:
    """Knowledge distillation against the model as the node received it."""

    weight: float
    """lambda: the KD term's weight in the loss (0 leaves the gradient exactly unchanged)."""
    temperature: float
    """T: logits are divided by T; the KD term is scaled by T^2 (Hinton et al.)."""


def kd_term(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher / T) || softmax(student / T))``, mean over the batch."""
    t = temperature
    return (t * t) * F.kl_div(
        F.log_softmax(student / t, dim=1),
        F.log_softmax(teacher / t, dim=1),
        log_target=True,
        reduction="batchmean",
    )


class Teacher:
    """The model as it was at the start of the turn, for KD: a frozen copy of only the blocks
    that train (the other blocks do not change during the turn and are shared)."""

    def __init__(self, model: BlockModel, trainable: Sequence[int]) -> None:
        self.model = model
        self.copies = {b: copy.deepcopy(model.blocks[b]).eval() for b in trainable}
        for m in self.copies.values():
            for p in m.parameters():
                p.requires_grad_(False)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        for b in range(self.model.n_blocks):
            x = self.copies.get(b, self.model.blocks[b])(x)
        return x

    def nbytes(self) -> int:
        """Bytes of the copied blocks (part of the node's training state)."""
        return sum(
            t.numel() * t.element_size() for m in self.copies.values() for t in module_tensors(m)
        )


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


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The configured optimiser over exactly the trainable parameters."""
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    raise ValueError(f"unknown optimizer {cfg.optimizer!r}")


def turn_batches(n: int, cfg: TrainConfig, generator: torch.Generator):
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
) -> LocalResult:
    """Train blocks ``trainable`` on ``(x, y)``; everything else stays frozen and bit-identical.

    With ``kd`` the loss is ``task + weight * kd_term(student, teacher)``, the teacher being the
    model as it was when the turn began.
    """
    if not trainable:
        raise ValueError("a turn needs at least one trainable block")
    teacher = Teacher(model, trainable) if kd is not None else None
    params = set_trainable(model, trainable)
    opt = make_optimizer(params, cfg)
    lowest = min(trainable)
    total_loss, total_kd, samples, steps = 0.0, 0.0, 0, 0
    for idx in turn_batches(len(x), cfg, generator):
        opt.zero_grad(set_to_none=True)
        xb = x[idx] if augment is None else augment(x[idx], generator)
        logits = model(xb, no_grad_below=lowest)
        task = F.cross_entropy(logits, y[idx])
        loss = task
        if teacher is not None:
            distil = kd_term(logits, teacher(xb), kd.temperature)
            loss = task + kd.weight * distil
            total_kd += distil.item() * len(idx)
        loss.backward()
        opt.step()
        total_loss += task.item() * len(idx)
        samples += len(idx)
        steps += 1
    state = training_state_bytes(model, opt)["total"] + (teacher.nbytes() if teacher else 0)
    opt.zero_grad(set_to_none=True)
    del opt
    set_trainable(model, [])
    return LocalResult(
        loss=total_loss / max(samples, 1),
        kd_loss=total_kd / max(samples, 1) if teacher is not None else math.nan,
        samples=samples,
        steps=steps,
        trainable_params=sum(p.numel() for p in params),
        train_state_bytes=state,
    )


@torch.no_grad()
def evaluate(
    model: BlockModel, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy (fraction) on ``(x, y)``, in eval mode."""
    was_training = [m.training for m in model.blocks]
    model.eval()
    loss_sum, correct = 0.0, 0
    for start in range(0, len(x), batch_size):
        out = model(x[start : start + batch_size])
        yb = y[start : start + batch_size]
        loss_sum += float(F.cross_entropy(out, yb, reduction="sum"))
        correct += int((out.argmax(1) == yb).sum())
    for m, t in zip(model.blocks, was_training, strict=True):
        m.train(t)
    return loss_sum / len(x), correct / len(x)
