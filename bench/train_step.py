"""Throughput of snake_mpi's training step (``train.train_local``) against a bare PyTorch loop:
the same model, the same data, the same trainable blocks (a Snake node's segment), the same
optimiser and the same batch indices, on one device. Target: ratio >= 0.95.

    python -m bench.train_step                        # CPU, both models, ~30 s on 2 cores
    python -m bench.train_step --device cuda --out-table results/train_step.md

Models: ``opt-tiny`` (the decoder LM of bench/configs/llm/tiny-snake.toml, fp32, byte vocabulary,
sequence 64) and ``cnn`` (the CNN of bench/configs/demo.toml on CIFAR-shaped input), each with
the config's optimiser, learning rate and batch size, on random data held in host memory (both
loops move each batch to the device). A trial times one turn of ``--steps`` optimiser steps,
optimiser creation included; trials alternate which loop goes first, from the same weights and
generator seed, and the best of ``--trials`` is kept. CUDA is synchronised before each clock
read. The bare loop mirrors what ``train_local`` computes (frozen blocks in eval mode without
gradients, the blocks below the segment run without autograd, float32 cross-entropy) but reads
the loss back only once per turn; after the warm-up the two loops' weights are compared.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from snake_mpi.blocks import BlockModel
from snake_mpi.config import TrainConfig, load_config
from snake_mpi.models import build_model
from snake_mpi.train import adamw8bit_class, train_local

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {
    "opt-tiny": REPO / "bench" / "configs" / "llm" / "tiny-snake.toml",
    "cnn": REPO / "bench" / "configs" / "demo.toml",
}
N_SAMPLES = 1024
VOCAB = 256
"""The byte tokenizer's vocabulary (the tiny LM's input and output size)."""


@dataclasses.dataclass
class Workload:
    name: str
    model: BlockModel
    x: torch.Tensor
    y: torch.Tensor
    train: TrainConfig
    trainable: list[int]


def workload(name: str, device: torch.device, steps: int) -> Workload:
    """Model on ``device`` (seed 0), random data on the host, the config's training settings
    with ``local_steps = steps``, and the segment of node 0 of two Snake nodes."""
    cfg = load_config(CONFIGS[name])
    gen = torch.Generator().manual_seed(0)
    if cfg.model.family == "lm":
        n_classes = VOCAB
        x = torch.randint(0, VOCAB, (N_SAMPLES, cfg.data.seq_len), generator=gen)
        y = torch.randint(0, VOCAB, (N_SAMPLES, cfg.data.seq_len), generator=gen)
    else:
        n_classes = cfg.data.n_classes
        x = torch.randn((N_SAMPLES, *cfg.data.sample_shape), generator=gen)
        y = torch.randint(0, n_classes, (N_SAMPLES,), generator=gen)
    model = build_model(
        cfg.model, sample_shape=tuple(cfg.data.sample_shape), n_classes=n_classes, seed=0
    ).to(device)
    middle = model.middle_ids
    train = dataclasses.replace(cfg.train, local_steps=steps)
    return Workload(name, model, x, y, train, middle[: max(1, len(middle) // 2)])


def make_optimizer(params: list[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum)


def bare_turn(w: Workload, generator: torch.Generator) -> float:
    """A hand-written turn: thaw the segment, one optimiser, ``local_steps`` steps over fresh
    permutations; the mean loss read back once at the end."""
    model, cfg = w.model, w.train
    dev = next(model.parameters()).device
    keep = set(w.trainable)
    params = []
    for b, mod in enumerate(model.blocks):
        mod.train(b in keep)
        for p in mod.parameters():
            p.requires_grad_(b in keep)
            if b in keep:
                params.append(p)
    opt = make_optimizer(params, cfg)
    lowest = min(w.trainable)
    total = torch.zeros((), device=dev)
    done = 0
    while done < cfg.local_steps:
        perm = torch.randperm(len(w.x), generator=generator)
        for start in range(0, len(w.x), cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            xb = w.x[idx].to(dev, non_blocking=True)
            yb = w.y[idx].to(dev, non_blocking=True)
            opt.zero_grad(set_to_none=True)
            with torch.no_grad():
                for blk in model.blocks[:lowest]:
                    xb = blk(xb)
            for blk in model.blocks[lowest:]:
                xb = blk(xb)
            loss = F.cross_entropy(xb.reshape(-1, xb.shape[-1]).float(), yb.reshape(-1))
            loss.backward()
            opt.step()
            total += loss.detach() * len(idx)
            done += 1
            if done == cfg.local_steps:
                break
    opt.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
    return float(total) / max(1, done * cfg.batch_size)


def snake_turn(w: Workload, generator: torch.Generator, **lean: Any) -> float:
    """``train_local``'s turn, with the config's ``train`` settings changed by ``lean``."""
    cfg = dataclasses.replace(w.train, **lean) if lean else w.train
    return train_local(w.model, w.trainable, w.x, w.y, cfg=cfg, generator=generator).loss


LEAN: dict[str, dict[str, Any]] = {
    "fused step": {"fused_step": True},
    "activation checkpointing": {"activation_checkpointing": True},
    "8-bit AdamW": {"optimizer": "adamw8bit"},
    "fused kernel": {"fused_kernel": True},
    "all three": {"fused_step": True, "activation_checkpointing": True, "optimizer": "adamw8bit"},
}
"""The lean node's options (``--lean``), each timed against the bare loop."""


