"""The schemes this build can run: one line per scheme, the module that declares it.

Each scheme declares itself once, in its own light module, as a ``SchemeSpec`` named ``SPEC``:
its ``run(ctx)``, its world checks, its analytic byte count and what analysis shows of it
(label, config sections, result attributes). This module only collects them (``SCHEMES``,
imported on the first look-up), so ``config`` (validation), ``run`` (dispatch), ``suite`` (rank
counts) and ``analysis`` read the specs and name no scheme themselves. No torch here: heavy
functions are given by dotted path (``"package.module:function"``) and imported when first used.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import numpy as np

    from snake_mpi.config import RunConfig
    from snake_mpi.context import Context
    from snake_mpi.store import Result

SCHEMES = (
    "snake_mpi.schemes.snake_spec",
    "snake_mpi.schemes.fedavg_spec",
    "snake_mpi.schemes.split_spec",
    "snake_mpi.schemes.splitfed_spec",
    "snake_mpi.schemes.centralised_spec",
)
"""The built-in schemes: the modules whose ``SPEC`` declares each (in this order)."""

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
    """What one scheme declares; its module names it ``SPEC`` (``add``)."""

    name: str
    """The config's ``scheme`` value."""
    run: Ref
    """``run(ctx: Context) -> None``: the scheme on this rank (``snake_mpi.context.Context``)."""
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
    label: Callable[[RunConfig], str] | None = None
    """What ran, as tables and figures name it (Snake: ``snake-p2p``, ``snake-cs-own``);
    None: the scheme's name."""
    tags: Callable[[RunConfig], list[str]] | None = None
    """Short names of its own label-skew options away from their defaults (``la0``,
    ``prox0``, ...), appended to the label; None: none."""
    sections: tuple[str, ...] = ()
    """The config tables it reads (``[snake]``, ``[fedavg]``, ``[split]``): runs are grouped by
    these, export fills their columns only for it."""
    result_attrs: Callable[[RunConfig], dict[str, str]] | None = None
    """Root attributes of its result files beside scheme, model and dataset (Snake's mode,
    transfer, ends, keep); None: none."""
    needs: tuple[str, ...] = ()
    """Result columns (``"table/column"``) that comparing its runs needs beyond every run's."""
    judged: bool = False
    """The paper's claims judge its runs against FedAvg's (and full fine-tuning's)."""
    checkpoint_blocks: Ref | None = None
    """``f(n_blocks, rounds_done, *, world_size, plan, mode, keep, schedule) -> list[set]``:
    the blocks each rank's checkpoint file holds after ``rounds_done >= 1`` rounds
    (``analysis.analytic.checkpoint_blocks``); None: no analytic model."""

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

    def label_of(self, cfg: RunConfig, *, tags: bool = True) -> str:
        """What ran under ``cfg``: ``label``, then (if ``tags``) ``+tag`` for each of ``tags``."""
        base = self.name if self.label is None else self.label(cfg)
        own = self.tags(cfg) if tags and self.tags else []
        return base + "".join(f"+{t}" for t in own)


REGISTRY: dict[str, SchemeSpec] = {}
"""Every registered scheme by name, in registration order (the order messages list them);
read it through ``scheme_names`` / ``scheme_spec``, which load ``SCHEMES`` first."""

_loaded = False
_loading = False
_LOAD_LOCK = threading.RLock()
"""Held while the built-in schemes load: ranks run as threads (``LocalComm``) may all look a
scheme up first at once, and none may see the registry half filled."""


def add(module: str) -> SchemeSpec:
    """Register the ``SPEC`` of ``module`` (a dotted module path): what a line of ``SCHEMES``
    does, and how a scheme outside the package (a test's) joins."""
    _load()
    return register(importlib.import_module(module).SPEC)


def _load() -> None:
    """Register the built-in schemes, once (on the first look-up, so that a scheme's module
    may import the config, which imports this module). Thread-safe: another thread waits until
    the load is done; the loading thread's own nested look-ups (``register``) return at once."""
    global _loaded, _loading
    if _loaded:
        return
    with _LOAD_LOCK:
        if _loaded or _loading:
            return
        _loading = True
        try:
            for module in SCHEMES:
                register(importlib.import_module(module).SPEC, replace=True)
            _loaded = True
        finally:
            _loading = False


def register(spec: SchemeSpec, *, replace: bool = False) -> SchemeSpec:
    """Add ``spec`` to the registry (a name already there is an error unless ``replace``)."""
    _load()
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
    _load()
    return REGISTRY.pop(name, None)


def scheme_names() -> tuple[str, ...]:
    """The registered schemes' names, in registration order."""
    _load()
    return tuple(REGISTRY)


def scheme_spec(name: str) -> SchemeSpec:
    """The spec of scheme ``name`` (``KeyError`` naming the known schemes if there is none)."""
    _load()
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(
            f"unknown scheme {name!r}; registered: {', '.join(scheme_names())}"
        ) from None
