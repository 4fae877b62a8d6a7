"""Runs side by side: ``python analysis/compare.py RUN.h5 [RUN.h5 | DIR ...] [--markdown]``.

Same as ``snake-mpi compare``; the figures are documented in docs/compare.md.
"""

import sys

from snake_mpi.analysis.compare import main

if __name__ == "__main__":
    sys.exit(main())
