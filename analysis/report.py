"""A report from result files: ``python analysis/report.py RESULTS_DIR --out REPORT_DIR``.

Same as ``snake-mpi report``: report.md and report.html with PNG figures (bytes, memory, time
split, accuracy or perplexity, scaling against N, hop throughput against ring_bw, the paper's
claims). See docs/report.md.
"""

import sys

from snake_mpi.analysis.report import main

if __name__ == "__main__":
    sys.exit(main())
