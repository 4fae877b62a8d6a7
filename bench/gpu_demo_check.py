"""Checks of a GPU run's result file (the demo on ranks that share or own GPUs), and a watcher
that records NVML's compute-process list while the run goes.

    python -m bench.gpu_demo_check --watch OUT/demo-nvml.json -- mpirun -n 4 snake-mpi run ...
    python -m bench.gpu_demo_check OUT/demo-gpu.h5 --nvml-log OUT/demo-nvml.json

Watch mode runs the command, and until it ends polls, every ``--interval-s``, each GPU's
compute processes (pid, used bytes) from NVML and the command's process tree with each
process's MPI rank (from its launcher's environment); it writes both to the JSON log and exits
with the command's status.

Check mode prints one line per check and exits 1 if any fails:

- the run completed (status "complete") on CUDA (root attribute ``device``);
- bytes per round per rank, and of the final sync, equal the analytic count (as
  ``snake-mpi compare`` and the MPI tests compute it: ``snake_mpi.analysis.expected``);
- the final accuracy (at least ``--min-accuracy``; the demo test's bar is 0.6, chance 0.1);
- every GPU field of ``/rounds`` is finite on every rank (the NaN ones are listed);
- from the NVML log, no stray CUDA contexts: every process of the job that NVML shows on a GPU
  is a rank, on the GPU its ``/ranks/gpu_uuid`` names, and on no other. Where NVML reports PIDs
  of another PID namespace (containers), processes are counted per GPU instead: no more than
  the ranks placed there.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from snake_mpi.probes.gpu import ROUND_KEYS as GPU_ROUND_FIELDS

RANK_VARS = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK", "SLURM_PROCID")
"""Environment variables that give a process's MPI rank, in the order they are trusted."""


def norm_uuid(uuid: str) -> str:
    """A GPU UUID without the "GPU-" prefix, lower case (torch and NVML spell it differently)."""
    u = str(uuid).strip().lower()
    return u.removeprefix("gpu-")


# ------------------------------------------------------------------ watch mode


def nvml_devices() -> tuple[Any, list[tuple[str, str, Any]], str]:
    """(pynvml, [(uuid, name, handle)], why not) — pynvml None when NVML cannot be used."""
    try:
        import pynvml
    except ImportError:
        return None, [], "pynvml (nvidia-ml-py) is not installed"
    try:
        pynvml.nvmlInit()
        devices = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            h = pynvml.nvmlDeviceGetHandleByIndex(i)
            uuid, name = pynvml.nvmlDeviceGetUUID(h), pynvml.nvmlDeviceGetName(h)
            devices.append((_text(uuid), _text(name), h))
    except Exception as e:  # no driver, no device, a driver/library mismatch
        return None, [], f"NVML unavailable: {e}"
    return pynvml, devices, ""


def _text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def job_ranks(root_pid: int, known: dict[int, int | None]) -> None:
    """Add the processes below ``root_pid`` to ``known`` (pid -> MPI rank, None if not a rank)."""
    import psutil

    try:
        children = psutil.Process(root_pid).children(recursive=True)
    except psutil.Error:
        return
    for p in children:
        if p.pid in known:
            continue
        rank = None
        try:
            env = p.environ()
            rank = next((int(env[v]) for v in RANK_VARS if env.get(v, "").isdigit()), None)
        except (psutil.Error, OSError):
            pass
        known[p.pid] = rank


def watch(log: Path, cmd: list[str], interval_s: float) -> int:
    """Run ``cmd``, polling NVML and the process tree until it ends; write the log."""
    nvml, devices, why = nvml_devices()
    if nvml is None:
        print(f"gpu_demo_check: NVML process list not watched: {why}", flush=True)
    seen: dict[str, dict[str, Any]] = {u: {"name": name, "pids": {}} for u, name, _ in devices}
    job: dict[int, int | None] = {}
    errors: set[str] = set()
    proc = subprocess.Popen(cmd)
    job[proc.pid] = None  # the launcher: a CUDA context of its own would be a stray one
    polls = 0
    while True:
        done = proc.poll() is not None
        job_ranks(proc.pid, job)
        for uuid, _, h in devices:
            try:
                running = nvml.nvmlDeviceGetComputeRunningProcesses(h)
            except Exception as e:
                errors.add(f"{uuid}: {e}")
                continue
            pids = seen[uuid]["pids"]
            for p in running:
                used = int(getattr(p, "usedGpuMemory", 0) or 0)
                pids[str(p.pid)] = max(pids.get(str(p.pid), 0), used)
        polls += 1
        if done:
            break
        time.sleep(interval_s)
    if nvml is not None:
        with contextlib.suppress(Exception):
            nvml.nvmlShutdown()
    record = {
        "nvml": nvml is not None,
        "why": why,
        "errors": sorted(errors),
        "polls": polls,
        "interval_s": interval_s,
        "command": cmd,
        "returncode": proc.returncode,
        "launcher_pid": proc.pid,
        "job": {str(pid): rank for pid, rank in job.items()},
        "devices": seen,
    }
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text(json.dumps(record, indent=1) + "\n")
    return proc.returncode


