"""Shared test fixtures: launching real ``mpirun -n K`` jobs as subprocesses with a time bound."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import settings

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SESSION_MARK = "SNAKE_MPI_TEST_SESSION"
"""Set in this test process's environment, so every process a test starts (mpirun, its ranks,
a suite's cells, Slurm jobs) carries it, even once reparented to PID 1."""
os.environ[SESSION_MARK] = f"{os.getpid()}-{time.time_ns()}"
os.environ.setdefault("OMPI_MCA_btl", "^ofi")
"""Every MPI job the tests start (mpirun, suites, Slurm jobs) skips Open MPI's libfabric
transport: on one host it is never chosen (shared memory is), and its probe adds a second of
MPI_Init to every job here (``OMPI_MCA_btl=^ofi``; set it to something else to test another)."""
settings.register_profile("default", deadline=None, derandomize=bool(os.environ.get("CI")))
settings.register_profile("thorough", deadline=None, max_examples=2000)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))
DAEMONS = {"slurmctld", "slurmd", "slurmstepd", "munged"}
"""Services a module fixture starts on purpose and stops at the module's end."""


def session_processes() -> list[str]:
    """Live processes started by this test session (other than this one and its ancestors)."""
    import psutil

    mark = os.environ[SESSION_MARK]
    mine = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
    found = []
    for p in psutil.process_iter(["name", "cmdline", "status"]):
        if p.pid in mine or p.info["name"] in DAEMONS:
            continue
        if p.info["status"] == psutil.STATUS_ZOMBIE:
            continue
        try:
            if p.environ().get(SESSION_MARK) == mark:
                found.append(f"{p.pid} {' '.join(p.info['cmdline'] or [])[:160]}")
        except (psutil.Error, OSError):
            continue
    return found


TEST_MEMORY_BYTES = int(float(os.environ.get("SNAKE_MPI_TEST_MEMORY_GIB", "4")) * 2**30)
"""What one test may allocate on top of what the test process held when it started (its
``RLIMIT_DATA``; 4 GiB, or ``SNAKE_MPI_TEST_MEMORY_GIB``): a runaway allocation fails that
test with ``MemoryError`` instead of taking the machine. The limit counts private writable
memory (heap, arrays, tensors), not address space merely reserved (thread stacks, a browser's
pools), and processes a test starts inherit it."""


def data_bytes_in_use() -> int:
    """This process's private writable memory (``VmData``), what ``RLIMIT_DATA`` limits."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmData:"):
                return int(line.split()[1]) * 1024
    return 0


@pytest.fixture(autouse=True)
def memory_limit(request):
    """Every test runs under ``RLIMIT_DATA`` = what is in use now + ``TEST_MEMORY_BYTES``."""
    import resource

    before = resource.getrlimit(resource.RLIMIT_DATA)
    limit = data_bytes_in_use() + TEST_MEMORY_BYTES
    if before[1] != resource.RLIM_INFINITY:
        limit = min(limit, before[1])
    resource.setrlimit(resource.RLIMIT_DATA, (limit, before[1]))
    request.node.memory_limit_bytes = limit
    yield limit
    resource.setrlimit(resource.RLIMIT_DATA, before)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that ran out of its memory says so, with the limit, under its failure."""
    outcome = yield
    report = outcome.get_result()
    exc = call.excinfo
    if exc is None or not report.failed:
        return
    text = str(exc.value)
    if exc.errisinstance(MemoryError) or "can't allocate memory" in text:
        limit = getattr(item, "memory_limit_bytes", 0)
        report.sections.append(
            (
                "memory limit",
                f"this test went over its memory limit ({limit / 2**30:.2f} GiB of private "
                f"memory: what the test process held when it started + TEST_MEMORY_BYTES = "
                f"{TEST_MEMORY_BYTES / 2**30:.2f} GiB, tests/conftest.py): {text[:200]}",
            )
        )


@pytest.fixture(autouse=True)
def no_process_outlives_its_test():
    """Fail a test that leaves a process behind (an orphaned rank, a launcher, a suite cell);
    the leftovers are killed so that the next test starts clean."""
    yield
    import psutil

    deadline = time.monotonic() + 5  # a job that just ended may still be exiting
    left = session_processes()
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = session_processes()
    if left:
        for line in left:
            with contextlib.suppress(psutil.Error):
                psutil.Process(int(line.split()[0])).kill()
        pytest.fail("processes outlived the test:\n" + "\n".join(left))


