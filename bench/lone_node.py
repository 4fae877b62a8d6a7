"""Node ``k`` of an ``N``-node Snake ring (peer-to-peer), run alone in one process, to measure
its memory where the whole ring does not fit the machine (issue 31; docs/memory.md).

A node's memory does not depend on the other nodes being there: it holds its model, its data
shard, and during its turn its training state, activations and transfer buffers. So this runs
exactly what rank ``k`` of a real ring runs (``run.build``: the model built and held as a ring
node holds it; ``run.scheme_context``; the scheme's own ``run_p2p``), over ``LoneRing``, a
communicator that stands in for the rest of the ring:

- its receives get the transfer the predecessor would send: the same blocks, versions and
  sizes (the ids the predecessor's ``blocks_to_send`` would pick, from the version stamps the
  ring would have by then), landing in the node's own buffers (or the transfer path's) as an
  MPI receive does; the bytes are the node's own copy of those blocks (a block it freed under
  ``keep = "own"`` comes back zero-filled), since the other nodes' training is not run;
- its sends are counted as ``Comm`` counts them and dropped (no copy is made);
- the collectives to rank 0 keep this node's rows (the round figures it would send) and
  return None, as on a rank that is not the root.

The plan is the one the ring would use (``snake.plan_segments`` over ``N`` nodes); so is the
data shard (``run.build_shards`` over ``N`` ranks). Torch threads are those of ``N`` ranks on
this host. Not supported (refused with a message): ``snake.mode = "cs"``,
``snake.capability = "measure"`` (its plan needs every node's timings). No checkpoint is
taken (as ``run.execute`` without a ``Checkpointer``), so their writes are not measured.

    python -m bench.lone_node bench/configs/llm/opt-1.3b-snake-24x1-bf16.toml --nodes 24 \\
        --node 5 --json results/lone.json

prints (and writes) the node's baseline RSS, peak RSS, increase, training state and bytes. The
peak is the process's, so measure one node per process (``bench.memory_claim --lone-node``
does).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from snake_mpi.blocks import (
    BlockModel,
    block_nbytes,
    block_tensors,
    flatten_into,
    is_held,
    model_hash,
    released_blocks,
)
from snake_mpi.config import RunConfig, load_config
from snake_mpi.context import Context
from snake_mpi.probes.memory import ru_maxrss_bytes
from snake_mpi.record import ROUND_FIELDS
from snake_mpi.schemes.snake import (
    blocks_to_send,
    freed_blocks,
    last_stamp,
    plan_segments,
    stamp,
)
from snake_mpi.train import evaluate
from snake_mpi.transport.protocol import HopPlan, RingPositions
from snake_mpi.transport.wire import (
    KIND_MODEL,
    KIND_SYNC,
    MAGIC,
    CommStats,
    LinkModel,
    ProtocolError,
    Transfer,
    TransferSpec,
    account_receive,
    account_send,
    check_landing,
    check_posted,
    pack_header,
    parse_header,
    payload_nbytes,
    transfer_from,
)


def sender_versions(
    plan: Sequence[Sequence[int]], n_blocks: int, round_: int, sender: int
) -> np.ndarray:
    """The version stamps a P2P ring node holds right after its turn ``(round_, sender)``: every
    block stamped by the latest turn that trained it, turns taken in ring order from round 0.
    (Each hop carries every block newer than the receiver's copy, so a node's model at its turn
    is the newest of every block.)"""
    n = len(plan)
    versions = np.zeros(n_blocks, dtype=np.int64)
    for r in range(round_ + 1):
        for j in range(n if r < round_ else sender + 1):
            versions[list(plan[j])] = stamp(r, j, n)
    return versions


def hop_into(
    plan: Sequence[Sequence[int]],
    n_blocks: int,
    node: int,
    kind: int,
    round_: int,
    hop: int,
    *,
    rounds: int,
    transfer: str,
    keep: str,
) -> tuple[list[int], np.ndarray]:
    """Block ids and versions of the transfer ``(kind, round_, hop)`` that ``node``'s
    predecessor sends it, as ``snake.run_p2p`` (``KIND_MODEL``; ``hop``: the sending node) and
    ``snake.final_sync`` (``KIND_SYNC``) pick them on the sender."""
    n = len(plan)
    if kind == KIND_MODEL:
        versions = sender_versions(plan, n_blocks, round_, hop)
        held = last_stamp(node, hop, round_, n)
        freed = freed_blocks(plan[node], n_blocks, keep, held > 0)
    elif kind == KIND_SYNC:
        versions = sender_versions(plan, n_blocks, rounds - 1, n - 1)
        held = stamp(rounds - 1, node, n)
        freed = freed_blocks(plan[node], n_blocks, keep, True)
    else:
        raise ProtocolError(f"lone node {node}: a P2P node receives no transfer of kind {kind}")
    ids = blocks_to_send(versions, held, transfer, freed)
    return ids, versions[ids]


@dataclasses.dataclass(frozen=True, slots=True)
class SentHop:
    """A transfer the lone node sent (and ``LoneRing`` dropped)."""

    kind: int
    round: int
    hop: int
    block_ids: list[int]
    nbytes: int
    """Header + payload, as ``Comm`` counts it."""


class LoneRing(RingPositions):
    """Node ``rank`` of a ring of ``size`` nodes, alone: a communicator (``Communicator``) whose
    peers are simulated. ``attach`` gives it the node's model and the ring's plan before the
    first hop."""

    def __init__(self, rank: int, size: int, *, deadline_s: float = 600.0) -> None:
        if not 0 <= rank < size:
            raise ValueError(f"node {rank} is not in a ring of {size} nodes")
        self.rank = rank
        self.size = size
        self.deadline_s = float(deadline_s)
        self.stats = CommStats()
        self.link: LinkModel | None = None
        self.rows: list[np.ndarray] = []
        """The rows this node handed to the collectives to rank 0 (its round figures)."""
        self.sent: list[SentHop] = []
        self.received: list[tuple[int, int, int, list[int]]] = []
        """(kind, round, hop, block ids) of every transfer fed to the node."""
        self._posted: dict[tuple[int, int, int, int], tuple[list[int], list[int]]] = {}
        self._model: BlockModel | None = None
        self._plan: list[list[int]] = []
        self._rounds = 0
        self._transfer = "delta"
        self._keep = "all"

    def attach(self, model: BlockModel, plan: Sequence[Sequence[int]], cfg: RunConfig) -> None:
        """The node's model (where fed bytes come from) and the ring's plan and options."""
        self._model = model
        self._plan = [list(ids) for ids in plan]
        self._rounds = cfg.train.rounds
        self._transfer, self._keep = cfg.snake.transfer, cfg.snake.keep

    # ------------------------------------------------------------ hops

    def send_blocks(self, dest: int, transfer: Transfer) -> None:
        """Count the transfer as ``Comm`` does (header + payload) and drop it."""
        if dest != self.succ:
            raise ProtocolError(f"lone node {self.rank}: sends to {dest}, not its successor")
        t0 = time.perf_counter()
        header = pack_header(transfer)  # the checks a real send makes
        nbytes = header.nbytes + payload_nbytes(transfer.payload)
        account_send(self.stats, self.link, self.rank, dest, nbytes, t0)
        ids = [int(b) for b in transfer.block_ids]
        self.sent.append(SentHop(transfer.kind, transfer.round, transfer.hop, ids, nbytes))

    def post(self, source: int, spec: TransferSpec) -> None:
        """Keep the blocks posted: the fed header must name them (as ``Comm.post``)."""
        self._posted[(source, spec.kind, spec.round, spec.hop)] = spec.posted_blocks()

    def hop_plan(self, peer: int, block_ids: Sequence[int], bufs: Sequence[Any]) -> HopPlan | None:
        """None: every hop takes the general path (in place on the host, as a plan would)."""
        return None

    def use_pipelined_copy(self, min_bytes: int, *, host: bool) -> bool:
        return False

    def cancel(self) -> None:
        self._posted.clear()

    def recv_blocks(self, source: int, spec: TransferSpec) -> Transfer:
        """The transfer the predecessor would send, landed where ``spec`` says."""
        model = self._model
        if model is None:
            raise RuntimeError("LoneRing.attach must give the model before the first receive")
        if source != self.pred:
            raise ProtocolError(f"lone node {self.rank}: receives from {source}, not its pred")
        what = spec.describe(source)
        t0 = time.perf_counter()
        ids, versions = hop_into(
            self._plan,
            model.n_blocks,
            self.rank,
            spec.kind,
            spec.round,
            spec.hop,
            rounds=self._rounds,
            transfer=self._transfer,
            keep=self._keep,
        )
        nbytes = [block_nbytes(model, b) for b in ids]
        rows = [w for row in zip(ids, versions.tolist(), nbytes, strict=True) for w in row]
        header = np.array(
            [MAGIC, spec.kind, spec.round, spec.hop, len(ids), sum(nbytes), *rows], np.int64
        )
        body, total = parse_header(header, spec, rank=self.rank, what=what)
        posted = self._posted.pop((source, spec.kind, spec.round, spec.hop), None)
        if posted is not None:
            check_posted(posted, ids, nbytes, rank=self.rank, what=what)
        freed = set(released_blocks(model)) & set(ids)
        payload = self._land(model, spec, ids, nbytes, freed, what)
        account_receive(self.stats, self.link, source, self.rank, header.nbytes + total, t0)
        self.received.append((spec.kind, spec.round, spec.hop, ids))
        return transfer_from(header, body, payload)

    def _land(
        self,
        model: BlockModel,
        spec: TransferSpec,
        ids: list[int],
        nbytes: list[int],
        freed: set[int],
        what: str,
    ) -> Any:
        """Write the payload where an MPI receive would: the model's own block buffers
        (``spec.into``; a held block has its bytes already, a freed one is zero-filled), else
        ``spec.alloc``'s buffer or a new host array (filled from the node's own blocks)."""
        bufs = spec.into(ids, nbytes) if spec.into is not None else None
        if bufs is not None:
            check_landing(bufs, nbytes, rank=self.rank, what=what)
            for b, buf in zip(ids, bufs, strict=True):
                if b in freed:
                    _as_tensor(buf).zero_()
            return bufs
        total = sum(nbytes)
        out = spec.alloc(total) if spec.alloc is not None else None
        out = np.empty(total, dtype=np.uint8) if out is None else out[:total]
        dst, offset = _as_tensor(out), 0
        for b, n in zip(ids, nbytes, strict=True):
            part = dst[offset : offset + n]
            if b in freed:
                part.zero_()
            else:
                flatten_into(model, [b], part)
            offset += n
        return out

    # ------------------------------------------------------------ collectives to rank 0

    def gather_row(self, row: np.ndarray, what: str = "") -> np.ndarray | None:
        row = np.array(row, dtype=np.float64)
        if self.rank != 0:  # as Comm: rank 0 keeps its own row
            self.stats.control_bytes_sent += row.nbytes
        self.rows.append(row)
        return None

    def allgather_row(self, row: np.ndarray, what: str = "") -> NoReturn:
        raise RuntimeError(
            f"a lone node cannot gather {what or 'a row'} from every node "
            "(snake.capability = 'measure' and checkpoints need the whole ring)"
        )

    def gatherv(self, arr: np.ndarray, what: str = "") -> list[np.ndarray] | None:
        if self.rank != 0:
            self.stats.control_bytes_sent += 8 + np.asarray(arr, np.float64).nbytes
        return None

    def gather_str(self, text: str, max_bytes: int = 256) -> list[str] | None:
        if self.rank != 0:
            self.stats.control_bytes_sent += max_bytes
        return None

    def barrier(self) -> None:
        return None

    def ranks_on_host(self) -> int:
        """The ring's size: torch gets the threads of one of ``size`` ranks on this host."""
        return self.size

    def hostname(self) -> str:
        return socket.gethostname()

    def library_version(self) -> str:
        return "lone node (no MPI)"

    def abort(self, message: str, code: int = 1) -> NoReturn:
        raise RuntimeError(f"lone node {self.rank} of {self.size}: {message}")


