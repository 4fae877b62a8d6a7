#!/usr/bin/env bash
# Same code change, same results? Runs every scheme (Snake P2P and CS, FedAvg, split, SplitFed,
# centralised) on tests/configs/tiny.toml with the code at REV and with this working tree, and
# compares each pair of result files with bench/same_results.py (timing, memory, series and
# provenance aside). Exit 0 when every pair is the same run. About 2 minutes on 2 cores.
#   bench/before_after.sh REV [OUT_DIR] [-- extra same_results.py options, e.g. --allow-new]
set -euo pipefail
cd "$(dirname "$0")/.."
rev=${1:?usage: bench/before_after.sh REV [OUT_DIR] [-- --allow-new]}
out=${2:-results/before-after}
shift $(( $# >= 2 ? 2 : 1 ))
[[ ${1:-} == -- ]] && shift
py=$PWD/.venv/bin/python
export PATH="$PWD/.venv/bin:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
over=$(mpirun --version 2>&1 | grep -q 'Open MPI' && echo --oversubscribe || true)
mkdir -p "$out"
src_before=$(mktemp -d)
trap 'git worktree remove --force "$src_before" >/dev/null 2>&1 || rm -rf "$src_before"' EXIT
git worktree add -q --detach "$src_before" "$rev"
echo "before: $(git -C "$src_before" log -1 --format='%h %s' | cut -c1-80)"
echo "after:  this working tree ($(git log -1 --format=%h)$(git diff --quiet || echo ', with changes'))"
cfg=tests/configs/tiny.toml
status=0
while read -r name n overrides; do
  for side in before after; do
    src=$PWD/src
    [[ $side == before ]] && src=$src_before/src
    # shellcheck disable=SC2086
    PYTHONPATH=$src mpirun -n "$n" $over "$py" -m snake_mpi.cli run "$cfg" \
      --out "$out/$name.$side.h5" --overwrite $overrides < /dev/null > "$out/$name.$side.log" 2>&1 ||
      { echo "$name ($side) failed: see $out/$name.$side.log"; status=1; continue 2; }
  done
  "$py" -m bench.same_results "$out/$name.before.h5" "$out/$name.after.h5" "$@" < /dev/null || status=1
done <<'RUNS'
snake_p2p 4 --set snake.mode="p2p"
snake_cs 4 --set snake.mode="cs"
fedavg 4 --set scheme="fedavg"
split 4 --set scheme="split"
splitfed 4 --set scheme="splitfed"
centralised 1 --set scheme="centralised"
RUNS
exit $status
