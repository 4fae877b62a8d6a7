"""The analytic byte counts of a finished run, rebuilt from its result file alone: the block
table, the sample counts, the resolved config (and, for split schemes, the cut activation size
of the model the config describes). What analysis compares the measured counters against."""

from __future__ import annotations

import tomllib
from collections.abc import Callable

import numpy as np

from snake_mpi.analysis import analytic
from snake_mpi.config import RunConfig, from_dict
from snake_mpi.schemes.registry import scheme_spec
from snake_mpi.store import Result
from snake_mpi.train import turn_batch_sizes


def run_config(res: Result) -> RunConfig:
    """The resolved config stored in the result."""
    return from_dict(tomllib.loads(res.config_toml))


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
    and block times."""
    from snake_mpi.schemes.snake import plan_from_params

    n, rounds = res.world_size, res.n_rounds
    blocks = res.tables["blocks"]
    block_bytes = _block_bytes(res)
    params = [int(p) for p in blocks["params"]]
    transfer = cfg.snake.transfer
    nodes = list(range(1, n)) if cfg.snake.mode == "cs" else list(range(n))
    caps = res.arrays.get("assignment/capability")
    times = res.arrays.get("assignment/block_time_s")
    costs = None if times is None else times[nodes][:, 1:-1].mean(axis=0)
    plan = plan_from_params(params, cfg.snake, len(nodes), costs=costs, capabilities=caps)
    if cfg.snake.mode == "cs":
        return (
            analytic.snake_cs_bytes_sent(plan, block_bytes, rounds, transfer),
            analytic.snake_cs_bytes_received(plan, block_bytes, rounds, transfer),
        )
    return (
        analytic.snake_p2p_bytes_sent(plan, block_bytes, rounds, transfer),
        analytic.snake_p2p_bytes_received(plan, block_bytes, rounds, transfer),
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