# ------------------------------------------------------------------ check mode


class Checks:
    """Check lines: PASS, FAIL or INFO (does not count)."""

    def __init__(self) -> None:
        self.failed = 0

    def add(self, ok: bool | None, what: str, detail: str = "") -> None:
        tag = "INFO" if ok is None else "PASS" if ok else "FAIL"
        self.failed += ok is False
        print(f"{tag:<4}  {what}" + (f": {detail}" if detail else ""), flush=True)


def final_sync_expected(res: Any) -> np.ndarray | None:
    """Bytes each rank sends in a Snake run's final sync by ``snake_mpi.analysis.analytic``
    (``expected.expected_final_sync_bytes``); None for other runs."""
    from snake_mpi.analysis.expected import expected_final_sync_bytes, run_config

    if run_config(res).scheme != "snake" or "final_sync/bytes_sent" not in res.arrays:
        return None
    return expected_final_sync_bytes(res)


def check_bytes(res: Any, c: Checks) -> None:
    from snake_mpi.analysis.expected import expected_bytes

    sent, received = expected_bytes(res)
    for name, want in (("bytes_sent", sent), ("bytes_received", received)):
        have = res.rounds[name]
        ok = bool(np.array_equal(have, want))
        detail = f"{int(have.sum()):,} bytes in all" if ok else f"measured {have}, analytic {want}"
        c.add(ok, f"{name} per round and rank = analytic count", detail)
    sync = final_sync_expected(res)
    if sync is not None:
        have = res.arrays["final_sync/bytes_sent"]
        ok = bool(np.array_equal(have, sync))
        c.add(ok, "final sync bytes = analytic count", f"measured {have}, analytic {sync}")


def foreign_namespace(log_path: Path) -> bool:
    """Whether NVML listed compute processes during the run but none of them is a process of
    the job (a container's PID namespace: NVML reports host PIDs)."""
    try:
        log = json.loads(log_path.read_text())
        job = {int(pid) for pid in log["job"]}
        listed = {int(p) for dev in log["devices"].values() for p in dev["pids"]}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return bool(listed) and not (listed & job)


def check_gpu_fields(res: Any, c: Checks, allow_nan: set[str]) -> None:
    for key in GPU_ROUND_FIELDS:
        arr = res.rounds.get(key)
        if arr is None:
            c.add(key in allow_nan, f"/rounds/{key}", "missing (the run did not record it)")
            continue
        bad = ~np.isfinite(arr)
        if not bad.any():
            hi = float(arr.max())
            unit = f"{hi / 2**30:.2f} GiB" if key.endswith("_bytes") else f"{hi:.6g}"
            c.add(True, f"/rounds/{key} finite on every rank", f"max {unit}")
            continue
        ranks = sorted({int(k) for k in np.nonzero(bad)[1]})
        rounds = sorted({int(r) for r in np.nonzero(bad)[0]})
        ok = key in allow_nan
        c.add(
            ok,
            f"/rounds/{key} finite on every rank",
            f"NaN on ranks {ranks} (rounds {rounds[:8]}{' ...' if len(rounds) > 8 else ''})"
            + (" (allowed)" if ok else ""),
        )


