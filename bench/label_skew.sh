#!/usr/bin/env bash
# The label-skew sweep (bench/suites/label-skew.toml, docs/label-skew.md), WORKERS cells at a
# time (default 2: a Snake cell keeps about one core busy, its waiting ranks sleep), then its
# tables and figures:
#   bench/label_skew.sh [OUT_DIR]          # default results/label-skew; resumable
# Results: OUT_DIR/*.h5 (one per cell), manifest.json, and OUT_DIR/report/label-skew.md with
# the figures. Accuracy and bytes do not depend on what else runs; the timings do.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/label-skew}
workers=${WORKERS:-2}
export PATH="$PWD/.venv/bin:$PATH"
n=$(snake-mpi suite label-skew --out "$out" --count)
pids=()
stop() {  # the suites pass TERM on to their running cells, which end with them
  for p in "${pids[@]}"; do pkill -TERM -P "$p" 2>/dev/null || true; kill "$p" 2>/dev/null || true; done
  wait || true
}
trap 'stop; exit 130' INT TERM
for ((w = 0; w < workers; w++)); do
  (
    for ((k = w; k < n; k += workers)); do
      snake-mpi suite label-skew --out "$out" --cell "$k" | grep -v '^suite: .*skipped' || true
    done
  ) &
  pids+=($!)
done
wait
python -m snake_mpi.analysis.skew "$out" --out "$out/report"