def hwm_bytes() -> int:
    """This process's peak RSS since its ``exec`` (``VmHWM``); 0 where /proc has none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def gpu_peak(device: torch.device) -> int:
    """torch's peak allocated memory on ``device`` since the process started; 0 on the CPU."""
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else 0


def _as_tensor(buf: Any) -> torch.Tensor:
    return buf if torch.is_tensor(buf) else torch.from_numpy(buf)


def block_digests(model: BlockModel, ids: Sequence[int]) -> list[str]:
    """SHA-256 of each block's held bytes (no copy), to tell which blocks a turn changed."""
    out = []
    for b in ids:
        h = hashlib.sha256()
        for t in block_tensors(model, b):
            if is_held(t):
                h.update(t.detach().reshape(-1).view(torch.uint8).cpu().numpy().data)
        out.append(h.hexdigest())
    return out


@dataclasses.dataclass(slots=True)
class LoneResult:
    """What one lone node measured (bytes unless named otherwise); ``per round`` lists are
    this node's round figures, as its rows in a ring's ``/rounds`` would hold them."""

    config: str
    nodes: int
    node: int
    plan: list[list[int]]
    rss_before_model_bytes: int
    rss_model_built_bytes: int
    peak_rss_bytes: int
    ru_maxrss_bytes: int
    """The kernel's ``ru_maxrss``: Linux keeps it across ``exec``, so a process started by a
    larger one (a test runner) starts with that one's peak; not used in ``peak_bytes``."""
    hwm_bytes: int
    """The kernel's peak RSS of this program (``VmHWM``: of its own address space, since
    ``exec``)."""
    train_state_bytes: int
    """Largest over rounds (``/rounds/train_state_bytes``)."""
    trainable_params: int
    transfer_buffer_bytes: int
    bytes_sent: list[int]
    bytes_received: list[int]
    final_sync_bytes_sent: int
    final_sync_bytes_received: int
    trained_blocks_changed: bool
    """Every block of the node's segment holds other bytes after the run than before."""
    model_sha256: str
    gpu_max_allocated_bytes: int
    """torch's peak allocated device memory (0 on the CPU)."""
    wall_s: float
    eval_loss: float = float("nan")
    """Test loss (per token for a language model: its exp is the perplexity) of the node's
    model after the run, on the config's test set; taken after the peak was read."""
    compute_s: list[float] = dataclasses.field(default_factory=list)
    """Per round, the turn's training time (``/rounds/compute_s``)."""
    steps: list[int] = dataclasses.field(default_factory=list)
    """Per round, the turn's optimiser steps."""

    @property
    def peak_bytes(self) -> int:
        """The larger of the sampled peak and the kernel's (``VmHWM``; a ring's rank, started
        by the MPI launcher's small daemon, has them from ``ru_maxrss``)."""
        return max(self.peak_rss_bytes, self.hwm_bytes)

    @property
    def increase_bytes(self) -> int:
        """Peak over the baseline (RSS just before the model is built)."""
        return self.peak_bytes - self.rss_before_model_bytes

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        return d | {"peak_bytes": self.peak_bytes, "increase_bytes": self.increase_bytes}