def check_contexts(res: Any, log_path: Path | None, c: Checks) -> None:
    """No process of the job on a GPU other than its rank's own; no non-rank process of the job
    with a CUDA context; where PIDs cannot be matched, no more processes per GPU than ranks."""
    what = "no stray CUDA contexts (NVML compute processes)"
    if log_path is None:
        c.add(None, what, "not checked (no --nvml-log: run the job through --watch)")
        return
    if not log_path.is_file():
        c.add(False, what, f"no NVML log at {log_path}")
        return
    log = json.loads(log_path.read_text())
    if not log.get("nvml"):
        c.add(False, what, f"not watched: {log.get('why', '?')}")
        return
    ranks = res.tables["ranks"]
    own = {k: norm_uuid(u) for k, u in enumerate(ranks.get("gpu_uuid", [])) if str(u)}
    placed: dict[str, int] = {}
    for u in own.values():
        placed[u] = placed.get(u, 0) + 1
    job = {int(pid): rank for pid, rank in log["job"].items()}
    on_gpu: dict[int, set[str]] = {}
    foreign: dict[str, set[int]] = {}
    for uuid, dev in log["devices"].items():
        for pid in map(int, dev["pids"]):
            if pid in job:
                on_gpu.setdefault(pid, set()).add(norm_uuid(uuid))
            else:
                foreign.setdefault(norm_uuid(uuid), set()).add(pid)
    names = {norm_uuid(u): d["name"] for u, d in log["devices"].items()}
    print(
        f"      NVML: {len(names)} GPU(s), {log['polls']} polls; job processes on GPUs: "
        f"{len(on_gpu)}; other processes: "
        + (", ".join(f"{sorted(p)} on {u[:8]}" for u, p in foreign.items()) or "none")
    )
    if on_gpu:
        problems = []
        for pid, uuids in sorted(on_gpu.items()):
            rank = job[pid]
            if rank is None:
                problems.append(f"pid {pid} (not a rank) holds a context on {sorted(uuids)}")
            elif rank not in own:
                problems.append(f"rank {rank} (pid {pid}) is on {sorted(uuids)}, a CPU rank")
            elif uuids != {own[rank]}:
                problems.append(f"rank {rank} (pid {pid}) on {sorted(uuids)}, its GPU {own[rank]}")
        seen_ranks = sorted(job[p] for p in on_gpu if job[p] is not None)
        detail = "; ".join(problems) or f"ranks {seen_ranks} each on their own GPU only"
        c.add(not problems, what, detail)
        return
    counts = {u: len(p) for u, p in foreign.items()}
    if not counts:
        c.add(False, what, "NVML listed no compute process on any GPU during the run")
        return
    over = {u: n for u, n in counts.items() if n > placed.get(u, 0)}
    detail = "NVML's PIDs are not this PID namespace's (container): counted per GPU: " + ", ".join(
        f"{u[:8]}: {n} process(es), {placed.get(u, 0)} rank(s)" for u, n in counts.items()
    )
    c.add(not over, what, detail)


def check(path: Path, log: Path | None, min_accuracy: float, allow_nan: set[str]) -> int:
    from snake_mpi.store import ResultError, read_result

    c = Checks()
    try:
        res = read_result(path)
    except ResultError as e:
        c.add(False, "result file readable and complete", str(e))
        return 1
    c.add(res.status == "complete", "status complete", res.status)
    device = str(res.attrs.get("device", ""))
    c.add("cuda" in device, "ran on CUDA (root attribute device)", device or "(not recorded)")
    ranks = res.tables["ranks"]
    for k in range(res.world_size):
        cells = [
            f"{col} {ranks[col][k]}"
            for col in ("device", "gpu_name", "gpu_uuid", "gpu_shared")
            if col in ranks
        ]
        c.add(None, f"rank {k}", ", ".join(cells) or "no device columns")
    check_bytes(res, c)
    acc = res.evaluation.get("accuracy", np.zeros(0))
    final = float(acc[-1]) if acc.size else math.nan
    best = float(np.max(acc)) if acc.size else math.nan
    c.add(
        bool(final >= min_accuracy),
        f"final accuracy >= {min_accuracy}",
        f"{final:.4f} after {res.n_rounds} rounds (best {best:.4f})",
    )
    if log is not None and foreign_namespace(log):  # NVML cannot name our processes here
        allow_nan = allow_nan | {"gpu_nvml_process_bytes"}
        c.add(None, "PID namespace", "NVML lists no PID of the job: process memory unavailable")
    check_gpu_fields(res, c, allow_nan)
    check_contexts(res, log, c)
    print(f"{'FAILED' if c.failed else 'PASSED'}: {c.failed} check(s) failed ({path})")
    return 1 if c.failed else 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, cmd = argv[:cut], argv[cut + 1 :]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("result", nargs="?", type=Path, help="result file to check")
    ap.add_argument("--watch", type=Path, metavar="LOG.json", help="run the command after --")
    ap.add_argument("--interval-s", type=float, default=0.2)
    ap.add_argument("--nvml-log", type=Path, help="a --watch log of the run, for the context check")
    ap.add_argument("--min-accuracy", type=float, default=0.6)
    ap.add_argument(
        "--allow-nan",
        action="append",
        default=[],
        metavar="FIELD",
        help="a /rounds GPU field that may be NaN (unavailable on this machine)",
    )
    args = ap.parse_args(argv)
    if args.watch:
        if not cmd:
            ap.error("--watch needs a command after --")
        return watch(args.watch, cmd, args.interval_s)
    if args.result is None or cmd:
        ap.error("give a result file to check, or --watch LOG.json -- COMMAND")
    return check(args.result, args.nvml_log, args.min_accuracy, set(args.allow_nan))


if __name__ == "__main__":
    sys.exit(main())
