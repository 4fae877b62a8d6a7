"""The package's import graph: its circles and its upward imports (goal: none of either).

Reads every module of ``src/snake_mpi`` as text (nothing is imported), takes each import of
another ``snake_mpi`` module, at the top, inside a function or under ``TYPE_CHECKING`` (each
still ties the two modules together), and prints the groups of modules that import each other
in a circle (strongly connected components of two or more) and every import of a module in a
higher layer than the importer's (``LAYERS``, the order of the design's architecture.md).

    .venv/bin/python bench/import_graph.py [--edges] [--src DIR]
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("cli", ("snake_mpi.cli", "snake_mpi.docgen")),
    (
        "entry points",
        ("snake_mpi.run", "snake_mpi.suite", "snake_mpi.launch", "snake_mpi.resources",
         "snake_mpi.analysis"),
    ),
    ("schemes", ("snake_mpi.schemes",)),
    (
        "transport, blocks, train, assign",
        ("snake_mpi.transport", "snake_mpi.blocks", "snake_mpi.train", "snake_mpi.assign",
         "snake_mpi.context", "snake_mpi.checkpoint", "snake_mpi.record", "snake_mpi.probes",
         "snake_mpi.device"),
    ),
    ("models, data", ("snake_mpi.models", "snake_mpi.data")),
    ("config", ("snake_mpi.config",)),
    (
        "results and utilities",
        ("snake_mpi", "snake_mpi.store", "snake_mpi.schema", "snake_mpi.durable",
         "snake_mpi.provenance", "snake_mpi.numerics", "snake_mpi.outlock", "snake_mpi.proctree"),
    ),
)  # fmt: skip
"""The layers, top first: ``cli -> run -> schemes -> (transport, blocks, train, assign) ->
models, data -> config`` (architecture.md), with analysis beside run (it reads results through
store and schema, below everything), and the services a scheme is handed (its context,
checkpoints, recorder, probes, device) beside transport. A module belongs to the layer of the
longest prefix that names it or its package; importing a module of a higher layer is upward."""


def layer_of(module: str) -> int:
    """Index in ``LAYERS`` (0: the top) of ``module``; ``KeyError`` if no layer names it."""
    best, found = -1, None
    for i, (_name, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    if found is None:
        raise KeyError(f"{module} is in no layer of LAYERS")
    return found


def upward(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Every import ``(importer, imported)`` whose imported module is in a higher layer, sorted."""
    return sorted(
        (a, b) for a, targets in edges.items() for b in targets if layer_of(b) < layer_of(a)
    )


def modules(src: Path = SRC) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the ``snake_mpi`` package."""
    out = {}
    for f in sorted((src / "snake_mpi").rglob("*.py")):
        parts = f.relative_to(src).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def graph(src: Path = SRC) -> dict[str, set[str]]:
    """Module -> the package's modules it imports (anywhere in its file)."""
    mods = modules(src)
    edges: dict[str, set[str]] = {}
    for name, path in mods.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        found: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join([*up, base] if base else up)
                # a submodule named in the list is the import (its package's __init__ runs
                # first, but importing a sibling from inside the package is not a circle)
                targets = [
                    f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names
                ]
            else:
                continue
            for t in targets:
                while t and t not in mods:
                    t = t.rpartition(".")[0]
                if t and t != name:
                    found.add(t)
        edges[name] = found
    return edges


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of two or more modules that reach each other (Tarjan's strongly connected
    components), each sorted, the groups in order of their first module."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = itertools.count()

    def visit(v: str) -> None:
        index[v] = low[v] = next(counter)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 10 * len(edges) + 100))
    try:
        for v in sorted(edges):
            if v not in index:
                visit(v)
    finally:
        sys.setrecursionlimit(limit)
    return sorted(found)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--edges", action="store_true", help="also print every module's imports")
    p.add_argument("--src", type=Path, default=SRC, help="the src/ folder to read (default: this)")
    args = p.parse_args(argv)
    edges = graph(args.src)
    if args.edges:
        for name in sorted(edges):
            print(f"{name} -> {', '.join(sorted(edges[name])) or '-'}")
    found = circles(edges)
    up = upward(edges)
    print(
        f"{len(edges)} modules, {sum(map(len, edges.values()))} imports, {len(found)} circle(s), "
        f"{len(up)} upward import(s)"
    )
    for group in found:
        print(f"  circle of {len(group)}: {', '.join(group)}")
    for a, b in up:
        print(f"  upward: {a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
