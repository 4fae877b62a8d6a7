"""Where a lone node's peak is: before its first turn (the model's build, the int8 set-up, the
hop in) or in the turn's steps (issue 31; docs/memory.md, "Frozen blocks as int8"). Node K of
an N-node ring runs alone (``bench.lone_node.run_lone``) under a step observer that, when the
first step starts, reads the kernel's ``VmRSS`` (what the node holds when its turn begins) and
``VmHWM`` (its peak so far), then resets ``VmHWM`` to the RSS (``5`` into
``/proc/self/clear_refs``), and reads ``VmHWM`` again after every step: the turn's own peak.

    python -m bench.turn_peak bench/configs/llm/opt-1.3b-snake-bf16.toml --nodes 6 --node 5 \\
        --set data.n_test=8 --set 'snake.frozen_weights="int8"' --set checkpoint.every=0

Each figure is over the baseline (the RSS just before the model is built). Linux only. The
reset also resets what ``run_lone`` reads as the process's peak, so measure a node's peak with
``bench.lean_node``, and where it lies with this.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

GIB = 2**30


def vm_bytes() -> dict[str, int]:
    """``VmRSS`` and ``VmHWM`` of this process (bytes)."""
    got = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            got[key] = int(value.split()[0]) * 1024
    return got


class TurnPeak:
    """A step observer (``snake_mpi.train.observe_steps``): the RSS and peak when the first
    step starts, then the steps' own peak."""

    def __init__(self) -> None:
        self.at_turn: dict[str, int] | None = None
        self.turn_peak_bytes = 0

    @contextlib.contextmanager
    def forward_context(self, model: torch.nn.Module) -> Iterator[None]:
        if self.at_turn is None:
            self.at_turn = vm_bytes()
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        yield

    def after_backward(self, params: Sequence[torch.nn.Parameter], opt: Any) -> None:
        self.turn_peak_bytes = max(self.turn_peak_bytes, vm_bytes()["VmHWM"])

    def after_step(self, params: Sequence[torch.nn.Parameter], opt: Any) -> None:
        self.turn_peak_bytes = max(self.turn_peak_bytes, vm_bytes()["VmHWM"])


def measure(config: str, nodes: int, node: int, sets: list[str]) -> dict[str, float]:
    """The node's moments, GiB over its baseline."""
    from bench.lone_node import run_lone
    from snake_mpi.config import load_config
    from snake_mpi.train import observe_steps

    cfg = load_config(config, sets)
    watch = TurnPeak()
    with observe_steps(watch):
        result, _ = run_lone(cfg, node, nodes)
    if watch.at_turn is None:
        raise RuntimeError(f"node {node} took no step")
    base = result.rss_before_model_bytes
    return {
        "built": (result.rss_model_built_bytes - base) / GIB,
        "peak before the turn": (watch.at_turn["VmHWM"] - base) / GIB,
        "held when the turn starts": (watch.at_turn["VmRSS"] - base) / GIB,
        "peak of the turn's steps": (watch.turn_peak_bytes - base) / GIB,
        # the reset hides the peak before the turn from the run's own reading: both, the larger
        "peak of the run": (max(result.peak_bytes, watch.at_turn["VmHWM"]) - base) / GIB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config")
    ap.add_argument("--nodes", type=int, required=True)
    ap.add_argument("--node", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    got = measure(args.config, args.nodes, args.node, args.set)
    print(f"node {args.node} of {args.nodes}, {Path(args.config).name}: GiB over the baseline")
    for key, gib in got.items():
        print(f"  {key:<28} {gib:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
