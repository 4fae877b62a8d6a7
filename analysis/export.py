"""Long-format table: ``python analysis/export.py RUN.h5 [RUN.h5 | DIR ...] --out table.csv``.

Same as ``snake-mpi export``; the columns are documented in docs/results-schema.md.
"""

import sys

from snake_mpi.analysis.export import main

if __name__ == "__main__":
    sys.exit(main())
