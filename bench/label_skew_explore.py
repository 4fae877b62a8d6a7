"""Explore label-skew variants in one process, fast: Snake P2P's turns one after another (the
same ``train_local`` calls, plan, shards, generators and seeds as the MPI run, so the accuracy
is bit-identical to ``snake-mpi run`` with ``snake.keep = "all"``), or FedAvg's clients in turn,
printing after every round the test accuracy, the accuracy per class and, with
``--after-each-turn``, after every node's turn. Options that the MPI run does not have are
tried here first (``--order shuffle``: the ring reshuffled every round).

    python -m bench.label_skew_explore bench/configs/demo.toml --set 'data.partition="dirichlet"'
    python -m bench.label_skew_explore CFG --set snake.logit_adjust=0 --set 'snake.ends="owner"' \
        --set snake.kd.weight=0 --set snake.prox_mu=0          # the defaults before issue 14
    python -m bench.label_skew_explore CFG --scheme fedavg --nodes 4

The MPI suite ``bench/suites/label-skew.toml`` measures what this finds (docs/label-skew.md).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import numpy as np
import torch

from snake_mpi.blocks import block_tensors
from snake_mpi.config import load_config
from snake_mpi.data.augment import crop_flip
from snake_mpi.models import build_model
from snake_mpi.run import build_shards, seeds_for
from snake_mpi.schemes.fedavg import RunningAverage
from snake_mpi.schemes.snake import kd_spec, plan_segments
from snake_mpi.train import (
    TurnOptions,
    evaluate_detail,
    label_log_prior,
    round_lr,
    train_local,
)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], help="config override (repeatable)")
    ap.add_argument("--scheme", choices=["snake", "fedavg"], default="snake")
    ap.add_argument("--nodes", type=int, default=4, help="data-holding nodes (default 4)")
    ap.add_argument("--order", choices=["ring", "shuffle"], default="ring")
    ap.add_argument("--after-each-turn", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    cfg = load_config(args.config, args.set)
    n = args.nodes
    world = n if args.scheme == "snake" else n + 1
    seeds, rank_seeds = seeds_for(cfg.seed, world)
    ds, parts = build_shards(cfg, seeds, world)
    holders = list(range(world)) if args.scheme == "snake" else list(range(1, world))
    shape = tuple(cfg.data.sample_shape)
    model = build_model(cfg.model, sample_shape=shape, n_classes=ds.n_classes, seed=seeds["model"])
    classes = ds.n_classes
    nodes = []
    for rank in holders:
        idx = torch.from_numpy(parts[rank])
        gen = torch.Generator().manual_seed(rank_seeds[rank])
        nodes.append((ds.x_train[idx].contiguous(), ds.y_train[idx].contiguous(), gen))
    for k, (_, y, _) in enumerate(nodes):
        print(f"node {k} labels: {np.bincount(y.numpy(), minlength=classes).tolist()}")
    augment = crop_flip if cfg.data.augment else None
    remedies = cfg.snake if args.scheme == "snake" else cfg.fedavg

    def options(y: torch.Tensor, r: int) -> TurnOptions:
        tau = remedies.logit_adjust
        shift = tau * label_log_prior(y, classes) if tau > 0 else None
        return TurnOptions(logit_shift=shift, prox_mu=remedies.prox_mu, lr=round_lr(cfg.train, r))

    @torch.no_grad()
    def dead_units() -> float:
        """Fraction of the head's input units that are zero on every test sample (dead ReLUs:
        a skewed turn can silence features the other nodes' classes need)."""
        model.eval()
        h = ds.x_test[:512]
        for b in range(model.n_blocks - 1):
            h = model.blocks[b](h)
        model.train()
        h = h.reshape(len(h), -1)
        return float((h.abs().max(dim=0).values == 0).float().mean())

    def test() -> tuple[float, np.ndarray]:
        e = evaluate_detail(model, ds.x_test, ds.y_test, n_classes=classes)
        return e.accuracy, e.class_accuracy

    accs = []
    t0 = time.perf_counter()
    plan = plan_segments(model, cfg.snake, n)
    rng = np.random.default_rng(seeds["sampling"])
    for r in range(cfg.train.rounds):
        turns = []
        if args.scheme == "snake":
            order = [int(i) for i in rng.permutation(n)] if args.order == "shuffle" else range(n)
            for pos, k in enumerate(order):
                x, y, g = nodes[k]
                ids = list(plan[k])
                if args.order == "shuffle" and cfg.snake.ends == "owner":  # ends by position
                    mids = [b for b in ids if 0 < b < model.n_blocks - 1]
                    ids = ([0] if pos == 0 else []) + mids
                    ids += [model.n_blocks - 1] if pos == n - 1 else []
                kd = kd_spec(cfg)
                train_local(
                    model,
                    ids,
                    x,
                    y,
                    cfg=cfg.train,
                    generator=g,
                    augment=augment,
                    kd=kd,
                    options=options(y, r),
                )
                if args.after_each_turn:
                    turns.append(round(test()[0], 3))
        else:
            sizes = np.array([len(y) for _, y, _ in nodes], dtype=float)
            everything = list(range(model.n_blocks))
            avg = RunningAverage.of_blocks(model, everything)
            for k, (x, y, g) in enumerate(nodes):
                local = copy.deepcopy(model)
                train_local(
                    local,
                    everything,
                    x,
                    y,
                    cfg=cfg.train,
                    generator=g,
                    augment=augment,
                    options=options(y, r),
                )
                if args.after_each_turn:
                    e = evaluate_detail(local, ds.x_test, ds.y_test)
                    turns.append(round(e.accuracy, 3))
                tensors = [t for b in everything for t in block_tensors(local, b)]
                avg.add_tensors(tensors, float(sizes[k] / sizes.sum()))
            avg.write()
        acc, per_class = test()
        accs.append(acc)
        after = f" after each turn {turns}" if turns else ""
        print(
            f"round {r + 1}: accuracy {acc:.4f}{after}, dead units {dead_units():.2f}, "
            f"per class {np.round(per_class, 2).tolist()}",
            flush=True,
        )
    print(
        f"final {accs[-1]:.4f}, best {max(accs):.4f}, {time.perf_counter() - t0:.0f} s; "
        f"{args.scheme} {' '.join(args.set)} order={args.order}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
