"""A memory ledger of one training process (issue 31; docs/memory.md#the-ledger): each part of
what a Snake node (or full fine-tuning) holds at its training step's peak, measured from the
tensors that exist and the process's RSS, beside its analytic count from the model's parameter
counts and shapes, and the rest of the peak that no part explains.

    python -m bench.memory_ledger bench/configs/llm/opt-1.3b-snake-24x1-bf16.toml --nodes 24 \\
        --node 0 --json results/ledger/opt-24x1-k0.json        # a Snake node, alone
    python -m bench.memory_ledger bench/configs/llm/opt-1.3b-snake-24x1-bf16.toml --full \\
        --set model.preset='"opt-125m"'                         # full fine-tuning: every block

A Snake node runs as ``bench.lone_node`` runs it (the real node's code path: its segment, its
shard, its hops and buffers); ``--full`` trains every block of the config's model on its
training set in this process (the centralised scheme's turn). ``train_local``'s step observer
(``snake_mpi.train.observe_steps``) reads, at every step: the gradients after the backward pass
and after the optimiser step, the fp32 master copies, the optimiser state (tensor bytes; a
quantised state by its codes and scales), and the activations autograd saved for the backward
pass (each storage once, weights excluded; ``torch.autograd.graph.saved_tensors_hooks``), and
the optimiser step's temporaries (the storages its operations allocate, watched by a
``TorchDispatchMode`` from the end of the backward pass to the end of the step: their largest
total alive at once less what the step keeps; only for an eager step: not ``fused_step``, not
the compiled 8-bit AdamW). The weights are measured by the RSS they added when the model was
built. The peak is the kernel's (``VmHWM``) over the RSS just before the model was built; run
one ledger per process.

Analytic counts: weights = the preset's parameter counts (meta device) x bytes per weight;
fp32 masters 4 B and gradients 4 B per trained parameter (bf16 weights: the fp32 copy of the
gradient is what the step holds; fp32 weights: the gradient itself), none when the step is fused
(one parameter's at a time); with ``train.stochastic_rounding`` no masters and the bf16
gradient, 2 B; AdamW 8 B per trained parameter and a 4-byte step per tensor (8-bit:
torchao's layout); activations of OPT decoder layers (h hidden, f feed-forward, a heads, n tokens
of a batch, e bytes per element): a trained layer saves n*e*(8h + f) + 4*n*e + 4*n*a bytes, a
frozen layer above the segment n*e*(6h + f) + 4*n*e + 4*n*a (no weight gradient: the inputs of
its linear maps are not kept), the final norm n*e*(h + 2), the loss n*V*4 + 8*n + 4; the
step's temporaries, torch's eager Adam(W): max over parameters k of 4*(2*n_k + n_(k-1)) (the
two fp32 tensors of parameter k's denominator and the previous one's, still referenced), none
for its fused kernel (``train.fused_kernel``) and SGD (they step in place); hop
buffers none on the host path (hops land in the block buffers); the data shard and test set
8 B per token, inputs and targets.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from snake_mpi.config import RunConfig, load_config
from snake_mpi.train import Optimiser, master_bounds, observe_steps

GIB = 2**30
PART_TOLERANCE = 0.05
"""Goal: every part within 5 % of its analytic count."""
REST_BOUND = 0.10
"""Goal: the unexplained rest under 10 % of the peak."""


@dataclass
class StepLedger:
    """What ``train_local``'s steps held, each part at its largest over the steps (bytes)."""

    gradients: int = 0
    masters: int = 0
    optimiser: int = 0
    activations: int = 0
    steps: int = 0
    temporaries: int | None = None
    """The optimiser step's temporaries at their largest (None: not measured, see
    ``measure_temporaries``)."""
    measure_temporaries: bool = False
    """Watch the optimiser step (``NewStorages``): only an eager step outside the backward pass
    (not ``fused_step``, not a compiled optimiser such as the 8-bit AdamW)."""
    weight_ptrs: set[int] = field(default_factory=set)
    _saved: dict[int, int] = field(default_factory=dict)
    _window: NewStorages | None = None

    @contextlib.contextmanager
    def forward_context(self, model: torch.nn.Module) -> Iterator[None]:
        self._saved = {}
        if not self.weight_ptrs:
            self.weight_ptrs = weight_pointers(model)

        def pack(t: torch.Tensor) -> torch.Tensor:
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in self.weight_ptrs:
                self._saved[ptr] = max(self._saved.get(ptr, 0), storage.nbytes())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield
        self.activations = max(self.activations, sum(self._saved.values()))

    def _grads(self, params: Sequence[torch.nn.Parameter], opt: Optimiser) -> int:
        held = [p.grad for p in params] + [m.grad for m in opt.master_parameters()]
        return sum(g.numel() * g.element_size() for g in held if g is not None)

    def after_backward(self, params: Sequence[torch.nn.Parameter], opt: Optimiser) -> None:
        self.gradients = max(self.gradients, self._grads(params, opt))
        if self.measure_temporaries:
            self._window = NewStorages()
            self._window.__enter__()

    def after_step(self, params: Sequence[torch.nn.Parameter], opt: Optimiser) -> None:
        if self._window is not None:
            self._window.__exit__(None, None, None)
            self.temporaries = max(self.temporaries or 0, self._window.temporaries())
            self._window = None
        self.gradients = max(self.gradients, self._grads(params, opt))
        self.masters = max(
            self.masters, sum(m.numel() * m.element_size() for m in opt.master_parameters())
        )
        self.optimiser = max(self.optimiser, opt.state_bytes())
        self.steps += 1


