#!/usr/bin/env bash
# The reduced-scale paper runs (bench/configs/paper/*-small.toml), then the comparison with
# the paper's claims and the accuracy plots, per partition.
#   CIFAR10_DIR=/path/to/cifar-10-batches-bin bench/paper_small.sh [OUT_DIR] [SCHEME ...]
# SCHEME: snake-p2p snake-cs fedavg split splitfed centralised (default: all).
# EXTRA="--set data.name=\"synthetic\"" runs the same shapes on synthetic stand-in data.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-results/paper-small}
shift || true
schemes=("$@")
[ ${#schemes[@]} -eq 0 ] && schemes=(snake-p2p snake-cs fedavg split splitfed centralised)
export PATH="$PWD/.venv/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
over=$(mpirun --version 2>&1 | grep -q 'Open MPI' && echo --oversubscribe || true)
for part in iid dir0.5; do
  mkdir -p "$out/$part"
  for s in "${schemes[@]}"; do
    cfg=bench/configs/paper/$s-$part-small.toml
    n=$(grep -o 'mpirun -n [0-9]*' "$cfg" | awk '{print $3}')
    start=$(date +%s)
    # shellcheck disable=SC2086
    mpirun -n "$n" $over snake-mpi run "$cfg" ${EXTRA:-} --out "$out/$part/$s.h5" --overwrite \
      | tail -n 1
    echo "== $s $part on $n ranks: $(( $(date +%s) - start )) s"
  done
  snake-mpi compare "$out/$part" --out "$out/$part/compare.md" --plots "$out/$part/plots"
done