@dataclass
class Job:
    returncode: int
    stdout: str
    stderr: str
    elapsed_s: float

    @property
    def output(self) -> str:
        return self.stdout + self.stderr


def _mpirun() -> str | None:
    local = BIN / "mpirun"
    return str(local) if local.exists() else shutil.which("mpirun")


def _is_open_mpi(mpirun: str) -> bool:
    out = subprocess.run([mpirun, "--version"], capture_output=True, text=True, timeout=30)
    return "Open MPI" in out.stdout + out.stderr or "OpenRTE" in out.stdout


def mpi_command(n: int, argv: list[str]) -> list[str]:
    """``mpirun -n N`` (oversubscribed where that needs saying) followed by ``argv``."""
    mpirun = _mpirun()
    if mpirun is None:
        pytest.skip("no mpirun found (install the project with `make test`)")
    cmd = [mpirun, "-n", str(n)]
    if _is_open_mpi(mpirun):
        cmd.append("--oversubscribe")
    return cmd + argv


def mpi_env() -> dict[str, str]:
    """This environment plus what an ``mpirun`` job of the tests needs (root, one thread per
    rank, the venv's binaries first, unbuffered output, the repository root importable so that
    ``python -m bench.NAME`` runs from any folder)."""
    env = dict(os.environ)
    path = env.get("PYTHONPATH")
    env.update(
        PYTHONPATH=os.pathsep.join([path, str(REPO)] if path else [str(REPO)]),
        OMPI_ALLOW_RUN_AS_ROOT="1",
        OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
        OMP_NUM_THREADS="1",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


def run_mpi(n: int, argv: list[str], *, timeout_s: float = 180, cwd: Path | None = None) -> Job:
    """Run ``argv`` on ``n`` ranks; fail the test (not hang) if it outlives ``timeout_s``."""
    return run_job(mpi_command(n, argv), timeout_s=timeout_s, cwd=cwd)


LAUNCH_FLAKE = "The PMIx server's listener thread failed to start"
"""Open MPI's launcher once failed to start with this line (exit 213 after 15 ms, before any
rank ran), in one of roughly a thousand launches of a day's test runs here: no rank ran, so
``run_job`` starts such a launch once more."""


def run_job(cmd: list[str], *, timeout_s: float = 180, cwd: Path | None = None) -> Job:
    """Run a launcher command line (``mpirun ...``, a script that starts one) with the tests'
    MPI environment; fail the test (not hang) if it outlives ``timeout_s``, ending the launcher
    and every process it started. A launch whose launcher could not start (``LAUNCH_FLAKE``) is
    made once more."""
    job = _run_once(cmd, timeout_s=timeout_s, cwd=cwd)
    if job.returncode != 0 and LAUNCH_FLAKE in job.output and job.elapsed_s < 10:
        print(f"note: the launcher did not start ({LAUNCH_FLAKE}); once more", file=sys.stderr)
        job = _run_once(cmd, timeout_s=timeout_s, cwd=cwd)
    return job


def _run_once(cmd: list[str], *, timeout_s: float, cwd: Path | None) -> Job:
    env = mpi_env()
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=cwd or REPO,
        start_new_session=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        from snake_mpi.proctree import end_job

        end_job(proc, grace_s=1.0)  # the launcher and every rank, in whatever process group
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} did not finish within {timeout_s} s:\n{out}\n{err}")
    return Job(proc.returncode, out, err, time.perf_counter() - t0)


def assert_written_ratio(ratio: str, num: str, den: str, decimals: int = 4) -> None:
    """A bench CSV's ``ratio`` cell is ``num / den``, each written to ``decimals`` decimals:
    equal within what that rounding allows (a slow transfer's few digits make it more than
    0.1 %)."""
    a, b, got = float(num), float(den), float(ratio)
    half = 0.5 * 10.0**-decimals
    rel = 1.01 * (half / a + half / b + half / got)
    assert got == pytest.approx(a / b, rel=rel), (ratio, num, den)


