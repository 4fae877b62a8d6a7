"""The package's shape (architecture.md): no import circles, and none new while the last one is
taken apart (issue 28). The graph is read from the source text by ``bench/import_graph.py``."""

from __future__ import annotations

from conftest import bench_script

KNOWN_CIRCLE = frozenset(
    {
        "snake_mpi.config",
        "snake_mpi.context",
        "snake_mpi.device",
        "snake_mpi.record",
        "snake_mpi.schemes.registry",
        "snake_mpi.transport.payloads",
    }
)
"""The one circle left (config -> schemes.registry -> config, and the types the context and
the registry name): it may shrink, never grow."""


def test_no_import_circle_but_the_known_one_and_it_does_not_grow():
    ig = bench_script("import_graph")
    edges = ig.graph()
    assert "snake_mpi.analysis.runs" in edges and len(edges) > 50  # the package was read
    for group in ig.circles(edges):
        new = sorted(set(group) - KNOWN_CIRCLE)
        assert not new, f"modules in an import circle: {', '.join(group)} (new: {new})"


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