def check_lone(cfg: RunConfig, node: int, nodes: int) -> None:
    """Refuse what a lone node cannot stand in for (``ValueError``); the world checks of
    ``nodes`` ranks as ``snake-mpi run`` makes them."""
    from snake_mpi.schemes.rules import validate_for_world

    if cfg.scheme != "snake" or cfg.snake.mode != "p2p":
        raise ValueError("a lone node is a node of a peer-to-peer Snake ring (snake.mode = p2p)")
    if cfg.snake.capability == "measure":
        raise ValueError("snake.capability = 'measure' plans from every node's timings")
    if not 0 <= node < nodes:
        raise ValueError(f"node {node} is not in a ring of {nodes} nodes")
    validate_for_world(cfg, nodes)


def run_lone(
    cfg: RunConfig, node: int, nodes: int, *, config: str = ""
) -> tuple[LoneResult, Context]:
    """Node ``node`` of a ``nodes``-node ring, alone in this process: built, run and measured
    as rank ``node`` of ``snake-mpi run`` (without the result file); its figures and context."""
    from snake_mpi.checkpoint import Checkpointer
    from snake_mpi.run import (
        build,
        gather_start,
        load_checked,
        place_after_mpi,
        place_before_mpi,
        run_scheme,
        scheme_context,
        transfer_route,
    )

    check_lone(cfg, node, nodes)
    t0 = time.perf_counter()
    ring = LoneRing(node, nodes, deadline_s=cfg.comm.deadline_s)
    placement = place_before_mpi(cfg) or place_after_mpi(cfg, 0)
    route = transfer_route(cfg, placement, lambda: (None, "lone node: no MPI library to ask"))
    built = build(cfg, ring, placement, route, load_checked(cfg, nodes))
    gather_start(ring, built)
    plan = plan_segments(built.model, cfg.snake, nodes)
    ring.attach(built.model, plan, cfg)
    before = block_digests(built.model, plan[node])
    ctx = scheme_context(cfg, ring, built, None, Checkpointer())
    run_scheme(ctx, None, built.probes)
    if ctx.report.plan != plan:
        raise RuntimeError(f"the scheme's plan {ctx.report.plan} is not the ring's {plan}")
    after = block_digests(built.model, plan[node])
    rows = np.array(ring.rows)
    col = {k: i for i, k in enumerate(ROUND_FIELDS)}
    sync = ctx.report.final_sync
    result = LoneResult(
        config=config,
        nodes=nodes,
        node=node,
        plan=plan,
        rss_before_model_bytes=int(built.rss[0]),
        rss_model_built_bytes=int(built.rss[1]),
        peak_rss_bytes=int(built.probes.sampler.peak_rss_bytes()),
        ru_maxrss_bytes=ru_maxrss_bytes(),
        hwm_bytes=hwm_bytes(),
        train_state_bytes=int(rows[:, col["train_state_bytes"]].max()),
        trainable_params=int(rows[:, col["trainable_params"]].max()),
        transfer_buffer_bytes=int(ctx.hop.buffer_bytes()),
        bytes_sent=[int(x) for x in rows[:, col["bytes_sent"]]],
        bytes_received=[int(x) for x in rows[:, col["bytes_received"]]],
        final_sync_bytes_sent=int(sync.bytes_sent) if sync else 0,
        final_sync_bytes_received=int(sync.bytes_received) if sync else 0,
        trained_blocks_changed=all(a != b for a, b in zip(before, after, strict=True)),
        model_sha256=model_hash(built.model),
        gpu_max_allocated_bytes=gpu_peak(built.device),
        wall_s=time.perf_counter() - t0,
        compute_s=[float(x) for x in rows[:, col["compute_s"]]],
        steps=[int(x) for x in rows[:, col["steps"]]],
    )
    d = built.data
    loss, _ = evaluate(built.model, d.x_test, d.y_test, batch_size=cfg.train.eval_batch_size)
    return dataclasses.replace(result, eval_loss=loss), ctx


