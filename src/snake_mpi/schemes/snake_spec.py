"""Snake Learning's declaration (``SPEC``): its world checks, its label and tags, the plan its
analytic byte count rebuilds. Light (no torch): the round loop is ``snake_mpi.schemes.snake``;
the analytic formulas are ``snake_mpi.analysis.analytic``'s (named by dotted path)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from snake_mpi.schemes.registry import SchemeSpec

if TYPE_CHECKING:
    from snake_mpi.config import RunConfig
    from snake_mpi.store import Result


def check_world(c: RunConfig, world_size: int, holders: int) -> None:
    """Snake's world-size checks: a middle block per node, a capability per node."""
    from snake_mpi.config import ConfigError
    from snake_mpi.schemes.rules import n_middle_blocks

    mids = n_middle_blocks(c)
    if mids < holders:
        what = "decoder layers" if c.model.family == "lm" else "model.middle_blocks"
        raise ConfigError(
            f"{what} = {mids} is fewer than the {holders} "
            f"nodes: every node needs at least one middle block to train"
        )
    if c.snake.capabilities and len(c.snake.capabilities) != holders:
        raise ConfigError(
            f"snake.capabilities has {len(c.snake.capabilities)} entries but there are "
            f"{holders} nodes"
        )


def label(cfg: RunConfig) -> str:
    """``snake-p2p`` or ``snake-cs``, with ``-own`` where a node keeps only its own blocks
    between turns (``snake.keep``)."""
    return f"snake-{cfg.snake.mode}" + ("-own" if cfg.snake.keep == "own" else "")


def tags(cfg: RunConfig) -> list[str]:
    """Snake's label-skew options away from their defaults: ``la``, ``prox``, ``ends-``,
    ``kd`` (a language model's judged against its own defaults: ``LM_ENDS``,
    ``LM_KD_WEIGHT``, ``LM_PROX_MU``)."""
    from snake_mpi.config import LM_ENDS, LM_KD_WEIGHT, LM_PROX_MU, KDConfig, SnakeConfig

    s, default, is_lm = cfg.snake, SnakeConfig(), cfg.model.family == "lm"
    out = []
    if s.logit_adjust != default.logit_adjust:
        out.append(f"la{s.logit_adjust:g}")
    if s.prox_mu != (LM_PROX_MU if is_lm else default.prox_mu):
        out.append(f"prox{s.prox_mu:g}")
    if s.ends != (LM_ENDS if is_lm else default.ends):
        out.append(f"ends-{s.ends}")
    if s.kd.weight != (LM_KD_WEIGHT if is_lm else KDConfig().weight):
        out.append(f"kd{s.kd.weight:g}")
    return out


def result_attrs(cfg: RunConfig) -> dict[str, str]:
    """Snake's options as root attributes of its result file."""
    s = cfg.snake
    return {"mode": s.mode, "transfer": s.transfer, "ends": s.ends, "keep": s.keep}


def plan_of(cfg: RunConfig, res: Result) -> list[list[int]]:
    """The trained blocks of every node of a Snake run, rebuilt as the run made them (from the
    block table and the recorded capabilities and block times)."""
    from snake_mpi.schemes.snake import plan_from_params

    n = res.world_size
    params = [int(p) for p in res.tables["blocks"]["params"]]
    nodes = list(range(1, n)) if cfg.snake.mode == "cs" else list(range(n))
    caps = res.arrays.get("assignment/capability")
    times = res.arrays.get("assignment/block_time_s")
    costs = None if times is None else times[nodes][:, 1:-1].mean(axis=0)
    return plan_from_params(params, cfg.snake, len(nodes), costs=costs, capabilities=caps)


SPEC = SchemeSpec(
    name="snake",
    run="snake_mpi.schemes.snake:run",
    whole_model_turns=True,
    client_server=lambda cfg: cfg.snake.mode == "cs",
    supports_lm=True,
    expected_bytes="snake_mpi.analysis.expected:snake_bytes",
    data_role="nodes",
    check_world=check_world,
    label=label,
    tags=tags,
    sections=("snake",),
    result_attrs=result_attrs,
    needs=("blocks/params",),
    judged=True,
    checkpoint_blocks="snake_mpi.analysis.analytic:snake_checkpoint_blocks",
)
