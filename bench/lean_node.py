"""The lean node's options side by side (issue 31; docs/memory.md#a-lean-node): node K of an
N-node Snake ring, alone (``bench.lone_node``), plain and with each option and with all of them,
each in a process of its own, so each peak is its own: the peak RSS increase over the baseline,
the training state, the training time per step and the test perplexity after the same steps,
each against the plain node, and whether the weights are the plain node's to the bit.

    python -m bench.lean_node bench/configs/llm/opt-1.3b-snake-24x1-bf16.toml --nodes 24 \\
        --node 0 --out results/lean --set data.n_test=8 --table results/lean/opt-24x1.md

The options (``train.*``, docs/reference/configuration.md): ``fused`` (the optimiser step in the
backward pass), ``checkpointing`` (activation checkpointing), ``adamw8bit`` (torchao's 8-bit
AdamW), ``mmap`` (glibc's mmap threshold fixed at 128 KiB), ``kernel`` (torch's fused AdamW
kernel: no step temporaries), ``chunks`` (fp32 masters in chunks of 2^20 elements), ``all``
(fused, checkpointing, 8-bit AdamW, mmap), ``exact`` (fused, checkpointing, mmap, chunks: the
options that keep the plain weights to the bit), ``all32`` (``exact`` and the fused kernel:
fp32 moments), ``rounding`` (8-bit AdamW stepping the bf16 weights with stochastic rounding:
no fp32 masters), ``allsr`` (``all`` and stochastic rounding), ``int8`` (the middle blocks one
node trains held and sent as weight-only int8, ``snake.frozen_weights``) and ``allint8``
(``allsr`` and ``int8``). ``--options`` picks some
(``plain`` is always measured). A measurement whose
JSON exists in ``--out`` is read, not repeated (delete it to measure again). The training time
per step includes the first step's compilation where an option compiles (``adamw8bit``:
``torch.compile`` of its step, cached on disk by torch for the next process);
``bench.train_step --lean`` times the steps without it.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path
from typing import Any

from bench.memory_claim import measure_lone

GIB = 2**30
PAPER_NODE_GIB = 3.13
"""The paper's Snake node (docs/memory.md: reading B is 24 nodes of one decoder layer)."""

OPTIONS: dict[str, list[str]] = {
    "plain": [],
    "fused": ["train.fused_step=true"],
    "checkpointing": ["train.activation_checkpointing=true"],
    "adamw8bit": ['train.optimizer="adamw8bit"'],
    "mmap": ["train.mmap_threshold_bytes=131072"],
    "kernel": ["train.fused_kernel=true"],
    "chunks": ["train.master_chunk_elements=1048576"],
    "rounding": ['train.optimizer="adamw8bit"', "train.stochastic_rounding=true"],
}
OPTIONS["all"] = [
    s for name in ("fused", "checkpointing", "adamw8bit", "mmap") for s in OPTIONS[name]
]
OPTIONS["exact"] = [
    s for name in ("fused", "checkpointing", "mmap", "chunks") for s in OPTIONS[name]
]
OPTIONS["allsr"] = OPTIONS["all"] + ["train.stochastic_rounding=true"]
OPTIONS["int8"] = ['snake.frozen_weights="int8"', "checkpoint.every=0"]
OPTIONS["allint8"] = OPTIONS["allsr"] + OPTIONS["int8"]
OPTIONS["all32"] = [
    s for name in ("fused", "checkpointing", "kernel", "mmap", "chunks") for s in OPTIONS[name]
]

DESCRIBE = {
    "plain": "plain node",
    "fused": "optimiser step fused into the backward pass",
    "checkpointing": "activation checkpointing",
    "adamw8bit": "8-bit AdamW (torchao)",
    "mmap": "mmap threshold 128 KiB (glibc)",
    "kernel": "fused AdamW kernel (torch)",
    "chunks": "fp32 masters in chunks of 2^20 elements",
    "all": "fused step, checkpointing, 8-bit AdamW, mmap",
    "exact": "fused step, checkpointing, mmap, master chunks (the exact four)",
    "all32": "fused step, checkpointing, fused kernel, mmap, master chunks",
    "rounding": "8-bit AdamW, bf16 stochastic rounding, no fp32 masters (torchao)",
    "allsr": "fused step, checkpointing, 8-bit AdamW, mmap, stochastic rounding",
    "int8": "frozen blocks held and sent as weight-only int8 (torchao)",
    "allint8": "fused step, checkpointing, 8-bit AdamW, mmap, stochastic rounding, int8 blocks",
}


