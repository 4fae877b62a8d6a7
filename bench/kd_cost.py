"""What the default distillation (``snake.kd.weight = 1``, issue 14) costs a Snake turn: the same
turn of ``train.train_local`` with and without ``kd``, side by side, on the label-skew sweep's
two workloads — the demo CNN (bench/configs/demo.toml) and the narrow VGG-11
(bench/configs/paper/snake-p2p-iid-small.toml) — with each config's optimiser, batch size and
logit adjustment, and the segment a middle node trains by default (``ends = "all"``: stem,
its share of the middle blocks, head).

    python -m bench.kd_cost                 # CPU, ~1 minute on 2 cores
    python -m bench.kd_cost --device cuda

A trial times one turn of ``--steps`` optimiser steps from the same weights and batch order;
trials alternate which variant goes first and the best of ``--trials`` is kept. Memory: the
turn's training state (``LocalResult.train_state_bytes``: optimiser state, gradients and, with
KD, the teacher's copy of the trained blocks) — what KD adds to a node's memory beyond the
teacher's forward activations, which are freed each step (no autograd graph). KD sends nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from snake_mpi.config import load_config
from snake_mpi.models import build_model
from snake_mpi.schemes.snake import plan_segments
from snake_mpi.train import KDSpec, TurnOptions, label_log_prior, train_local

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "demo-cnn": REPO / "bench" / "configs" / "demo.toml",
    "vgg11-small": REPO / "bench" / "configs" / "paper" / "snake-p2p-iid-small.toml",
}
N_SAMPLES = 2048
NODES = 4


def turn_workload(name: str, device: torch.device, steps: int):
    """Model (seed 0) on ``device``, random CIFAR-shaped data with a skewed label prior, the
    config's training settings with ``local_steps = steps``, and node 1's segment of 4."""
    cfg = load_config(CONFIGS[name])
    gen = torch.Generator().manual_seed(0)
    n_classes = cfg.data.n_classes
    x = torch.randn((N_SAMPLES, *cfg.data.sample_shape), generator=gen)
    y = torch.randint(0, n_classes // 2, (N_SAMPLES,), generator=gen)  # half the classes
    model = build_model(
        cfg.model, sample_shape=tuple(cfg.data.sample_shape), n_classes=n_classes, seed=0
    ).to(device)
    plan = plan_segments(model, cfg.snake, NODES)
    train = dataclasses.replace(cfg.train, local_steps=steps)
    shift = cfg.snake.logit_adjust * label_log_prior(y, n_classes)
    options = TurnOptions(logit_shift=shift, lr=train.lr)
    kd = KDSpec(cfg.snake.kd.weight or 1.0, cfg.snake.kd.temperature)
    return cfg, model, x, y, train, list(plan[1]), options, kd


def measure(name: str, device: torch.device, steps: int, trials: int) -> dict[str, object]:
    cfg, model, x, y, train, trainable, options, kd = turn_workload(name, device, steps)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}
    variants = {"no KD": None, "KD": kd}
    best = dict.fromkeys(variants, float("inf"))
    state = {}
    for t in range(trials + 1):  # the first round is a warm-up
        order = list(variants) if t % 2 == 0 else list(variants)[::-1]
        for v in order:
            model.load_state_dict(start)
            gen = torch.Generator().manual_seed(0)
            sync()
            t0 = time.perf_counter()
            res = train_local(
                model, trainable, x, y, cfg=train, generator=gen, kd=variants[v], options=options
            )
            sync()
            if t > 0:
                best[v] = min(best[v], time.perf_counter() - t0)
            state[v] = res.train_state_bytes
    return {
        "model": name,
        "blocks": f"{', '.join(map(str, trainable))} of {model.n_blocks}",
        "batch": train.batch_size,
        "steps": steps,
        "no_kd_s": best["no KD"],
        "kd_s": best["KD"],
        "time_ratio": best["KD"] / best["no KD"],
        "no_kd_state": state["no KD"],
        "kd_state": state["KD"],
        "state_ratio": state["KD"] / state["no KD"],
    }


def format_table(rows: list[dict[str, object]], head: str) -> str:
    lines = [
        head,
        "",
        "| model | node 1's blocks | batch | steps | turn, no KD (s) | turn, KD (s) | time × "
        "| train state, no KD (KiB) | with KD (KiB) | memory × |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['blocks']} | {r['batch']} | {r['steps']} | {r['no_kd_s']:.3f} "
            f"| {r['kd_s']:.3f} | **{r['time_ratio']:.2f}** | {r['no_kd_state'] / 1024:.0f} "
            f"| {r['kd_state'] / 1024:.0f} | **{r['state_ratio']:.2f}** |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--steps", type=int, default=20, help="optimiser steps per turn (default 20)")
    ap.add_argument("--trials", type=int, default=3, help="interleaved trials, best kept")
    ap.add_argument("--out-table", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("kd_cost: --device cuda, but torch sees no CUDA device", file=sys.stderr)
        return 2
    torch.set_num_threads(1)
    device = torch.device(args.device)
    rows = [measure(name, device, args.steps, args.trials) for name in CONFIGS]
    head = (
        f"Distillation's cost per Snake turn ({args.device}, {torch.get_num_threads()} thread, "
        f"best of {args.trials} interleaved trials; python -m bench.kd_cost):"
    )
    table = format_table(rows, head)
    print(table)
    if args.out_table:
        args.out_table.parent.mkdir(parents=True, exist_ok=True)
        args.out_table.write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
