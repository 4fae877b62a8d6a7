"""Benchmarks of snake_mpi: each module a script run from the repository root as
``python -m bench.NAME`` (under ``mpirun`` where it needs ranks); they import one another as
``bench.NAME``, and tests import them the same way."""