def bench_script(name: str) -> ModuleType:
    """``bench.NAME`` (for tests/test_architecture.py until it imports ``bench`` itself; other
    tests write ``from bench import NAME``)."""
    import importlib

    return importlib.import_module(f"bench.{name}")


def run_in_threads(cfg: Any, n: int, out: Path, deadline_s: float = 120) -> None:
    """``run.execute(cfg)`` on ``n`` thread-ranks (``LocalComm``), writing ``out``."""
    from snake_mpi.run import execute
    from snake_mpi.transport.localcomm import ThreadWorld

    ThreadWorld(n).run(lambda comm: execute(cfg, comm, out), deadline_s=deadline_s)


def run_variants(config: Path, n: int, out_dir: Path, variants: dict[str, list[str]], *sets: str):
    """The config run in threads once per variant (``--set`` overrides after ``sets``), each
    to ``out_dir/NAME.h5``; the results read back, by name."""
    from snake_mpi.config import load_config
    from snake_mpi.store import read_result

    results = {}
    for name, extra in variants.items():
        cfg = load_config(config, ["probes.enabled=false", *sets, *extra])
        run_in_threads(cfg, n, out_dir / f"{name}.h5")
        results[name] = read_result(out_dir / f"{name}.h5")
    return results


@dataclass(frozen=True)
class MpiRun:
    """A run of the session's shared MPI job (``mpi_run``, ``mpi_runs``)."""

    ranks: int
    config: str
    sets: tuple[str, ...]

    @property
    def name(self) -> str:
        import hashlib

        digest = hashlib.sha256("\0".join([self.config, *self.sets]).encode()).hexdigest()
        return f"n{self.ranks}-{Path(self.config).stem}-{digest[:12]}"


@dataclass(frozen=True)
class RunOutput:
    """What a run of the shared job left: its result and the lines rank 0 printed."""

    result: Any
    stdout: str
    path: Path


_DECLARED: dict[str, MpiRun] = {}


def mpi_run(ranks: int, config: Path | str, *sets: str) -> MpiRun:
    """Declare (when a test module is imported) a run that the session's one MPI job makes;
    ``mpi_runs(run)`` in a test gives its output. Runs that only read a result share one
    ``mpirun``: its start-up and every rank's imports are paid once (testing.md)."""
    run = MpiRun(int(ranks), str(config), tuple(sets))
    _DECLARED.setdefault(run.name, run)
    return run


