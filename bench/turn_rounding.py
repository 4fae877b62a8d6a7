"""What of a turn's update a bf16 weight keeps (issue 31; docs/memory.md, "No fp32 masters"):
a 2048 x 2048 bf16 matrix of N(0, 0.02) weights takes 3 steps of torchao's 8-bit AdamW (a
gradient of fixed signs plus noise), through ``snake_mpi.train.Optimiser`` as a turn does, once
with fp32 masters (the plain node: the masters live for the turn and are rounded to bf16 at its
end) and once with ``train.stochastic_rounding``; printed side by side: the share of weights
that changed and the mean move along the update's direction, as a share of the fp32 masters'
move (what the steps asked).

    python -m bench.turn_rounding
"""

from __future__ import annotations

import torch

from snake_mpi.config import TrainConfig
from snake_mpi.train import Optimiser, seed_rounding


def turn_move(lr: float, stochastic: bool, steps: int = 3) -> tuple[float, float, float]:
    """(share of weights changed, mean move along -sign(gradient), the fp32 masters' mean move
    along it: what the steps asked; NaN with stochastic rounding) after ``steps`` steps."""
    start = (torch.randn(2048, 2048, generator=torch.Generator().manual_seed(0)) * 0.02).to(
        torch.bfloat16
    )
    p = torch.nn.Parameter(start.clone())
    cfg = TrainConfig(
        optimizer="adamw8bit", lr=lr, weight_decay=0.0, stochastic_rounding=stochastic
    )
    opt = Optimiser([p], cfg)
    g = torch.Generator().manual_seed(1)
    seed_rounding(g)
    direction = torch.randn(p.shape, generator=g)
    for _ in range(steps):
        p.grad = (direction + 0.1 * torch.randn(p.shape, generator=g)).to(torch.bfloat16)
        opt.step()
        opt.zero_grad()
    moved = p.detach().float() - start.float()
    asked = float("nan")
    if opt.masters:
        asked = -((opt.masters[0][0].detach() - start.float()) * direction.sign()).mean().item()
    return (moved != 0).float().mean().item(), -(moved * direction.sign()).mean().item(), asked


def main() -> int:
    print(
        "| lr | asked (the fp32 masters' move) | rounded to nearest: weights changed | move kept "
        "| stochastic rounding: weights changed | move kept |"
    )
    print("|---|---|---|---|---|---|")
    for lr in (1e-5, 1e-4, 1e-3):
        (c0, m0, ask), (c1, m1, _) = turn_move(lr, False), turn_move(lr, True)
        print(f"| {lr:g} | {ask:.2e} | {c0:.3f} | {m0 / ask:.3f} | {c1:.3f} | {m1 / ask:.3f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