class NewStorages(TorchDispatchMode):
    """Watches the storages that the operations run inside it allocate (not those of their
    inputs: an in-place result or a view is not new), each alive until its last reference goes,
    and the largest total alive at once; ``temporaries``: that largest total less what is
    still alive when the window closes (what the window kept, e.g. fp32 gradient copies, is
    another part of the ledger)."""

    def __init__(self) -> None:
        super().__init__()
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak_bytes = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        for t in _tensors(out):
            storage = t.untyped_storage()
            ptr = storage.data_ptr()
            if ptr not in given and ptr not in self._live:
                self._live[ptr] = (StorageWeakRef(storage), storage.nbytes())
        self.peak_bytes = max(self.peak_bytes, self.alive_bytes())
        return out

    def alive_bytes(self) -> int:
        for ptr in [p for p, (ref, _) in self._live.items() if ref.expired()]:
            del self._live[ptr]
        return sum(n for _, n in self._live.values())

    def temporaries(self) -> int:
        return self.peak_bytes - self.alive_bytes()


def _tensors(tree: Any) -> list[torch.Tensor]:
    """The tensors in an operation's arguments or results."""
    return [t for t in tree_leaves(tree) if isinstance(t, torch.Tensor)]


def eager_step(cfg: RunConfig) -> bool:
    """Whether the optimiser step runs eagerly after the backward pass, where ``NewStorages``
    can watch it: not fused into the backward, not compiled (torchao's 8-bit AdamW)."""
    return cfg.train.optimizer in ("adam", "adamw", "sgd") and not cfg.train.fused_step


def weight_pointers(model: torch.nn.Module) -> set[int]:
    """Storages of the model's weights and buffers (autograd saves weights too: not
    activations)."""
    return {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}


def adamw8bit_bytes(numels: Sequence[int], small_bytes: int = 4) -> int:
    """torchao's ``AdamW8bit`` state: two 8-bit moments with an fp32 scale per 256 elements and
    a 256-entry fp32 code book each, for tensors of at least 4,096 elements; moments in the
    stepped tensor's dtype otherwise (``small_bytes`` per element: 4 when it steps fp32
    masters, 2 when it steps bf16 weights with stochastic rounding); a 4-byte step per
    tensor."""
    total = 0
    for n in numels:
        moment = n + 4 * math.ceil(n / 256) + 4 * 256 if n >= 4096 else small_bytes * n
        total += 2 * moment + 4
    return total


def stepped_numels(cfg: RunConfig, numels: Sequence[int]) -> list[int]:
    """The sizes of the tensors the optimiser steps, in its order: the trained parameters, each
    split into ``train.master_chunk_elements`` chunks where it has a bf16 master."""
    chunk = cfg.train.master_chunk_elements if cfg.model.dtype == "bfloat16" else 0
    return [b - a for n in numels for a, b in master_bounds(n, chunk)]