@pytest.fixture(scope="session")
def mpi_runs(tmp_path_factory):
    """``get(run) -> RunOutput``. The first call makes every run declared so far, in one
    ``mpirun -n N`` job (``tests/mpi_programs/runs.py``; N: the most ranks a run needs); a run
    that failed fails the tests that read it, with the job's output. Under pytest-xdist the
    workers share the runs: the first to need them makes them, under a file lock, and the
    others read what it made."""
    import fcntl
    import json

    from snake_mpi.store import read_result

    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "mpi-runs"
    root.mkdir(exist_ok=True)

    def make(pending: list[MpiRun]) -> None:
        spec = root / f"runs-{time.time_ns()}.json"
        spec.write_text(json.dumps([
            {"name": r.name, "ranks": r.ranks, "config": r.config, "sets": list(r.sets),
             "out": str(root / f"{r.name}.h5")}
            for r in pending
        ]))  # fmt: skip
        n = max(r.ranks for r in pending)
        program = REPO / "tests" / "mpi_programs" / "runs.py"
        job = run_mpi(n, [sys.executable, str(program), str(spec)], timeout_s=900)
        for r in pending:  # what the job said, for a run that did not complete
            (root / f"{r.name}.job").write_text(f"exit {job.returncode}:\n{job.output[-6000:]}")

    def get(run: MpiRun) -> RunOutput:
        out, said = root / f"{run.name}.h5", root / f"{run.name}.job"
        if not said.exists():
            with open(root / "lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # another worker may be making them now
                pending = [r for r in _DECLARED.values() if not (root / f"{r.name}.job").exists()]
                if not said.exists() and run.name not in {r.name for r in pending}:
                    pending.append(run)
                if pending:
                    make(pending)
        if not Path(f"{out}.done").exists():
            pytest.fail(f"run {run} did not complete in the shared MPI job ({said.read_text()})")
        return RunOutput(read_result(out), Path(f"{out}.stdout").read_text(), out)

    return get


XDIST_GROUPS = {
    "system": ("test_slurm.py", "test_report_browser.py"),
}
"""Tests that must not run beside each other under pytest-xdist (``make test`` runs ``-n 2
--dist loadgroup``): those that install Debian packages (apt holds one lock) or start
machine-wide daemons (the local Slurm cluster)."""


@pytest.hookimpl(tryfirst=True)  # before pytest-xdist's, which reads the group markers
def pytest_collection_modifyitems(config, items):
    """Order and group the tests for the two pytest-xdist workers of ``make test`` (in one
    process the order changes nothing but the wall time):

    - first, one reader of the shared MPI job, so that the job starts at once;
    - then the tests that start MPI jobs of their own, and the ``XDIST_GROUPS`` modules
      whole (each group to one worker, one test after another);
    - then the tests that run in this process;
    - last, the other readers of the shared job, made by then.

    A module's tests stay together within each part (a module-scoped fixture is made once
    per part and worker that needs it)."""

    def group_of(item) -> str | None:
        module = item.nodeid.split("::")[0].rsplit("/", 1)[-1]
        return next((g for g, mods in XDIST_GROUPS.items() if module in mods), None)

    readers = [i for i in items if "mpi_runs" in i.fixturenames and group_of(i) is None]
    own_jobs = [
        i for i in items if i not in readers and (i.get_closest_marker("mpi") or group_of(i))
    ]
    rest = [i for i in items if i not in readers and i not in own_jobs]
    items[:] = readers[:1] + own_jobs + rest + readers[1:]
    for item in items:
        group = group_of(item)
        if group is not None and not item.get_closest_marker("xdist_group"):
            item.add_marker(pytest.mark.xdist_group(group))


def pytest_collection_finish(session):
    """Under pytest-xdist's ``loadgroup`` the grouped tests must carry their group in their
    node id (how xdist sends a group to one worker): a pytest/xdist pair that drops it would
    let two workers set up the Slurm cluster at once, so it stops the session instead."""
    if not (os.environ.get("PYTEST_XDIST_WORKER") and session.config.getvalue("loadgroup")):
        return
    lost = [i.nodeid for i in session.items
            if i.get_closest_marker("xdist_group") and "@" not in i.nodeid]  # fmt: skip
    if lost:
        raise pytest.UsageError(
            f"pytest-xdist did not apply the test groups ({lost[0]} has no @group; pytest "
            f"{pytest.__version__}): install pytest<9 (pyproject.toml's test extra)"
        )


def snake_mpi(*args: str) -> list[str]:
    """argv of the installed ``snake-mpi`` console script."""
    exe = BIN / "snake-mpi"
    return [str(exe) if exe.exists() else "snake-mpi", *args]


def pytest_sessionfinish(session, exitstatus):
    """At the end of the run, nothing this session started may still be running."""
    left = session_processes()
    if left:
        print("\nprocesses outlived the test session:\n" + "\n".join(left), file=sys.stderr)
        session.exitstatus = 1


def check_int8_layer(lin, x) -> None:
    """An ``Int8Linear`` of ``lin`` on input ``x``: output within 1 % of the float layer's, the
    backward pass saving no float copy of the weight, the input's gradient that of the
    dequantised weight."""
    import torch

    from snake_mpi.models.int8 import Int8Linear

    q = Int8Linear(lin)
    assert q.qdata.dtype == torch.int8 and q.qdata.device == lin.weight.device
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = q(x)
    ref = lin(x)
    rel = float((y - ref).detach().float().norm() / ref.detach().float().norm())
    assert 0 < rel < 0.01
    # the backward keeps the int8 weight, not a dequantised copy of it
    assert all(not (d.is_floating_point and n >= lin.weight.numel()) for d, n in saved), saved
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    want = torch.ones_like(y) @ q.dequantized().to(x.dtype)
    torch.testing.assert_close(gx, want)
