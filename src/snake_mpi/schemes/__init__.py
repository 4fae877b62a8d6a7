"""Distributed learning schemes; each module has ``run(ctx) -> None`` and talks only to ctx
(``snake_mpi.context.Context``).

Each scheme declares itself once, in a light module of its own (``<name>_spec.py``: its
``SPEC``); ``schemes.registry`` collects them, one line per scheme (``SCHEMES``), and ``add``
joins a scheme from outside the package. This package imports no torch itself, so the config
can read the registry cheaply.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from snake_mpi.schemes.registry import (
    REGISTRY,
    SCHEMES,
    SchemeSpec,
    add,
    register,
    scheme_names,
    scheme_spec,
    unregister,
)

if TYPE_CHECKING:
    from snake_mpi.context import Context

__all__ = [
    "REGISTRY",
    "SCHEMES",
    "SchemeSpec",
    "add",
    "get_scheme",
    "register",
    "scheme_names",
    "scheme_spec",
    "unregister",
]


def get_scheme(name: str) -> Callable[[Context], None]:
    """The ``run`` function of scheme ``name`` (from its registered spec)."""
    return scheme_spec(name).run_function()
