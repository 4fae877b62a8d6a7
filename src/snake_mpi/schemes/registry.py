"""The schemes this build can run, each declared once by a ``SchemeSpec``.

A spec says what the rest of the package needs to know about a scheme: whether rank 0 is a
server that holds no data, whether it trains language models, how many ranks it runs on, its
``run(ctx)`` and its analytic byte count. ``config`` (validation), ``run`` (dispatch),
``suite`` (rank counts) and ``analysis.expected`` (byte counts) read the specs and name no
scheme themselves. This module is light (no torch): functions are given by dotted path
(``"package.module:function"``) and imported when first used, so the config can be validated
without importing a scheme.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from snake_mpi.config import RunConfig
    from snake_mpi.context import Context
    from snake_mpi.store import Result

Ref = str | Callable[..., Any]
"""A function, or its dotted path ``"package.module:function"`` (imported when first used)."""


def resolve(ref: Ref) -> Callable[..., Any]:
    """The function ``ref`` names (``ref`` itself if it is one)."""
    if callable(ref):
        return ref
    module, sep, attr = ref.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"{ref!r} is not a dotted path of the form 'package.module:function'")
    return getattr(importlib.import_module(module), attr)


@dataclass(frozen=True, slots=True, kw_only=True)
class SchemeSpec:
    """What one scheme declares; registered with ``register``."""

    name: str
    """The config's ``scheme`` value."""
    run: Ref
    """``run(ctx: Context) -> None``: the scheme on this rank (``snake_mpi.schemes.Context``)."""
    client_server: bool | Callable[[RunConfig], bool]
    """Rank 0 is a server or controller that holds no training data (or a function of the
    config that says so, e.g. Snake's ``mode``)."""
    supports_lm: bool
    """It can train ``model.family = "lm"``."""
    expected_bytes: Ref | None
    """``f(cfg: RunConfig, res: Result) -> (sent, received)``: the model-transfer bytes per
    round per rank, shape (n_rounds, world_size), that a run must have moved; None: no
    analytic model."""
    min_ranks: int = 2
    """Fewest MPI ranks it runs on."""
    max_ranks: int | None = None
    """Most MPI ranks it runs on (None: no limit)."""
    data_role: str = "clients"
    """What the config's messages call the ranks that hold data ("nodes", "clients")."""
    whole_model_turns: bool = False
    """The rank that trains holds the whole model after its turn (Snake's node, a FedAvg
    client, centralised), so ``eval.after_each_turn`` can evaluate it there."""
    check_world: Ref | None = None
    """``f(cfg: RunConfig, world_size: int, holders: int) -> None``: its own checks that
    depend on the number of ranks (raise ``config.ConfigError``); None: none."""

    def is_client_server(self, cfg: RunConfig) -> bool:
        """True where rank 0 holds no training data under ``cfg``."""
        cs = self.client_server
        return bool(cs(cfg)) if callable(cs) else bool(cs)

    def run_function(self) -> Callable[[Context], None]:
        """The scheme's ``run(ctx)``."""
        return resolve(self.run)

    def expected_bytes_function(
        self,
    ) -> Callable[[RunConfig, Result], tuple[np.ndarray, np.ndarray]] | None:
        """The scheme's analytic byte count, or None if it declares none."""
        return None if self.expected_bytes is None else resolve(self.expected_bytes)


REGISTRY: dict[str, SchemeSpec] = {}
"""Every registered scheme by name, in registration order (the order messages list them)."""


def register(spec: SchemeSpec, *, replace: bool = False) -> SchemeSpec:
    """Add ``spec`` to the registry (a name already there is an error unless ``replace``)."""
    if spec.name in REGISTRY and not replace:
        raise ValueError(f"scheme {spec.name!r} is already registered")
    if spec.min_ranks < 1 or (spec.max_ranks is not None and spec.max_ranks < spec.min_ranks):
        raise ValueError(
            f"scheme {spec.name!r}: ranks must satisfy 1 <= min_ranks <= max_ranks, got "
            f"{spec.min_ranks}..{spec.max_ranks}"
        )
    REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> SchemeSpec | None:
    """Remove scheme ``name`` (tests); returns its spec, or None if it was not registered."""
    return REGISTRY.pop(name, None)


def scheme_names() -> tuple[str, ...]:
    """The registered schemes' names, in registration order."""
    return tuple(REGISTRY)


def scheme_spec(name: str) -> SchemeSpec:
    """The spec of scheme ``name`` (``KeyError`` naming the known schemes if there is none)."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown scheme {name!r}; registered: {', '.join(scheme_names())}"
        ) from None


# ---------------------------------------------------------------- the built-in schemes

_EXPECTED = "snake_mpi.analysis.expected"

register(
    SchemeSpec(
        name="snake",
        run="snake_mpi.schemes.snake:run",
        whole_model_turns=True,
        client_server=lambda cfg: cfg.snake.mode == "cs",
        supports_lm=True,
        expected_bytes=f"{_EXPECTED}:snake_bytes",
        data_role="nodes",
        check_world="snake_mpi.config:check_snake_world",
    )
)
register(
    SchemeSpec(
        name="fedavg",
        run="snake_mpi.schemes.fedavg:run",
        whole_model_turns=True,
        client_server=True,
        supports_lm=True,
        expected_bytes=f"{_EXPECTED}:fedavg_bytes",
        check_world="snake_mpi.config:check_fedavg_world",
    )
)
register(
    SchemeSpec(
        name="split",
        run="snake_mpi.schemes.split:run",
        client_server=True,
        supports_lm=False,
        expected_bytes=f"{_EXPECTED}:split_bytes",
    )
)
register(
    SchemeSpec(
        name="splitfed",
        run="snake_mpi.schemes.splitfed:run",
        client_server=True,
        supports_lm=False,
        expected_bytes=f"{_EXPECTED}:splitfed_bytes",
    )
)
register(
    SchemeSpec(
        name="centralised",
        run="snake_mpi.schemes.centralised:run",
        whole_model_turns=True,
        client_server=False,
        supports_lm=True,
        expected_bytes=f"{_EXPECTED}:no_bytes",
        min_ranks=1,
        max_ranks=1,
    )
)
