"""The package's shape (architecture.md): no import circle, and no import that runs up the
layers beyond the known ones, which may only go (issue 28). The graph is read from the source
text by ``bench/import_graph.py``."""

from __future__ import annotations

from conftest import bench_script

KNOWN_UPWARD = frozenset(
    {
        ("snake_mpi.models", "snake_mpi.blocks"),
        ("snake_mpi.models.cnn", "snake_mpi.blocks"),
        ("snake_mpi.models.lm", "snake_mpi.blocks"),
        ("snake_mpi.models.mlp", "snake_mpi.blocks"),
        ("snake_mpi.models.vgg", "snake_mpi.blocks"),
    }
)
"""The upward imports left: the model families build ``blocks.BlockModel``, a layer above them
in architecture.md's order. A ratchet: entries may be removed, never added (goal: empty)."""


def test_no_import_circle():
    ig = bench_script("import_graph")
    edges = ig.graph()
    assert "snake_mpi.analysis.runs" in edges and len(edges) > 50  # the package was read
    assert ig.circles(edges) == []


def test_config_imports_nothing_of_the_package():
    """Pure data at the bottom: the checks that need a scheme, the model presets or the world
    are ``schemes/rules.py``'s."""
    edges = bench_script("import_graph").graph()
    assert edges["snake_mpi.config"] == set()
    assert {"snake_mpi.config", "snake_mpi.schemes.registry"} <= edges["snake_mpi.schemes.rules"]


def test_every_module_has_a_layer_and_no_new_import_runs_upward():
    ig = bench_script("import_graph")
    edges = ig.graph()
    for name in edges:
        ig.layer_of(name)  # KeyError names a module that LAYERS does not place
    found = set(ig.upward(edges))
    new = sorted(found - KNOWN_UPWARD)
    assert not new, f"imports of a higher layer: {new}"
    gone = sorted(KNOWN_UPWARD - found)
    assert not gone, f"no longer upward: remove them from KNOWN_UPWARD: {gone}"


def test_the_graph_finds_a_circle_where_there_is_one(tmp_path):
    ig = bench_script("import_graph")
    pkg = tmp_path / "snake_mpi"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from snake_mpi import b\n")
    (pkg / "b.py").write_text("def f():\n    from snake_mpi.sub.c import g\n")  # deferred
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "c.py").write_text("from ..a import x\nimport snake_mpi.sub\n")
    edges = ig.graph(tmp_path)
    assert edges["snake_mpi.sub.c"] == {"snake_mpi.a", "snake_mpi.sub"}
    assert ig.circles(edges) == [["snake_mpi.a", "snake_mpi.b", "snake_mpi.sub.c"]]


def test_the_graph_finds_an_upward_import_where_there_is_one(tmp_path):
    """config (the bottom but one) importing the registry (schemes) under TYPE_CHECKING, and a
    model importing the run in a function, are upward; run importing config is not."""
    ig = bench_script("import_graph")
    pkg = tmp_path / "snake_mpi"
    for d in (pkg / "schemes", pkg / "models"):
        d.mkdir(parents=True)
        (d / "__init__.py").write_text("")
    (pkg / "__init__.py").write_text("")
    (pkg / "config.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n"
        "    from snake_mpi.schemes.registry import x\n"
    )
    (pkg / "schemes" / "registry.py").write_text("from snake_mpi import config\n")
    (pkg / "models" / "cnn.py").write_text("def f():\n    from snake_mpi import run\n")
    (pkg / "run.py").write_text("from snake_mpi.config import y\n")
    edges = ig.graph(tmp_path)
    assert ig.upward(edges) == [
        ("snake_mpi.config", "snake_mpi.schemes.registry"),
        ("snake_mpi.models.cnn", "snake_mpi.run"),
    ]
    assert ig.circles(edges) == [["snake_mpi.config", "snake_mpi.schemes.registry"]]
