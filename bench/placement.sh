#!/usr/bin/env bash
# Same config and seed, same bits, wherever the ranks run? Runs CONFIG (default: the demo, for 2
# rounds) on 4 ranks placed three ways: unbound (each rank may use every CPU), bound to one core
# each (`--bind-to core:overload-allowed`), and across two hosts (bench/two_hosts.sh: 2 ranks on
# each; root only, else left out). Prints, for each placement, the final models' hashes, the final
# accuracy, the data hash and the torch threads and CPU kernels per rank, then whether all agree
# (exit 0) or not (exit 1). About 2 minutes for the demo on 2 cores. docs/reproducibility.md.
# With MPICH_VENV=DIR (a venv with the `mpich` wheel, mpi4py and this project: `python -m venv
# DIR && DIR/bin/pip install mpich mpi4py -e .`) a fourth placement runs under MPICH's mpiexec.
#   bench/placement.sh [CONFIG] [OUT_DIR] [-- extra snake-mpi run options, e.g. --set seed=1]
set -euo pipefail
cd "$(dirname "$0")/.."
cfg=${1:-bench/configs/demo.toml}
out=${2:-results/placement}
shift $(( $# >= 2 ? 2 : $# ))
[[ ${1:-} == -- ]] && shift
export PATH="$PWD/.venv/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
mkdir -p "$out"
run=(run "$cfg" --set train.rounds=2 --overwrite "$@")
names=()
place() {  # NAME LAUNCHER... SNAKE_MPI: one run, its log beside its result
  local name=$1
  shift
  echo "placement: $name ..."
  "$@" "${run[@]}" --out "$out/$name.h5" < /dev/null > "$out/$name.log" 2>&1 ||
    { echo "placement: $name failed (exit $?): see $out/$name.log"; exit 1; }
  names+=("$name")
}
place unbound mpirun -n 4 --oversubscribe --bind-to none snake-mpi
place bound mpirun -n 4 --oversubscribe --bind-to core:overload-allowed snake-mpi
if [[ $(id -u) == 0 ]] && unshare -u -m true 2> /dev/null; then
  place two-hosts bench/two_hosts.sh --slots 2,2 -- -n 4 --bind-to none snake-mpi
else
  echo "placement: two-hosts left out (bench/two_hosts.sh needs root and namespaces)"
fi
if [[ -n ${MPICH_VENV:-} ]]; then
  place mpich "$MPICH_VENV/bin/mpiexec" -n 4 "$MPICH_VENV/bin/snake-mpi"
fi
python - "$out" "${names[@]}" <<'PY'
import sys
from pathlib import Path

from snake_mpi.store import read_result

out, names = Path(sys.argv[1]), sys.argv[2:]
rows = []
print(f"{'placement':<10} {'MPI':<16} {'hosts':<22} {'model sha256 (rank 0..)':<30} {'accuracy':>8}  "
      f"{'data sha256':<12}  threads  CPU kernels  affinity")
for name in names:
    res = read_result(out / f"{name}.h5")
    r = res.tables["ranks"]
    n = res.world_size
    col = {k: [str(v) for v in r.get(k, ["-"] * n)] for k in (
        "data_sha256", "torch_threads", "cpu_capability", "cpu_affinity")}  # "-": not recorded
    models = sorted(set(r["model_sha256"]))
    acc = float(res.evaluation["accuracy"][-1])
    hosts = ",".join(f"{h} x{list(r['host']).count(h)}" for h in dict.fromkeys(r["host"]))
    rows.append((tuple(r["model_sha256"]), acc, tuple(col["data_sha256"])))
    words = str(res.provenance["mpi_library_version"]).replace(",", " ").split()
    mpi = f"MPICH {words[2]}" if words[0] == "MPICH" else " ".join(words[:3])
    print(f"{name:<10} {mpi:<16} {hosts:<22} {'+'.join(m[:12] for m in models):<30} "
          f"{acc:>8.4f}  {col['data_sha256'][0][:12]:<12}  {','.join(col['torch_threads']):<7}  "
          f"{'+'.join(sorted(set(col['cpu_capability']))):<11}  {' '.join(col['cpu_affinity'])}")
same = len(set(rows)) == 1
print("placement: " + ("the same models, accuracy and data in every placement" if same else
      "the placements DIFFER (compare their threads and CPU kernels above)"))
sys.exit(0 if same else 1)
PY
