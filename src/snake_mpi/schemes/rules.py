"""The checks of a run config that need more than the config: the scheme registry, the model
presets, or the number of ranks (``config.py`` checks what the config alone says).

Every caller that loads a config for a run goes through here (``checked_config``, or ``check``
on a config it built, and ``validate_for_world`` once the world size is known), so a bad config
gives the same answer on every rank before any message is sent. Light: no torch (the presets are
imported when a language model is checked).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from snake_mpi import config
from snake_mpi.config import ConfigError, RunConfig, load_config, parse_edge
from snake_mpi.schemes.registry import resolve, scheme_names, scheme_spec


def checked_config(path: str | os.PathLike[str] | None, overrides: Sequence[str] = ()) -> RunConfig:
    """``config.load_config`` and ``check``: the config a run may start from (before the
    checks that need the world size, ``validate_for_world``)."""
    return check(load_config(path, overrides))


def check(c: RunConfig) -> RunConfig:
    """The checks that need the scheme registry or the model presets; returns ``c``."""
    if c.scheme not in scheme_names():
        known = ", ".join(scheme_names())
        raise ConfigError(f"unknown scheme {c.scheme!r}; choose one of: {known}")
    _check_lm(c)
    _check_eval(c)
    return c


def _check_lm(c: RunConfig) -> None:
    """A language model's preset is known, and its scheme trains language models."""
    if c.model.family != "lm":
        return
    if c.model.preset:
        from snake_mpi.models.lm_presets import ModelSpecError, preset

        try:
            preset(c.model.preset)
        except ModelSpecError as e:
            raise ConfigError(str(e)) from None
    if not scheme_spec(c.scheme).supports_lm:
        lm_schemes = [name for name in scheme_names() if scheme_spec(name).supports_lm]
        raise ConfigError(
            f"scheme {c.scheme!r} does not support language models; use one of: "
            f"{', '.join(lm_schemes)}"
        )


def _check_eval(c: RunConfig) -> None:
    """``eval.after_each_turn`` needs a scheme whose training rank holds the whole model."""
    if c.eval.after_each_turn and not scheme_spec(c.scheme).whole_model_turns:
        able = [name for name in scheme_names() if scheme_spec(name).whole_model_turns]
        raise ConfigError(
            f"eval.after_each_turn: scheme {c.scheme!r} splits the model between clients and "
            f"the server, so no rank that trains holds a model to evaluate after its turn; "
            f"use it with {', '.join(able)}, or set eval.after_each_turn = false"
        )


def n_middle_blocks(c: RunConfig) -> int:
    """Middle blocks of the configured model (a language model's decoder layers, read from the
    preset or the checkpoint's config.json)."""
    if c.model.family == "lm":
        from snake_mpi.models.lm_presets import ModelSpecError, n_layers

        try:
            return n_layers(c.model.preset, c.model.checkpoint)
        except ModelSpecError as e:
            raise ConfigError(str(e)) from None
    return c.model.middle_blocks


# BRIDGE: ``config.check_snake_world`` calls ``n_middle_blocks`` by its name in config.py until
# it moves into the Snake scheme's module; config imports nothing above it, so the function is
# put there from here. Remove this line and config's stub when check_snake_world has moved.
config.n_middle_blocks = n_middle_blocks


def is_client_server(c: RunConfig) -> bool:
    """True where rank 0 is a server/controller that holds no training data (the scheme's
    ``SchemeSpec.client_server``)."""
    return scheme_spec(c.scheme).is_client_server(c)


def data_ranks(c: RunConfig, world_size: int) -> list[int]:
    """The ranks that hold a shard of the training data (the scheme's nodes or clients)."""
    return list(range(1, world_size)) if is_client_server(c) else list(range(world_size))


def validate_for_world(c: RunConfig, world_size: int) -> None:
    """Every check of ``c`` for a run on ``world_size`` ranks (``check`` included); identical
    on every rank."""
    check(c)
    if c.model.family == "lm":
        n_middle_blocks(c)  # a missing or unreadable checkpoint is a config error
    spec = scheme_spec(c.scheme)
    _check_rank_count(spec.name, spec.min_ranks, spec.max_ranks, world_size)
    holders = len(data_ranks(c, world_size))
    if spec.check_world is not None:
        resolve(spec.check_world)(c, world_size, holders)
    _check_data_holders(c, holders, spec.data_role)
    _check_ranks_named(c, world_size)


def _check_rank_count(scheme: str, least: int, most: int | None, world_size: int) -> None:
    """The world size against the ranks a scheme runs on (``SchemeSpec.min_ranks/max_ranks``)."""
    if most == 1 and world_size != 1:
        raise ConfigError(
            f"scheme {scheme!r} trains on one rank with all the data; got {world_size} ranks "
            f"(launch with `mpirun -n 1 snake-mpi run ...` or without mpirun)"
        )
    if world_size < least:
        raise ConfigError(
            f"scheme {scheme!r} is distributed and needs at least {least} MPI ranks, got "
            f"{world_size} (launch with e.g. `mpirun -n {max(least, 4)} snake-mpi run ...`)"
        )
    if most is not None and world_size > most:
        raise ConfigError(f"scheme {scheme!r} runs on at most {most} MPI ranks, got {world_size}")


def _check_data_holders(c: RunConfig, holders: int, role: str) -> None:
    """Enough training samples (and shards) for every rank that holds data."""
    if c.data.partition == "shards" and c.data.n_train < holders * c.data.shards_per_node:
        raise ConfigError(
            f"data.n_train = {c.data.n_train} is fewer than the {holders} {role} x "
            f"data.shards_per_node = {c.data.shards_per_node} shards"
        )
    if c.data.n_train < holders:
        raise ConfigError(f"data.n_train = {c.data.n_train} is fewer than the {holders} {role}")


def _check_ranks_named(c: RunConfig, world_size: int) -> None:
    """Settings given per rank, or naming ranks, fit the world."""
    if c.emulate.slowdown and len(c.emulate.slowdown) != world_size:
        raise ConfigError(
            f"emulate.slowdown has {len(c.emulate.slowdown)} entries but there are "
            f"{world_size} ranks"
        )
    for e in c.emulate.edges:
        src, dst, _bps, _lat = parse_edge(e)
        if max(src, dst) >= world_size:
            raise ConfigError(f"emulate.edges entry {e!r} names a rank >= {world_size}")
    if c.debug.fail_rank >= world_size:
        raise ConfigError(f"debug.fail_rank = {c.debug.fail_rank} but there are {world_size} ranks")
