"""Accuracy against label skew: ``python analysis/label_skew.py RESULTS_DIR --out OUT_DIR``.

Final accuracy per variant against the Dirichlet alpha (mean, min–max over seeds) next to
plain FedAvg's, bytes per round, issue 14's goal and the paper's claims; see docs/label-skew.md.
"""

import sys

from snake_mpi.analysis.skew import main

if __name__ == "__main__":
    sys.exit(main())