def adam_temporaries_bytes(numels: Sequence[int]) -> int:
    """The largest the eager (single-tensor) Adam or AdamW step of torch holds in temporaries:
    for parameter k its denominator ``exp_avg_sq.sqrt() / bias_correction`` is two fp32
    tensors of its size alive at once, while the previous parameter's denominator is still
    held by the loop's variable: max over k of 4 * (2 * n_k + n_(k-1)) bytes, in the
    optimiser's parameter order."""
    return max((4 * (2 * n + (numels[k - 1] if k else 0)) for k, n in enumerate(numels)), default=0)


def opt_activation_bytes(cfg: RunConfig, trained: Sequence[int], n_blocks: int) -> int | None:
    """Activations saved for the backward pass by an OPT model (formula in the module
    docstring); None for another model or with activation checkpointing."""
    if cfg.model.family != "lm" or not cfg.model.preset.startswith("opt"):
        return None
    if cfg.train.activation_checkpointing:
        return None
    from snake_mpi.models.lm import hf_config

    conf = hf_config(cfg.model)
    h, f, a, vocab = conf.hidden_size, conf.ffn_dim, conf.num_attention_heads, conf.vocab_size
    n = cfg.train.batch_size * cfg.data.seq_len
    e = 2 if cfg.model.dtype == "bfloat16" else 4
    lowest = min(trained)
    layers = range(max(1, lowest), n_blocks - 1)  # decoder layers from the segment up
    total = 0
    for b in layers:
        width = 8 * h + f if b in trained else 6 * h + f
        total += n * e * width + 4 * n * e + 4 * n * a
    total += n * e * (h + 2)  # the final layer norm (the head block)
    return total + n * vocab * 4 + 8 * n + 4


@dataclass
class Measured:
    """A ledger's inputs: the process's RSS figures, the step ledger, the model's tensors."""

    rss_before_model: int
    rss_model_built: int
    peak: int
    steps: StepLedger
    trained_params: list[int]
    """Element count of each trained parameter tensor."""
    frozen_bytes: int
    trained_bytes: int
    transfer_buffers: int
    data_bytes: int
    data_tokens: int


def analytic(cfg: RunConfig, m: Measured, trained: Sequence[int], n_blocks: int) -> dict[str, Any]:
    """Each part's analytic count (None where there is no model for it)."""
    from snake_mpi.models.lm import count_params

    w = 2 if cfg.model.dtype == "bfloat16" else 4
    counts = count_params(cfg.model)["params"] if cfg.model.family == "lm" else None
    p = sum(m.trained_params)
    fused = cfg.train.fused_step
    masters = w == 2 and not cfg.train.stochastic_rounding
    stepped = 4 if masters else w  # bytes per element of what the optimiser steps
    opt = cfg.train.optimizer
    if opt in ("adam", "adamw"):
        optimiser = 8 * p + 4 * len(m.trained_params)
    elif opt == "adamw8bit":
        optimiser = adamw8bit_bytes(m.trained_params, stepped)
    else:
        optimiser = 4 * p if cfg.train.momentum > 0 else 0
    trained_weights = sum(counts[b] for b in trained) * w if counts else None
    temporaries: int | None = None  # not measured: a fused or compiled step
    if m.steps.temporaries is not None:
        adam = opt in ("adam", "adamw") and not cfg.train.fused_kernel
        temporaries = adam_temporaries_bytes(stepped_numels(cfg, m.trained_params)) if adam else 0
    return {
        "weights": sum(counts) * w if counts else None,
        "frozen weights": (sum(counts) * w - trained_weights) if counts else None,
        "trained weights": trained_weights,
        "fp32 masters": 4 * p if masters else 0,
        "gradients": 0 if fused else stepped * p,
        "optimiser state": optimiser,
        "activations": opt_activation_bytes(cfg, trained, n_blocks),
        "step temporaries": temporaries,
        "hop buffers": 0,
        "data": 8 * 2 * m.data_tokens,
    }