GIB = 2**30


def describe(r: LoneResult) -> str:
    """The lone node's figures in a few lines."""
    return (
        f"lone node {r.node} of {r.nodes} ({r.config}): blocks {r.plan[r.node]}, "
        f"{r.trainable_params:,} trainable parameters\n"
        f"  baseline {r.rss_before_model_bytes / GIB:.3f} GiB, peak {r.peak_bytes / GIB:.3f} GiB"
        f", increase {r.increase_bytes / GIB:.3f} GiB, train state "
        f"{r.train_state_bytes / GIB:.3f} GiB, transfer buffers {r.transfer_buffer_bytes} B\n"
        f"  bytes sent per round {r.bytes_sent}, received {r.bytes_received}; trained blocks "
        f"changed: {r.trained_blocks_changed}; {r.wall_s:.1f} s\n"
        f"  training {sum(r.compute_s):.2f} s for {sum(r.steps)} steps; test loss after the "
        f"run {r.eval_loss:.4f} (perplexity {math.exp(r.eval_loss):.3f})"
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("config", type=Path, help="a Snake (p2p) run config")
    ap.add_argument("--nodes", type=int, required=True, help="the ring's size N")
    ap.add_argument("--node", type=int, required=True, help="which node k (0..N-1) to run")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--json", type=Path, help="write the figures here (JSON)")
    args = ap.parse_args(argv)
    cfg = load_config(args.config, args.set)
    try:
        result, _ = run_lone(cfg, args.node, args.nodes, config=str(args.config))
    except ValueError as e:
        print(f"lone_node: {e}", file=sys.stderr)
        return 2
    print(describe(result), flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result.as_dict(), indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
