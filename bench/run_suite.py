"""Run a benchmark suite: ``python -m bench.run_suite NAME|FILE --out DIR [--dry-run]``.

Same as ``snake-mpi suite``; suites live in bench/suites/ (see snake_mpi/suite.py).
"""

import sys

from snake_mpi.suite import main

if __name__ == "__main__":
    sys.exit(main())
