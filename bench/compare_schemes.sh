#!/usr/bin/env bash
# Every scheme on the demo's workload (bench/configs/schemes/), 4 ranks (centralised: 1), then
# the side-by-side table. About 5 minutes on 2 cores (the development machine,
# 2026-11-25: docs/benchmarks/2026-11-25-schemes.md).
#   bench/compare_schemes.sh [OUT_DIR]        (default results/schemes)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/schemes}
np=${NP:-4}
bin=.venv/bin
export PATH="$PWD/$bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
over=$(mpirun --version 2>&1 | grep -q 'Open MPI' && echo --oversubscribe || true)
mkdir -p "$out"
for cfg in bench/configs/schemes/*.toml; do
  name=$(basename "$cfg" .toml)
  n=$np
  [ "$name" = centralised ] && n=1
  echo "== $name on $n rank(s)"
  mpirun -n "$n" $over snake-mpi run "$cfg" --out "$out/$name.h5" --overwrite | tail -n 1
done
snake-mpi compare "$out" --out "$out/compare.md"
