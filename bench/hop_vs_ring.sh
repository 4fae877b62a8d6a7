#!/usr/bin/env bash
# The machine's limit for weight hops and snake_mpi's share of it, measured in one job:
# ring_bw (C; 2 ranks, 1 KiB .. 256 MiB, best of 5) in both modes, and in token mode again
# with Open MPI's single copy off (OMPI_MCA_smsc=^cma: the copy-in/copy-out pipeline that
# snake_mpi's large same-host messages take, comm.pipelined_min_bytes), mpi4py's own benchmark
# (`python -m mpi4py.bench pingpong`, 64 KiB .. 256 MiB, 5 runs, best kept), the same pingpong
# over written memory (`-a none`, 3 runs: shown next to the limit, never the limit: the default
# pingpong's buffers are never written), bench/limit.py, which takes the best of the four per
# size as the limit and names the benchmark that set it,
# then bench/transfer.py (64 KiB .. 256 MiB, best of 5) against that limit:
#   part 1, the comm layer: comm.send_blocks/recv_blocks and bare mpi4py one way, and the hop
#     back and forth as ring_bw --mode token passes it (token), as a share of the limit;
#   part 2, end to end: a model's blocks (one nn.Linear of the payload's size, then a segment
#     of 4 such blocks) hop model -> model through the schemes' own send_blocks/receive_blocks,
#     landing in the model's block buffers (views) and packed/copied as before flat storage
#     (copy), against a bare mpi4py token and the limit, with each mode's RSS growth; views
#     hops go by hop plans (header and persistent requests made once), and again without
#     them (general, comm.hop_plans = false).
# Inside a Slurm allocation all use the same launcher.
#
#   bench/hop_vs_ring.sh OUT_DIR  # writes OUT_DIR/ring_bw.csv (token), ring_bw_sendrecv.csv,
#                                 # ring_bw_pipelined.csv (token, no single copy),
#                                 # pingpong.txt, pingpong_written.txt, limit.csv,
#                                 # transfer.csv (part 1), e2e.csv (part 2)
#
# Builds build/ring_bw with CMake first if it is missing (needs `make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:?usage: bench/hop_vs_ring.sh OUT_DIR}
mkdir -p "$OUT"
BIN=${VENV:-.venv}/bin
case $BIN in /*) ;; *) BIN=$PWD/$BIN ;; esac # VENV may be absolute (another checkout's venv)
export PATH="$BIN:$PATH" OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
if [ ! -x build/ring_bw ]; then
    cmake -S . -B build -DCMAKE_BUILD_TYPE=Release >/dev/null
    cmake --build build --target ring_bw >/dev/null
fi
echo "== ring_bw (C), --mode sendrecv: every rank sends and receives at once =="
snake-mpi launch -n 2 -- build/ring_bw --max-bytes 268435456 --trials 5 | tee "$OUT/ring_bw_sendrecv.csv"
echo "== ring_bw (C), --mode token: one hop at a time, as Snake's weights travel =="
snake-mpi launch -n 2 -- build/ring_bw --mode token --max-bytes 268435456 --trials 5 | tee "$OUT/ring_bw.csv"
echo "== ring_bw (C), --mode token with the single copy off (OMPI_MCA_smsc=^cma: copy-in/copy-out) =="
OMPI_MCA_smsc='^cma' snake-mpi launch -n 2 -- build/ring_bw --mode token --max-bytes 268435456 \
    --trials 5 | tee "$OUT/ring_bw_pipelined.csv"
echo "== python -m mpi4py.bench pingpong (mpi4py's own benchmark), 5 runs =="
: >"$OUT/pingpong.txt"
for _ in 1 2 3 4 5; do
    snake-mpi launch -n 2 -- python -m mpi4py.bench pingpong -m 65536 -n 268435456 \
        | tee -a "$OUT/pingpong.txt"
done
echo "== the same pingpong over written memory (-a none: bytearray buffers), 3 runs; shown, not the limit =="
: >"$OUT/pingpong_written.txt"
for _ in 1 2 3; do
    snake-mpi launch -n 2 -- python -m mpi4py.bench pingpong -m 65536 -n 268435456 -a none \
        | tee -a "$OUT/pingpong_written.txt"
done
echo "== the limit: the best of ring_bw token (with and without single copy), sendrecv and the pingpong per size =="
python -m bench.limit "$OUT"
echo "== snake_mpi hops against the limit: the comm layer, then model -> model (end to end) =="
snake-mpi launch -n 2 -- python -m bench.transfer --skip-probes --trials 5 \
    --limit-csv "$OUT/limit.csv" --csv "$OUT/transfer.csv" --e2e-csv "$OUT/e2e.csv"