def ledger_rows(cfg: RunConfig, m: Measured, trained: Sequence[int], n_blocks: int) -> list[dict]:
    """The ledger: each part measured and analytic, the sum, the peak and the rest."""
    model = analytic(cfg, m, trained, n_blocks)
    measured = {
        "weights": m.rss_model_built - m.rss_before_model,
        "frozen weights": m.frozen_bytes,
        "trained weights": m.trained_bytes,
        "fp32 masters": m.steps.masters,
        "gradients": m.steps.gradients,
        "optimiser state": m.steps.optimiser,
        "activations": m.steps.activations,
        "step temporaries": m.steps.temporaries,
        "hop buffers": m.transfer_buffers,
        "data": m.data_bytes,
    }
    rows = []
    for part, got in measured.items():
        want = model[part]
        rows.append({"part": part, "measured": got, "analytic": want, "in_sum": part in SUMMED})
    parts = sum(measured[p] or 0 for p in SUMMED)
    increase = m.peak - m.rss_before_model
    rows.append({"part": "sum of the parts", "measured": parts, "analytic": None, "in_sum": False})
    rows.append({"part": "peak increase", "measured": increase, "analytic": None, "in_sum": False})
    rows.append({"part": "rest", "measured": increase - parts, "analytic": None, "in_sum": False})
    return rows


SUMMED = (
    "weights",
    "fp32 masters",
    "gradients",
    "optimiser state",
    "activations",
    "step temporaries",
    "hop buffers",
    "data",
)
"""The parts that add up to the peak (frozen and trained weights are the weights, split)."""


def verdict(row: dict, peak_increase: int) -> str:
    if row["part"] == "rest":
        share = row["measured"] / peak_increase
        return f"{100 * share:.1f} % of the peak ({'under' if share < REST_BOUND else 'over'} 10 %)"
    want, got = row["analytic"], row["measured"]
    if got is None:
        return "not measured (a fused or compiled optimiser step)"
    if want is None:
        return "-" if row["part"] in ("sum of the parts", "peak increase") else "no model"
    if want == 0:
        return "both 0" if got == 0 else f"{got / 2**20:.1f} MiB over none"
    ratio = got / want
    ok = abs(ratio - 1) <= PART_TOLERANCE
    return f"{ratio:.4f} ({'within' if ok else 'outside'} 5 %)"


def format_ledger(rows: list[dict], head: str) -> str:
    peak = next(r["measured"] for r in rows if r["part"] == "peak increase")

    def gib(v: int | None) -> str:
        return "-" if v is None else f"{v / GIB:.4f}"

    lines = [head, "", "| part | measured GiB | analytic GiB | measured / analytic |"]
    lines.append("| --- | --- | --- | --- |")
    for r in rows:
        lines.append(
            f"| {r['part']} | {gib(r['measured'])} | {gib(r['analytic'])} | {verdict(r, peak)} |"
        )
    return "\n".join(lines)


def _measured(
    steps: StepLedger,
    rss: tuple[int, int],
    peak: int,
    model: Any,
    trained: Sequence[int],
    transfer_buffers: int,
    tensors: Sequence[torch.Tensor],
) -> Measured:
    from snake_mpi.blocks import block_tensors

    trained_tensors = [t for b in trained for t in block_tensors(model, b)]
    ids = {id(t) for t in trained_tensors}
    every = {id(t): t for b in range(model.n_blocks) for t in block_tensors(model, b)}
    nbytes = sum(t.numel() * t.element_size() for t in every.values())
    trained_bytes = sum(t.numel() * t.element_size() for t in trained_tensors)
    unique = {id(p): p for b in trained for p in model.blocks[b].parameters() if id(p) in ids}
    params = [p.numel() for p in unique.values()]  # a tied matrix once
    return Measured(
        rss_before_model=rss[0],
        rss_model_built=rss[1],
        peak=peak,
        steps=steps,
        trained_params=params,
        frozen_bytes=nbytes - trained_bytes,
        trained_bytes=trained_bytes,
        transfer_buffers=transfer_buffers,
        data_bytes=sum(t.numel() * t.element_size() for t in tensors),
        data_tokens=sum(t.numel() for t in tensors) // 2,
    )


