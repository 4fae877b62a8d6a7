"""The analytic byte counts of a finished run, rebuilt from its result file alone: the block
table, the sample counts, the resolved config (and, for split schemes, the cut activation size
of the model the config describes). What analysis compares the measured counters against."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from snake_mpi.analysis import analytic
from snake_mpi.config import RunConfig, stored_config
from snake_mpi.schemes.registry import scheme_spec
from snake_mpi.schemes.rules import check
from snake_mpi.store import Result
from snake_mpi.train import turn_batch_sizes


def run_config(res: Result) -> RunConfig:
    """The resolved config stored in the result (checked as a run's is: ``schemes.rules``)."""
    return check(stored_config(res.config_toml))


def expected_bytes(res: Result) -> tuple[np.ndarray, np.ndarray]:
    """(sent, received) model-transfer bytes per round per rank, shape (n_rounds, world_size),
    that the run's scheme must have moved: its ``SchemeSpec.expected_bytes`` (built in: the
    functions below, by the formulas of ``snake_mpi.analysis.analytic``)."""
    cfg = run_config(res)
    formula = scheme_spec(cfg.scheme).expected_bytes_function()
    if formula is None:
        raise ValueError(f"no analytic model for scheme {cfg.scheme!r}")
    return formula(cfg, res)


def _block_bytes(res: Result) -> list[int]:
    return [int(b) for b in res.tables["blocks"]["bytes"]]


def no_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """A scheme that sends no model: zeros."""
    zero = np.zeros((res.n_rounds, res.world_size), dtype=np.int64)
    return zero, zero.copy()


def snake_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """Snake (P2P or CS): the plan rebuilt from the block table and the recorded capabilities
    and block times; with ``snake.keep = "own"`` hops also carry what the receiver freed."""
    plan, block_bytes = snake_plan(res), _block_bytes(res)
    rounds, transfer, keep = res.n_rounds, cfg.snake.transfer, cfg.snake.keep
    if cfg.snake.mode == "cs":
        return (
            analytic.snake_cs_bytes_sent(plan, block_bytes, rounds, transfer, keep=keep),
            analytic.snake_cs_bytes_received(plan, block_bytes, rounds, transfer, keep=keep),
        )
    return (
        analytic.snake_p2p_bytes_sent(plan, block_bytes, rounds, transfer, keep=keep),
        analytic.snake_p2p_bytes_received(plan, block_bytes, rounds, transfer, keep=keep),
    )


def fedavg_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """FedAvg: the whole model to each sampled client and back (the seeded schedule)."""
    from snake_mpi.schemes.fedavg import sampled_clients

    n = res.world_size
    seed = int(res.provenance.get("seed_sampling", cfg.seed))
    schedule = sampled_clients(seed, n - 1, cfg.fedavg.clients_per_round, res.n_rounds)
    sent = analytic.fedavg_bytes_sent(_block_bytes(res), schedule, n)
    return sent, sent.copy()


def split_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """Split learning: cut activations and gradients per batch, client blocks relayed."""
    return _split_formula(analytic.split_bytes, cfg, res)


def splitfed_bytes(cfg: RunConfig, res: Result) -> tuple[np.ndarray, np.ndarray]:
    """SplitFed: as split learning, every client at once, client blocks averaged."""
    return _split_formula(analytic.splitfed_bytes, cfg, res)


def _split_formula(
    formula: Callable[..., tuple[np.ndarray, np.ndarray]], cfg: RunConfig, res: Result
) -> tuple[np.ndarray, np.ndarray]:
    cut = cfg.split.cut
    samples = [int(s) for s in res.tables["ranks"]["data_samples"]]
    batches = [turn_batch_sizes(s, cfg.train) for s in samples]
    act = activation_bytes_per_sample_of(cfg)
    return formula(_block_bytes(res)[:cut], batches, act, res.n_rounds)


def activation_bytes_per_sample_of(cfg: RunConfig) -> int:
    """Bytes of one sample's activation at the configured cut (builds the model to find out)."""
    from snake_mpi.models import build_model
    from snake_mpi.schemes.splitnet import activation_bytes_per_sample, cut_shape

    model = build_model(
        cfg.model, sample_shape=cfg.data.sample_shape, n_classes=cfg.data.n_classes, seed=0
    )
    return activation_bytes_per_sample(cut_shape(model, cfg.split.cut, cfg.data.sample_shape))


def snake_plan(res: Result) -> list[list[int]]:
    """The trained blocks of every node of a Snake run, rebuilt as the run made them."""
    from snake_mpi.schemes.snake import plan_from_params

    cfg = run_config(res)
    n = res.world_size
    blocks = res.tables["blocks"]
    params = [int(p) for p in blocks["params"]]
    nodes = list(range(1, n)) if cfg.snake.mode == "cs" else list(range(n))
    caps = res.arrays.get("assignment/capability")
    times = res.arrays.get("assignment/block_time_s")
    costs = None if times is None else times[nodes][:, 1:-1].mean(axis=0)
    return plan_from_params(params, cfg.snake, len(nodes), costs=costs, capabilities=caps)


def _snake_storage(res: Result) -> tuple[RunConfig, list[list[int]], list[int]]:
    cfg = run_config(res)
    if cfg.scheme != "snake":
        raise ValueError(f"no analytic storage model for scheme {cfg.scheme!r} (Snake only)")
    return cfg, snake_plan(res), _block_bytes(res)


def expected_at_rest_bytes(res: Result) -> np.ndarray:
    """Snake: model bytes each rank holds at the end of each round (``/rounds/
    model_at_rest_bytes``), shape (n_rounds, world_size), by ``snake.keep``."""
    cfg, plan, block_bytes = _snake_storage(res)
    s = cfg.snake
    return analytic.snake_at_rest_bytes(plan, block_bytes, res.n_rounds, mode=s.mode, keep=s.keep)


def expected_end_held_bytes(res: Result) -> np.ndarray:
    """Snake: model bytes each rank holds at the end of the run (``/ranks/
    model_end_held_bytes``), shape (world_size,)."""
    cfg, plan, block_bytes = _snake_storage(res)
    s = cfg.snake
    return analytic.snake_end_held_bytes(
        plan, block_bytes, res.n_rounds, mode=s.mode, keep=s.keep, final_sync=s.final_sync
    )


def expected_final_sync_bytes(res: Result) -> np.ndarray:
    """Snake: bytes each rank sends in the final sync (``/final_sync/bytes_sent``)."""
    cfg, plan, block_bytes = _snake_storage(res)
    s = cfg.snake
    formula = (
        analytic.snake_cs_final_sync_bytes_sent
        if s.mode == "cs"
        else analytic.snake_final_sync_bytes_sent
    )
    return formula(plan, block_bytes, s.transfer, keep=s.keep)