def timed(fn: Callable[[], object], sync: Callable[[], None]) -> float:
    sync()
    t0 = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t0


Turn = Callable[[Workload, torch.Generator], float]


def best_times(
    w: Workload, turns: dict[str, Turn], trials: int, sync: Callable[[], None]
) -> tuple[dict[str, float], dict[str, float], dict[str, list[float]]]:
    """A warm-up turn of each (the weights after it kept; a compiling option compiles there),
    then ``trials`` interleaved timed turns from the same starting weights and batch order, the
    order reversed every other trial. Returns the best time of each, the weights' largest
    difference from the first turn's, and each turn's time in every trial."""
    start = {k: v.detach().clone() for k, v in w.model.state_dict().items()}
    after = {}
    for name, turn in turns.items():
        w.model.load_state_dict(start)
        turn(w, torch.Generator().manual_seed(0))
        after[name] = {k: v.detach().clone() for k, v in w.model.state_dict().items()}
    first = next(iter(turns))
    diff = {
        name: max(float((after[first][k].float() - a[k].float()).abs().max()) for k in start)
        for name, a in after.items()
    }
    times: dict[str, list[float]] = {name: [] for name in turns}
    for t in range(trials):
        order = list(turns) if t % 2 == 0 else list(turns)[::-1]
        for name in order:
            w.model.load_state_dict(start)
            gen = torch.Generator().manual_seed(0)
            times[name].append(timed(lambda n=name, g=gen: turns[n](w, g), sync))
    w.model.load_state_dict(start)
    return {n: min(ts) for n, ts in times.items()}, diff, times


def paired_ratio(times: dict[str, list[float]], name: str) -> float:
    """The median over trials of bare's time / ``name``'s time in the same trial: steadier than
    the ratio of the best times when the machine's load drifts."""
    return statistics.median(b / t for b, t in zip(times["bare"], times[name], strict=True))


def compare(w: Workload, trials: int, sync: Callable[[], None]) -> dict[str, float | str]:
    """snake_mpi's turn against the bare loop: samples per second of each (best of
    ``trials``), their ratio, the median paired ratio, and whether the weights agree."""
    turns: dict[str, Turn] = {"bare": bare_turn, "snake_mpi": snake_turn}
    best, diff, times = best_times(w, turns, trials, sync)
    samples = w.train.local_steps * w.train.batch_size
    bare, snake = samples / best["bare"], samples / best["snake_mpi"]
    d = diff["snake_mpi"]
    return {
        "model": w.name,
        "blocks": f"{min(w.trainable)}-{max(w.trainable)} of {w.model.n_blocks}",
        "batch": w.train.batch_size,
        "steps": w.train.local_steps,
        "optimizer": w.train.optimizer,
        "bare": bare,
        "snake_mpi": snake,
        "ratio": snake / bare,
        "paired": paired_ratio(times, "snake_mpi"),
        "weights": "identical" if d == 0 else f"max |diff| {d:.2e}",
        "diff": d,
    }


def lean_options() -> list[str]:
    """The ``LEAN`` options this environment can run: without torchao (a machine with no
    registry, e.g. the GPU machine) those with the 8-bit AdamW are left out, with a line."""
    try:
        adamw8bit_class()
    except ImportError as e:
        print(f"train_step: --lean without the 8-bit AdamW: {e}", file=sys.stderr)
        return [n for n, over in LEAN.items() if over.get("optimizer") != "adamw8bit"]
    return list(LEAN)