def measure(
    config: Path, nodes: int, node: int, names: list[str], sets: list[str], out: Path
) -> dict[str, dict[str, Any] | None]:
    """Each option's lone-node figures (None where the run failed), ``plain`` first."""
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    got = {}
    for name in names:
        path = out / f"{config.stem}-n{nodes}-k{node}-{name}.json"
        got[name] = measure_lone(config, nodes, node, sets + OPTIONS[name], path, env)
    return got


def rows(got: dict[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
    """One row per option: its figures and their ratios to the plain node's."""
    base = got["plain"]
    out = []
    for name, r in got.items():
        if r is None:
            out.append({"option": name, "failed": True})
            continue
        step_s = sum(r["compute_s"]) / max(1, sum(r["steps"]))
        row = {
            "option": name,
            "failed": False,
            "increase_bytes": r["increase_bytes"],
            "train_state_bytes": r["train_state_bytes"],
            "step_s": step_s,
            "perplexity": math.exp(r["eval_loss"]),
            "same_weights": None if base is None else r["model_sha256"] == base["model_sha256"],
        }
        if base is not None:
            base_step = sum(base["compute_s"]) / max(1, sum(base["steps"]))
            row["memory_ratio"] = r["increase_bytes"] / base["increase_bytes"]
            row["step_ratio"] = step_s / base_step
            row["perplexity_change"] = row["perplexity"] / math.exp(base["eval_loss"]) - 1
        out.append(row)
    return out


def format_table(table: list[dict[str, Any]], head: str) -> str:
    """The options table (markdown)."""
    lines = [
        head,
        "",
        "| option | increase GiB | x plain | under 3.13 GiB | train state GiB | s per step "
        "| x plain | perplexity | vs plain | weights |",
        "|" + " --- |" * 10,
    ]
    for r in table:
        if r["failed"]:
            lines.append(f"| {DESCRIBE[r['option']]} | failed |" + " |" * 8)
            continue
        inc = r["increase_bytes"] / GIB
        same = {True: "plain's, to the bit", False: "differ", None: "-"}[r["same_weights"]]
        lines.append(
            f"| {DESCRIBE[r['option']]} | {inc:.3f} | {r.get('memory_ratio', math.nan):.3f} "
            f"| {'yes' if inc <= PAPER_NODE_GIB else 'no'} | {r['train_state_bytes'] / GIB:.3f} "
            f"| {r['step_s']:.3f} | {r.get('step_ratio', math.nan):.2f} | {r['perplexity']:.4f} "
            f"| {100 * r.get('perplexity_change', math.nan):+.3f} % | {same} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path, help="a Snake (p2p) run config")
    ap.add_argument("--nodes", type=int, required=True, help="the ring's size N")
    ap.add_argument("--node", type=int, default=0, help="which node K (default 0)")
    ap.add_argument("--out", type=Path, required=True, help="directory for the JSON and logs")
    ap.add_argument("--options", default=",".join(o for o in OPTIONS if o != "plain"))
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--table", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    picked = [o.strip() for o in args.options.split(",") if o.strip()]
    unknown = [o for o in picked if o not in OPTIONS]
    if unknown:
        ap.error(f"--options: unknown {', '.join(unknown)} (choose from {', '.join(OPTIONS)})")
    names = ["plain"] + [o for o in picked if o != "plain"]
    got = measure(args.config, args.nodes, args.node, names, args.set, args.out)
    head = (
        f"node {args.node} of {args.nodes} alone, {args.config.name}"
        + (f" ({', '.join(args.set)})" if args.set else "")
        + f"; the paper's node: {PAPER_NODE_GIB} GiB"
    )
    table = format_table(rows(got), head)
    print(table)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    return 1 if any(r is None for r in got.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