def snake_node(cfg: RunConfig, nodes: int, node: int) -> tuple[Measured, list[int], int]:
    """Node ``node`` of a ring, alone (``bench.lone_node.run_lone``), under the step ledger."""
    from bench.lone_node import run_lone

    steps = StepLedger(measure_temporaries=eager_step(cfg))
    with observe_steps(steps):
        result, ctx = run_lone(cfg, node, nodes)
    trained = result.plan[node]
    d = ctx.data
    m = _measured(
        steps,
        (result.rss_before_model_bytes, result.rss_model_built_bytes),
        result.peak_bytes,
        ctx.model,
        trained,
        result.transfer_buffer_bytes,
        [d.x_train, d.y_train, d.x_test, d.y_test],
    )
    return m, trained, ctx.model.n_blocks


def rss_bytes() -> int:
    """This process's resident set now."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def full_fine_tuning(cfg: RunConfig) -> tuple[Measured, list[int], int]:
    """Every block of the config's model trained on its whole training set in this process
    (the centralised scheme's turn), under the step ledger."""
    from bench.lone_node import hwm_bytes
    from snake_mpi.data import load_dataset
    from snake_mpi.models import build_model
    from snake_mpi.models.lm import preload
    from snake_mpi.probes.memory import set_mmap_threshold
    from snake_mpi.train import preload_optimizer, train_local

    torch.manual_seed(cfg.seed)
    data = load_dataset(cfg.data, cfg.seed, checkpoint=cfg.model.checkpoint)
    if cfg.model.family == "lm":
        preload()
    preload_optimizer(cfg.train)
    set_mmap_threshold(cfg.train.mmap_threshold_bytes)
    before = rss_bytes()
    model = build_model(
        cfg.model,
        sample_shape=tuple(cfg.data.sample_shape),
        n_classes=data.n_classes,
        seed=cfg.seed,
    )
    built = rss_bytes()
    trained = list(range(model.n_blocks))
    steps = StepLedger(measure_temporaries=eager_step(cfg))
    with observe_steps(steps):
        train_local(
            model,
            trained,
            data.x_train,
            data.y_train,
            cfg=cfg.train,
            generator=torch.Generator().manual_seed(cfg.seed),
        )
    peak = hwm_bytes()
    tensors = [data.x_train, data.y_train, data.x_test, data.y_test]
    m = _measured(steps, (before, built), peak, model, trained, 0, tensors)
    return m, trained, model.n_blocks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path, help="a run config (Snake p2p for a node)")
    ap.add_argument("--nodes", type=int, default=0, help="the ring's size N (a Snake node)")
    ap.add_argument("--node", type=int, default=0, help="which node K (default 0)")
    ap.add_argument("--full", action="store_true", help="full fine-tuning: every block trains")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, help="also write the ledger here (JSON)")
    ap.add_argument("--table", type=Path, help="also write the table (markdown) here")
    args = ap.parse_args(argv)
    if args.full == (args.nodes > 0):
        ap.error("give either --nodes N (a Snake node) or --full")
    cfg = load_config(args.config, args.set)
    if cfg.snake.frozen_weights != "full" and not args.full:
        ap.error(
            "snake.frozen_weights = 'int8' is not in the ledger's model yet (its weights are "
            "measured when the model is built, before the blocks are quantised): see "
            "docs/memory.md, 'Frozen blocks as int8'"
        )
    if args.full:
        m, trained, n_blocks = full_fine_tuning(cfg)
        what = f"full fine-tuning of {cfg.model.preset or cfg.model.family}"
    else:
        m, trained, n_blocks = snake_node(cfg, args.nodes, args.node)
        what = f"node {args.node} of {args.nodes}"
    rows = ledger_rows(cfg, m, trained, n_blocks)
    extra = f" ({', '.join(args.set)})" if args.set else ""
    head = (
        f"memory ledger: {what}, {args.config.name}{extra}: blocks {trained[0]}-{trained[-1]} "
        f"of {n_blocks} trained, {sum(m.trained_params):,} parameters, {m.steps.steps} steps; "
        f"baseline {m.rss_before_model / GIB:.3f} GiB"
    )
    table = format_ledger(rows, head)
    print(table)
    if args.table:
        args.table.parent.mkdir(parents=True, exist_ok=True)
        args.table.write_text(table + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"head": head, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