def compare_lean(w: Workload, trials: int, sync: Callable[[], None]) -> list[dict[str, Any]]:
    """Each lean option's turn against the bare loop (and the plain snake_mpi turn)."""
    turns: dict[str, Turn] = {"bare": bare_turn, "plain": snake_turn}
    for name in lean_options():
        turns[name] = functools.partial(snake_turn, **LEAN[name])
    best, diff, times = best_times(w, turns, trials, sync)
    samples = w.train.local_steps * w.train.batch_size
    return [
        {
            "model": w.name,
            "variant": name,
            "samples_s": samples / best[name],
            "ratio": best["bare"] / best[name],
            "paired": paired_ratio(times, name),
            "weights": "identical" if diff[name] == 0 else f"max |diff| {diff[name]:.2e}",
        }
        for name in turns
        if name != "bare"
    ]


WEIGHT_TOLERANCE = 1e-4
"""Largest weight difference after one turn still counted as the same training (0 on CPU)."""


def format_table(rows: list[dict[str, float | str]], head: str) -> str:
    lines = [
        head,
        "",
        "| model | trainable blocks | batch | steps | optimiser | bare samples/s "
        "| snake_mpi samples/s | ratio | median paired ratio | weights after a turn |",
        "|" + " --- |" * 10,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['blocks']} | {r['batch']} | {r['steps']} | {r['optimizer']} "
            f"| {r['bare']:.1f} | {r['snake_mpi']:.1f} | **{r['ratio']:.3f}** "
            f"| {r['paired']:.3f} | {r['weights']} |"
        )
    return "\n".join(lines)


def format_lean(rows: list[dict[str, Any]]) -> str:
    lines = [
        "The lean options against the bare loop (the 8-bit AdamW replaces the config's "
        "optimiser, so its weights differ by design):",
        "",
        "| model | turn | samples/s | / bare (best) | / bare (median paired) "
        "| weights after a turn (against bare) |",
        "|" + " --- |" * 6,
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['variant']} | {r['samples_s']:.1f} | {r['ratio']:.3f} "
            f"| {r['paired']:.3f} | {r['weights']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--steps", type=int, default=0, help="optimiser steps per turn (default 20; cuda: 100)"
    )
    ap.add_argument("--trials", type=int, default=3, help="interleaved trials, best kept")
    ap.add_argument("--models", default="opt-tiny,cnn", help="comma-separated: opt-tiny, cnn")
    ap.add_argument("--out-table", type=Path, help="also write the table (markdown) here")
    ap.add_argument(
        "--lean", action="store_true", help="also time the lean options (train.fused_step, ...)"
    )
    args = ap.parse_args(argv)
    names = [m.strip() for m in args.models.split(",") if m.strip()]
    if not names or any(m not in CONFIGS for m in names):
        ap.error(f"--models takes a comma-separated list of {', '.join(CONFIGS)}")
    if args.trials < 1 or args.steps < 0:
        ap.error("--trials must be >= 1 and --steps >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        print(
            f"train_step: --device cuda but torch {torch.__version__} sees no CUDA device "
            f"(CUDA build: {torch.version.cuda})",
            file=sys.stderr,
        )
        return 2
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    steps = args.steps or (100 if args.device == "cuda" else 20)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    where = torch.cuda.get_device_name(0) if args.device == "cuda" else "CPU"
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan
    head = (
        f"train step, {args.device} ({where}; torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {load:.2f} on {os.cpu_count()} CPUs "
        f"at the start): {steps} steps per turn, best of {args.trials} interleaved trials"
    )
    rows = [compare(workload(name, device, steps), args.trials, sync) for name in names]
    table = format_table(rows, head)
    if args.lean:
        lean = [
            r for n in names for r in compare_lean(workload(n, device, steps), args.trials, sync)
        ]
        table += "\n\n" + format_lean(lean)
    print(table)
    print()
    for r in rows:
        print(
            f"ratio {r['model']}: {r['ratio']:.3f} (snake_mpi / bare samples/s; target >= 0.95; "
            f"median paired {r['paired']:.3f})"
        )
    if args.out_table:
        args.out_table.parent.mkdir(parents=True, exist_ok=True)
        args.out_table.write_text(table + "\n")
    # the two loops must do the same work: equal weights (GPU kernels such as an embedding's
    # backward accumulate in a varying order, so allow float noise there, not a different step)
    wrong = [r["model"] for r in rows if not r["diff"] <= WEIGHT_TOLERANCE]
    if wrong:
        print(f"train_step: the loops trained different weights for {', '.join(wrong)}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
