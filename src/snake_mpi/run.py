"""One run on this rank: validate, build data/model/probes/recorder, run the scheme, write results.

Order matters for clean failure: the config is validated on every rank *before* any message
(identical answer everywhere -> exit 2 on all ranks, no file); from then on any exception or
non-zero exit on any rank aborts the whole job, and the result file only gets its final name
once rank 0 has written everything.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from snake_mpi import numerics, provenance, schema
from snake_mpi.blocks import block_table, flat_storage, model_bytes_held, model_hash
from snake_mpi.config import EXIT_CONFIG, ConfigError, RunConfig, check_output, parse_edge, to_toml
from snake_mpi.context import Context, FinalSync, NodeData, SchemeReport
from snake_mpi.data import load_dataset
from snake_mpi.data.augment import crop_flip
from snake_mpi.data.partition import (
    label_histogram,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from snake_mpi.models import build_model
from snake_mpi.probes import RoundProbe
from snake_mpi.probes.memory import MemorySampler, ru_maxrss_bytes, set_mmap_threshold
from snake_mpi.probes.storage import DiskWriteCounter
from snake_mpi.record import ROUND_FIELDS, Recorder, eval_layout
from snake_mpi.resources import check_memory
from snake_mpi.schemes import scheme_spec
from snake_mpi.schemes.rules import data_ranks, validate_for_world
from snake_mpi.schemes.snake import int8_build_layers
from snake_mpi.train import preload_optimizer
from snake_mpi.transport.protocol import Communicator
from snake_mpi.transport.wire import LinkModel

if TYPE_CHECKING:
    from snake_mpi.blocks import BlockModel
    from snake_mpi.checkpoint import Checkpointer
    from snake_mpi.device import Placement
    from snake_mpi.outlock import OutputLock
    from snake_mpi.probes.gpu import GpuProbe
    from snake_mpi.store import ResultWriter


def seeds_for(root_seed: int, world_size: int) -> tuple[dict[str, int], list[int]]:
    """Shared seeds (data, partition, model) and one independent stream per rank.

    Per-rank streams come from ``SeedSequence(root).spawn(N)``, never ``seed + rank``.
    """
    shared, per_rank = np.random.SeedSequence(root_seed).spawn(2)
    data_seed, partition_seed, model_seed, sampling_seed = (
        int(s) for s in shared.generate_state(4)
    )
    rank_seeds = [int(s.generate_state(1)[0]) for s in per_rank.spawn(world_size)]
    named = {
        "root": root_seed,
        "data": data_seed,
        "partition": partition_seed,
        "model": model_seed,
        "sampling": sampling_seed,
    }
    return named, rank_seeds


def torch_threads(cfg: RunConfig, comm: Communicator) -> int:
    """Threads per rank: as configured, else Slurm's ``--cpus-per-task``, else the host's cores
    shared among the ranks on it."""
    if cfg.torch_threads > 0:
        return cfg.torch_threads
    slurm = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if slurm.isdigit() and int(slurm) > 0:
        return int(slurm)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // comm.ranks_on_host())


def build_shards(
    cfg: RunConfig, seeds: dict[str, int], world_size: int, dataset: Any = None
) -> tuple[Any, list[np.ndarray]]:
    """The dataset (loaded unless given) and every rank's training indices (identical on every
    rank); a server or controller rank gets an empty shard."""
    d = cfg.data
    if dataset is None:
        dataset = load_dataset(d, seeds["data"], checkpoint=cfg.model.checkpoint)
    rng = np.random.default_rng(seeds["partition"])
    holders = data_ranks(cfg, world_size)
    if d.partition == "iid":
        shards = partition_iid(d.n_train, len(holders), rng)
    elif d.partition == "dirichlet":
        shards = partition_dirichlet(dataset.y_train.numpy(), len(holders), d.alpha, rng)
    else:
        shards = partition_shards(dataset.y_train.numpy(), len(holders), d.shards_per_node, rng)
    parts = [np.zeros(0, dtype=np.int64) for _ in range(world_size)]
    for rank, shard in zip(holders, shards, strict=True):
        parts[rank] = shard
    return dataset, parts


def link_model(cfg: RunConfig) -> LinkModel:
    """The emulated links of ``[emulate]``."""
    e = cfg.emulate
    return LinkModel(
        bandwidth_bps=e.bandwidth_bps,
        latency_s=e.latency_s,
        edges=tuple(parse_edge(x) for x in e.edges),
        limit_s=cfg.comm.deadline_s,
    )


def result_attrs(cfg: RunConfig) -> dict[str, str]:
    """Root attributes that tell runs apart: scheme, model, dataset (+ the scheme's own,
    ``SchemeSpec.result_attrs``: Snake's options)."""
    model: str = cfg.model.family
    if model == "lm":
        model = cfg.model.preset or f"checkpoint:{Path(cfg.model.checkpoint).name}"
    attrs = {"scheme": cfg.scheme, "model": model, "dataset": cfg.data.name}
    extra = scheme_spec(cfg.scheme).result_attrs
    return attrs | (extra(cfg) if extra else {})


def main(
    cfg: RunConfig,
    out: str,
    *,
    overwrite: bool,
    resume: bool = False,
    max_memory: int | None = None,
) -> int:
    """Entry point of ``snake-mpi run`` on every rank; returns the exit status.

    The device is chosen (from the launcher's local rank) and made current before mpi4py
    initialises MPI. Start-up checks (device and transfer path, world size, output, data read
    and checked in full, and on rank 0 the output lock) run on every rank before any training
    message; the ranks then agree, so a problem on any one rank ends every rank with exit 2
    and one message.

    ``max_memory``: bytes the ranks of one host may use together (``--max-memory``); by
    default what the host has available (``resources.check_memory``).

    ``resume``: continue after the newest usable checkpoint (``checkpoint.find_resume``), or
    start from round 0 when there is none; a result that is complete already ends every rank
    with 0 at once. A checkpoint taken on SIGUSR1 ends every rank with ``EXIT_CHECKPOINTED``.
    """
    from snake_mpi.device import DeviceError, local_rank_from_env
    from snake_mpi.store import is_complete

    error, placement = "", None
    try:
        placement = place_before_mpi(cfg)
    except DeviceError as e:
        error = str(e)
    from snake_mpi.transport.mpi import world as mpi  # initialises MPI; execute() needs no MPI

    start = Start(error=error, placement=placement, out=out, out_path=Path(out))
    start.rank, start.size = mpi.world_rank_size()
    on_host = mpi.world_ranks_on_host()  # collective: every rank, before any check can fail
    # a collective: every rank or none (a launcher sets its variable for all ranks or none)
    split = mpi.local_rank_by_split() if local_rank_from_env()[0] is None else None
    if resume and is_complete(out):  # every rank can see it (one shared file system)
        if start.rank == 0:
            print(f"snake-mpi: {out} is complete already: nothing to resume", flush=True)
        mpi.settle()
        return 0
    check_start(cfg, start, on_host, split, overwrite=overwrite or resume, max_memory=max_memory)
    if any_failed(start):
        return EXIT_CONFIG
    try:  # the checkpoints: only once every rank has passed its own checks
        checkpoints = prepare_checkpoints(
            cfg, start.out_path, start.size, start.rank, mpi.agree, resume=resume
        )
    except (ConfigError, OSError) as e:
        start.error = str(e)
    if any_failed(start):
        return EXIT_CONFIG
    return launch(cfg, start, checkpoints)


@dataclasses.dataclass(slots=True)
class Start:
    """This rank's start-up, as ``main`` checks it: the first problem found (``error``), and
    what the checks made for the run."""

    error: str
    placement: Placement | None
    out: str
    """The output as given (``--out``)."""
    out_path: Path
    """The output as checked (``config.check_output``)."""
    rank: int = 0
    size: int = 1
    route: tuple[str, str] | None = None
    dataset: Any = None
    lock: OutputLock | None = None
    """Rank 0's lock on the output, once taken."""


def check_start(
    cfg: RunConfig,
    start: Start,
    on_host: int,
    split: int | None,
    *,
    overwrite: bool,
    max_memory: int | None,
) -> None:
    """Every check a rank makes before any training message (device and transfer path, world
    size, output, memory, the data read in full, rank 0's output lock); the first problem goes
    into ``start.error``. ``on_host``: ranks on this host; ``split``: the local rank from a
    split of the world communicator, where no launcher variable names it."""
    from snake_mpi.data import DataError
    from snake_mpi.device import SPLIT_SOURCE
    from snake_mpi.outlock import LockError, OutputLock
    from snake_mpi.transport.mpi import world as mpi

    try:
        if not start.error:
            placement = start.placement
            if placement is None:  # several GPUs and no launcher variable: chosen now
                assert split is not None  # no launcher variable: the split was made
                placement = place_after_mpi(cfg, split)
            elif split is not None:  # the CPU, or the only GPU: the local rank is still news
                placement = dataclasses.replace(
                    placement, local_rank=split, local_rank_source=SPLIT_SOURCE
                )
            start.placement = placement
            start.route = transfer_route(cfg, placement, mpi.cuda_support)
        validate_for_world(cfg, start.size)
        start.out_path = check_output(start.out, overwrite=overwrite)
        check_memory(
            cfg,
            start.size,
            ranks_on_host=on_host,
            max_memory_bytes=max_memory,
            hostname=mpi.hostname(),
        )
        start.dataset = load_checked(cfg, start.size)
        if start.rank == 0:
            start.lock = OutputLock(start.out_path).acquire()
    except (ConfigError, DataError, LockError) as e:
        start.error = start.error or str(e)


def any_failed(start: Start) -> bool:
    """Whether some rank's check failed (collective): the first such rank says why, and every
    rank lets go and settles, to return ``EXIT_CONFIG``."""
    from snake_mpi.transport.mpi import world as mpi

    codes = mpi.agree(EXIT_CONFIG if start.error else 0)
    if not any(codes):
        return False
    if start.error and start.rank == codes.index(EXIT_CONFIG):
        who = "" if start.rank == 0 else f"rank {start.rank}: "
        print(f"snake-mpi: config error: {who}{start.error}", file=sys.stderr, flush=True)
    if start.lock is not None:
        start.lock.release()
    mpi.settle()
    return True


def launch(cfg: RunConfig, start: Start, checkpoints: Checkpointer) -> int:
    """Run over the world communicator once every rank passed its checks; the exit status
    (``EXIT_CHECKPOINTED`` when stopped at a checkpoint on request)."""
    from snake_mpi.checkpoint import EXIT_CHECKPOINTED, CheckpointStop
    from snake_mpi.transport.mpi import world as mpi
    from snake_mpi.transport.mpi.comm import Comm

    lock = start.lock
    if lock is not None:
        mpi.at_abort(lock.release)
        _release_on_signal(lock)
        stop_note_path(start.out_path).unlink(missing_ok=True)  # of an earlier attempt
        if lock.took_over:
            print(f"snake-mpi: took over the stale lock {lock.path} ({lock.took_over})")
    mpi.install_abort_on_error()
    try:
        execute(
            cfg,
            Comm.world(deadline_s=cfg.comm.deadline_s),
            start.out_path,
            dataset=start.dataset,
            placement=start.placement,
            route=start.route,
            checkpoints=checkpoints,
        )
    except CheckpointStop as e:
        if start.rank == 0:
            print(
                f"snake-mpi: stopped on request after round {e.rounds_done} of "
                f"{cfg.train.rounds}: checkpoint {e.folder} committed; run again with "
                f"--resume to continue (exit {EXIT_CHECKPOINTED})",
                flush=True,
            )
        mpi.settle()
        return EXIT_CHECKPOINTED
    except SystemExit as e:
        if e.code not in (0, None):
            mpi.abort_job(f"exited with status {e.code}", e.code if isinstance(e.code, int) else 1)
        raise
    finally:
        if lock is not None:
            lock.release()
    return 0


def prepare_checkpoints(
    cfg: RunConfig,
    out_path: Path,
    size: int,
    rank: int,
    agree: Any,
    *,
    resume: bool,
) -> Any:
    """This run's ``Checkpointer`` (collective): with ``resume``, the newest checkpoint every
    rank can use (``ConfigError`` if it is of another run); rank 0 clears the checkpoints of an
    earlier run that is not resumed, and removes what a killed write left half done. With
    ``checkpoint.every > 0`` SIGUSR1 asks for a checkpoint at the next round end."""
    from snake_mpi.checkpoint import Checkpointer, attempt_record, find_resume, install_stop_handler
    from snake_mpi.checkpoint import manifest as mf
    from snake_mpi.store import partial_path

    directory = mf.checkpoint_dir(cfg, out_path)
    point = None
    if resume:

        def say(text: str) -> None:
            print(f"snake-mpi: {text}", file=sys.stderr, flush=True)

        point = find_resume(
            directory, cfg, size, rank, agree, partial=partial_path(out_path), say=say
        )
    if rank == 0:
        if point is None:
            mf.clear(directory)
            if resume:
                print(f"snake-mpi: no usable checkpoint in {directory}: starting at round 1")
        else:
            for gone in mf.remove_stale_temporaries(directory):
                what = "file" if gone.suffix == ".tmp" else "folder (no manifest)"
                print(f"snake-mpi: removed the unfinished checkpoint {what} {gone}", flush=True)
            for gone in mf.remove_newer(directory, point.rounds_done):
                print(
                    f"snake-mpi: removed the unusable checkpoint {gone} (skipped above; newer "
                    f"than the one resumed from)",
                    flush=True,
                )
            print(
                f"snake-mpi: resuming from {point.folder} "
                f"({point.rounds_done} of {cfg.train.rounds} rounds done)",
                flush=True,
            )
    if cfg.checkpoint.every > 0:
        install_stop_handler()
    attempts: list[dict[str, Any]] = []
    if point is not None:  # rank 0's .partial lists every attempt, also one that died early
        table = point.rows.tables.get("attempts") if point.rows is not None else None
        attempts = attempt_rows(table) if table else list(point.manifest.get("attempts", []))
    if attempts and point is not None and point.rows is not None:
        attempts[-1]["end_round"] = max(int(attempts[-1].get("end_round", 0)), point.rows.n_rounds)
    first = point.rounds_done if point is not None else 0
    attempts.append(attempt_record(first, first) | {"attempt": len(attempts)})
    return Checkpointer(cfg=cfg, directory=directory, resume=point, attempts=attempts)


def place_before_mpi(cfg: RunConfig, environ: Any = None) -> Placement | None:
    """This rank's device from the launcher's local-rank variable, made current (before MPI
    starts, so that no CUDA context lands on another GPU); None when no variable names the
    local rank and a GPU may be used (the caller splits the communicator instead)."""
    from snake_mpi import device

    local, source = device.local_rank_from_env(environ)
    if cfg.device == "cpu":
        return device.choose(
            "cpu",
            cuda_available=False,
            n_devices=0,
            local_rank=local or 0,
            local_rank_source=source,
        )
    available, n = device.cuda_state()
    if local is None and available and n > 1:
        return None
    placement = device.choose(
        cfg.device,
        cuda_available=available,
        n_devices=n,
        local_rank=local or 0,
        local_rank_source=source,
    )
    device.activate(placement)
    return placement


def place_after_mpi(cfg: RunConfig, local_rank: int) -> Placement:
    """``place_before_mpi`` with the local rank from a split of the world communicator."""
    from snake_mpi import device
    from snake_mpi.device import SPLIT_SOURCE

    available, n = device.cuda_state()
    placement = device.choose(
        cfg.device,
        cuda_available=available,
        n_devices=n,
        local_rank=local_rank,
        local_rank_source=SPLIT_SOURCE,
    )
    device.activate(placement)
    return placement


def transfer_route(
    cfg: RunConfig, placement: Placement, query: Callable[[], tuple[bool | None, str]]
) -> tuple[str, str]:
    """``(path, reason)`` of this rank's weights (``device.choose_transfer``); ``query`` asks
    the MPI library about CUDA support, only on a GPU rank."""
    from snake_mpi.device import choose_transfer

    if placement.kind != "cuda":
        return choose_transfer(cfg.comm.gpu_transfer, placement.kind, None)
    support, how = query()
    return choose_transfer(cfg.comm.gpu_transfer, placement.kind, support, how)


@dataclasses.dataclass(slots=True)
class _Written:
    """What rank 0 has written so far, for the line a stopping signal prints."""

    writer: Any = None
    """The run's ``ResultWriter`` once it exists."""
    checkpoints: Any = None
    """The run's ``Checkpointer``."""
    rounds: int = 0


_WRITTEN = _Written()


def stop_note_path(out: Path) -> Path:
    """``OUT.stopped``: the line of the signal that stopped the run writing ``OUT`` (removed
    when a run of ``OUT`` starts or completes)."""
    return Path(f"{out}.stopped")


def kept_line(signum: int, written: _Written = _WRITTEN) -> str:
    """What a run stopped by ``signum`` leaves: the rounds its ``.partial`` holds, its newest
    checkpoint, and how to go on."""
    import signal

    from snake_mpi.checkpoint import manifest as mf

    name = signal.Signals(signum).name
    w = written.writer
    if w is None:
        return f"snake-mpi: stopped by {name} before the first round: no result was written"
    done = int(w.n_rounds)
    what = f"{w.partial} keeps {done} complete round(s) of {written.rounds}"
    ckpt = written.checkpoints
    directory = getattr(ckpt, "directory", None)
    found = mf.committed(directory) if directory is not None else []
    if found:
        k, folder = found[0]
        go_on = f"the checkpoint after round {k} is kept ({folder}); --resume continues from it"
    elif directory is not None:
        go_on = "no checkpoint was taken yet; --resume starts again at round 1"
    else:
        go_on = "checkpoints are off (checkpoint.every = 0); --resume starts again at round 1"
    # a SIGTERM may be the launcher ending the job after another rank's error: say so, or the
    # line reads as if a user had stopped a run that a peer's timeout ended
    cause = (
        " (SIGTERM comes from a user, a batch system's time limit, or the launcher ending the "
        "job after another rank failed: see that rank's line)"
        if signum == signal.SIGTERM
        else ""
    )
    return (
        f"snake-mpi: stopped by {name} in round {done + 1} of {written.rounds}: {what}; {go_on} "
        f"(SIGUSR1 instead asks for a checkpoint at the round's end){cause}"
    )


def _release_on_signal(lock: Any) -> None:
    """On SIGTERM/SIGINT/SIGHUP (the launcher ending the job after another rank failed, Slurm's
    time limit, Ctrl-C) say what was kept (``kept_line``), remove the output lock, then die of
    the signal as before: a rerun on another host then finds no lock it cannot judge. A lock
    left by SIGKILL stays; a rerun on the same host takes it over (``outlock``)."""
    import signal

    def _handler(signum: int, _frame: object) -> None:
        with contextlib.suppress(Exception):
            line = kept_line(signum)
            # Open MPI's mpirun stops relaying the ranks' output once it is signalled itself:
            # the line is also kept beside the result (``snake-mpi show`` prints it)
            stop_note_path(lock.path.with_suffix("")).write_text(line + "\n")
            print(line, file=sys.stderr, flush=True)
        lock.release()
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if signal.getsignal(sig) in (signal.SIG_DFL, signal.default_int_handler):
            signal.signal(sig, _handler)


def load_checked(cfg: RunConfig, world_size: int) -> Any:
    """The configured dataset, read and checked in full (``DataError`` before any message:
    paths, formats, label ranges, finite features, enough samples); the loaders make the
    checks of ``check_data`` themselves, so the data are read once."""
    seeds, _ = seeds_for(cfg.seed, world_size)
    return load_dataset(cfg.data, seeds["data"], checkpoint=cfg.model.checkpoint)


@dataclasses.dataclass(slots=True)
class Probes:
    """This rank's probes: memory sampler, disk counter, GPU and (one rank per host) RAPL."""

    sampler: MemorySampler
    disk: DiskWriteCounter
    gpu: GpuProbe
    every: list[RoundProbe]
    """Every probe, the sampler first (started in this order, stopped in this order)."""
    probing: bool
    """``probes.enabled``: off, no GPU or energy figures either (NaN), only identity."""

    def for_rounds(self) -> list[RoundProbe]:
        """The probes whose figures each round takes (not the GPU's when probes are off)."""
        return [p for p in self.every if self.probing or p is not self.gpu]

    def stop(self) -> None:
        """Stop every probe, the sampler first: no tick reads a stopped probe."""
        for probe in self.every:
            probe.stop()


@dataclasses.dataclass(slots=True)
class Built:
    """What the build step made on this rank, before any rank-to-rank message."""

    placement: Placement
    route: tuple[str, str]
    """``(path, reason)``: how this rank's weights travel (host, staged, direct)."""
    device: torch.device
    threads: int
    seeds: dict[str, int]
    probes: Probes
    dataset: Any
    parts: list[np.ndarray]
    """Every rank's training indices (identical on every rank)."""
    data: NodeData
    model: BlockModel
    rss: tuple[int, int]
    """This rank's RSS just before and just after the model was built."""
    generator: torch.Generator


@dataclasses.dataclass(slots=True)
class Gathered:
    """What rank 0 gathered of every rank at the start (None on the other ranks)."""

    settings: numerics.NumericSettings
    """This rank's numeric settings (rank 0's go into the provenance)."""
    hosts: list[str] | None
    places: dict[str, np.ndarray] | None
    """The ``/ranks`` columns of where each rank ran and its numeric settings."""


@dataclasses.dataclass(slots=True)
class Finish:
    """What writing the result needs once the scheme has run (``_finish``)."""

    ctx: Context
    built: Built
    gathered: Gathered
    writer: ResultWriter | None


def execute(
    cfg: RunConfig,
    comm: Communicator,
    out_path: Path,
    *,
    dataset: Any = None,
    placement: Placement | None = None,
    route: tuple[str, str] | None = None,
    checkpoints: Checkpointer | None = None,
) -> Context:
    """The run on this rank over ``comm`` (``mpi.comm.Comm``, or an in-process ``LocalComm``):
    build, run the scheme, write.

    Rank 0 writes ``out_path``; returns the scheme's context (model, recorder, report).
    ``dataset``: the configured dataset if already loaded (``load_checked``); ``placement``
    and ``route``: this rank's device and transfer path (default: the CPU, host path);
    ``checkpoints``: this run's ``checkpoint.Checkpointer`` (default: none taken).
    """
    from snake_mpi.checkpoint import Checkpointer
    from snake_mpi.device import PATH_HOST, Placement

    placement = placement or Placement("cpu", local_rank=comm.rank)
    route = route or (PATH_HOST, "CPU rank: weights travel from host memory")
    checkpoints = checkpoints or Checkpointer()
    built = build(cfg, comm, placement, route, dataset)
    gathered = gather_start(comm, built)
    writer = open_result(cfg, comm, out_path, built, gathered, checkpoints)
    ctx = scheme_context(cfg, comm, built, writer, checkpoints)
    run_scheme(ctx, writer, built.probes)
    _finish(Finish(ctx, built, gathered, writer))
    if writer is not None and checkpoints.directory is not None:
        from snake_mpi.checkpoint import manifest as mf

        mf.clear(checkpoints.directory)  # the result is complete: they are of no more use
    return ctx


def build(
    cfg: RunConfig,
    comm: Communicator,
    placement: Placement,
    route: tuple[str, str],
    dataset: Any,
) -> Built:
    """This rank's device, links, threads, probes (started), data shard and model."""
    from snake_mpi.device import activate

    device = activate(placement)
    link = link_model(cfg)
    comm.link = link if link.active else None
    threads = torch_threads(cfg, comm)
    torch.set_num_threads(threads)
    seeds, rank_seeds = seeds_for(cfg.seed, comm.size)
    probes = start_probes(cfg, placement)
    dataset, parts = build_shards(cfg, seeds, comm.size, dataset)
    idx = torch.from_numpy(parts[comm.rank])
    data = NodeData(
        x_train=dataset.x_train[idx].contiguous(),
        y_train=dataset.y_train[idx].contiguous(),
        x_test=dataset.x_test,
        y_test=dataset.y_test,
        augment=crop_flip if cfg.data.augment else None,
    )
    if cfg.model.family == "lm":
        from snake_mpi.models.lm import preload

        preload()  # the libraries count as baseline memory, not as the model
    preload_optimizer(cfg.train)  # a library too; its compiled step is not
    set_mmap_threshold(cfg.train.mmap_threshold_bytes)
    rss_before_model = probes.sampler.sample_now()
    model = build_model(
        cfg.model,
        sample_shape=tuple(cfg.data.sample_shape),
        n_classes=dataset.n_classes,
        seed=seeds["model"],
        int8_layers=int8_build_layers(cfg, comm.size, comm.rank),
    ).to(device)
    if cfg.comm.hop_buffers == "views":  # each block's state in one buffer that hops send
        flat_storage(model)
    rss_model_built = probes.sampler.sample_now()
    generator = torch.Generator().manual_seed(rank_seeds[comm.rank])
    return Built(
        placement=placement,
        route=route,
        device=device,
        threads=threads,
        seeds=seeds,
        probes=probes,
        dataset=dataset,
        parts=parts,
        data=data,
        model=model,
        rss=(rss_before_model, rss_model_built),
        generator=generator,
    )


def start_probes(cfg: RunConfig, placement: Placement) -> Probes:
    """This rank's probes, started: memory sampler (ticking the GPU and RAPL), disk, GPU, and
    RAPL on the host's local rank 0."""
    from snake_mpi.probes.gpu import GpuProbe
    from snake_mpi.probes.rapl import RaplCounter

    probing = cfg.probes.enabled
    gpu = GpuProbe(placement.index if placement.kind == "cuda" else None)
    rapl = RaplCounter() if placement.local_rank == 0 and probing else None  # one per host
    ticking = [p for p in (rapl, gpu) if p is not None and p.available()]

    def tick() -> dict[str, float]:  # each sampler tick: RAPL read (no wrap lost); GPU samples
        figures: dict[str, float] = {}
        for probe in ticking:
            figures |= probe.sample()
        return figures

    sampler = MemorySampler(cfg.probes.interval_s, enabled=probing, extra=tick if ticking else None)
    disk = DiskWriteCounter()
    every: list[RoundProbe] = [p for p in (sampler, disk, gpu, rapl) if p is not None]
    for probe in every:
        probe.start()
    return Probes(sampler=sampler, disk=disk, gpu=gpu, every=every, probing=probing)


def gather_start(comm: Communicator, built: Built) -> Gathered:
    """Rank 0 gathers every rank's host, place (``RankPlace``) and numeric settings
    (collective; ``numerics.DataMismatch`` on rank 0 when the ranks hold different data)."""
    hosts = comm.gather_str(comm.hostname())
    place = RankPlace.of(built.placement, built.route[0], built.probes.gpu.identity())
    where = comm.gather_str(place.encode())
    settings = numerics.current(built.threads)
    numeric = comm.gather_str(
        json.dumps(
            dataclasses.asdict(settings) | {"data_sha256": numerics.dataset_sha256(built.dataset)}
        )
    )
    if hosts is None or where is None or numeric is None:
        return Gathered(settings=settings, hosts=None, places=None)
    places = rank_places(hosts, [RankPlace.decode(w) for w in where])
    return Gathered(settings=settings, hosts=hosts, places=places | numeric_columns(numeric))


def open_result(
    cfg: RunConfig,
    comm: Communicator,
    out_path: Path,
    built: Built,
    gathered: Gathered,
    checkpoints: Checkpointer,
) -> ResultWriter | None:
    """Rank 0: the result file's writer, its provenance written and the start line printed;
    None on the other ranks."""
    if gathered.hosts is None or gathered.places is None:
        return None
    from snake_mpi.store import ResultWriter

    n, places, resume = comm.size, gathered.places, checkpoints.resume
    eval_fields, eval_widths = eval_layout(n_classes_of(built.dataset))
    writer = ResultWriter(
        out_path,
        world_size=n,
        round_fields=ROUND_FIELDS,
        eval_fields=eval_fields,
        eval_widths=eval_widths,
        attrs=result_attrs(cfg) | run_device_attrs(places),
        config_toml=to_toml(cfg),
        carried_over=(resume.rows, resume.rounds_done) if resume is not None else None,
    )
    prov = provenance.collect(
        mpi_library_version=comm.library_version(),
        hosts=gathered.hosts,
        world_size=n,
        seeds=built.seeds,
    )
    prov["torch_num_threads"] = built.threads
    settings = gathered.settings  # rank 0's; every rank's in /ranks
    prov |= {"cpu_capability": settings.cpu_capability, "numeric_env": settings.numeric_env}
    prov |= built.probes.gpu.versions() | {"gpu_transfer_reason": built.route[1]}
    writer.write_provenance(prov)
    _WRITTEN.writer, _WRITTEN.checkpoints = writer, checkpoints
    _WRITTEN.rounds = cfg.train.rounds
    print(
        f"snake-mpi: {cfg.scheme} on {n} ranks, {cfg.train.rounds} rounds, writing {out_path} "
        f"({built.threads} torch thread(s) per rank; {describe_places(places)})",
        flush=True,
    )
    return writer


def n_classes_of(dataset: Any) -> int:
    """Classes whose per-class accuracy is recorded: a classifier's; 0 for a language model
    (its targets are tokens)."""
    return int(dataset.n_classes) if dataset.y_train.dim() == 1 else 0


def scheme_context(
    cfg: RunConfig,
    comm: Communicator,
    built: Built,
    writer: ResultWriter | None,
    checkpoints: Checkpointer,
) -> Context:
    """The scheme's ``Context``: a recorder, the hop buffers of this rank's path, and the state
    of the checkpoint resumed from (if any) put back."""
    from snake_mpi.device import PATH_HOST
    from snake_mpi.transport.payloads import HopBuffers

    rec = Recorder(
        comm=comm,
        model=built.model,
        # a rank that measures no GPU or energy figure records NaN there
        probes=built.probes.for_rounds(),
        writer=writer,
        debug=cfg.debug,
        n_rounds=cfg.train.rounds,
        progress=comm.rank == 0,
        perplexity=cfg.model.family == "lm",
        n_classes=n_classes_of(built.dataset),
    )
    path = built.route[0]
    hop_buffers = HopBuffers(path, built.device)
    comm.use_pipelined_copy(cfg.comm.pipelined_min_bytes, host=path == PATH_HOST)
    ctx = Context(
        cfg=cfg,
        comm=comm,
        model=built.model,
        data=built.data,
        record=rec,
        generator=built.generator,
        shard_sizes=[len(p) for p in built.parts],
        seeds=built.seeds,
        hop=hop_buffers,
        checkpoint=checkpoints,
    )
    ctx.hops.plans = cfg.comm.hop_plans
    checkpoints.restore(ctx)
    if writer is not None and checkpoints.attempts:  # at once: an attempt that dies is listed
        writer.write_table("attempts", attempt_columns(checkpoints.attempts))
    if writer is not None and checkpoints.resume is not None:
        rec.last_evaluation = _last_evaluation(writer)
    return ctx


def run_scheme(ctx: Context, writer: ResultWriter | None, probes: Probes) -> None:
    """The configured scheme's rounds; the probes stop after it, the file is marked incomplete
    if it fails."""
    try:
        scheme_spec(ctx.cfg.scheme).run_function()(ctx)
    except BaseException:
        if writer is not None:
            writer.close_incomplete()
        raise
    finally:
        probes.stop()
    ctx.hops.free()  # the hops are over: their persistent requests go


def _last_evaluation(writer: Any) -> dict[str, Any] | None:
    """The newest evaluation row a resumed result carries (for the closing line)."""
    if writer.n_evals == 0:
        return None
    ev = writer._f["eval"]
    return {name: np.asarray(ev[name][writer.n_evals - 1])[()] for name in writer.eval_fields}


def attempt_rows(table: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """``attempt_columns`` read back: one dict per attempt."""
    n = len(next(iter(table.values())))
    return [
        {k: v[i].item() if hasattr(v[i], "item") else v[i] for k, v in table.items()}
        for i in range(n)
    ]


def attempt_columns(attempts: list[dict[str, Any]]) -> dict[str, np.ndarray]:
    """The ``/attempts`` table: one row per attempt of the run (a resumed run has several)."""
    ints = ("attempt", "slurm_restart_count", "start_round", "end_round", "resumed_from_round")
    cols: dict[str, np.ndarray] = {
        k: np.array([int(a.get(k, 0)) for a in attempts], dtype=np.int64) for k in ints
    }
    jobs = [str(a.get("slurm_job_id", "")) for a in attempts]
    cols["slurm_job_id"] = np.array(jobs, dtype=object)
    cols["started_unix_s"] = np.array([float(a.get("started_unix_s", 0)) for a in attempts])
    return cols


@dataclasses.dataclass(frozen=True, slots=True)
class RankPlace:
    """Where one rank ran: its device, transfer path, GPU, local rank and CPUs."""

    device: str
    """``cpu`` or ``cuda:<index>``."""
    path: str
    """How its weights travel: ``host``, ``staged`` or ``direct``."""
    gpu_name: str
    gpu_uuid: str
    """NVML UUID ("" on a CPU rank): ranks of one host with the same UUID share the GPU."""
    local_rank: int
    local_rank_source: str
    cpu_affinity: str
    """The CPUs the rank may run on, as ranges (``0-3,8``)."""
    host_cpu_count: int

    @classmethod
    def of(cls, placement: Placement, path: str, gpu: dict[str, str]) -> RankPlace:
        """This rank's place: ``gpu`` is ``GpuProbe.identity()``."""
        return cls(
            device=placement.name,
            path=path,
            gpu_name=gpu["gpu_name"],
            gpu_uuid=gpu["gpu_uuid"],
            local_rank=placement.local_rank,
            local_rank_source=placement.local_rank_source,
            cpu_affinity=provenance.cpu_ranges(provenance.cpu_affinity()),
            host_cpu_count=os.cpu_count() or 0,
        )

    def encode(self) -> str:
        """As gathered to rank 0: a compact JSON list of the fields in order (a gathered string
        has room for 256 bytes)."""
        return json.dumps(dataclasses.astuple(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str) -> RankPlace:
        """``encode`` read back."""
        return cls(*json.loads(text))


def rank_places(hosts: list[str], places: Sequence[RankPlace]) -> dict[str, np.ndarray]:
    """The ``/ranks`` columns of where each rank ran; a GPU is shared when several ranks of one
    host have the same UUID."""
    keys = [(h, p.gpu_uuid) for h, p in zip(hosts, places, strict=True)]
    shared = [
        int(bool(p.gpu_uuid) and keys.count(k) > 1) for k, p in zip(keys, places, strict=True)
    ]
    return {
        "device": np.array([p.device for p in places], dtype=object),
        "local_rank": np.array([p.local_rank for p in places], dtype=np.int64),
        "local_rank_source": np.array([p.local_rank_source for p in places], dtype=object),
        "gpu_name": np.array([p.gpu_name for p in places], dtype=object),
        "gpu_uuid": np.array([p.gpu_uuid for p in places], dtype=object),
        "gpu_shared": np.array(shared, dtype=np.int64),
        "gpu_transfer": np.array([p.path for p in places], dtype=object),
        "cpu_affinity": np.array([p.cpu_affinity for p in places], dtype=object),
        "host_cpu_count": np.array([p.host_cpu_count for p in places], dtype=np.int64),
    }


def numeric_columns(gathered: list[str]) -> dict[str, np.ndarray]:
    """The ``/ranks`` columns of each rank's numeric settings and dataset hash, from the
    gathered JSON objects; ``numerics.DataMismatch`` when the ranks hold different data."""
    rows = [json.loads(g) for g in gathered]
    hashes = [str(r["data_sha256"]) for r in rows]
    problem = numerics.data_mismatch(hashes)
    if problem:
        raise numerics.DataMismatch(problem)
    out: dict[str, np.ndarray] = {"data_sha256": np.array(hashes, dtype=object)}
    for key in numerics.SETTING_COLUMNS:
        values = [r[key] for r in rows]
        kind = np.int64 if all(isinstance(v, int) for v in values) else object
        out[key] = np.array(values, dtype=kind)
    return out


def run_device_attrs(places: dict[str, np.ndarray]) -> dict[str, str]:
    """Root attributes: ``device`` ("cpu", "cuda", or "cpu+cuda" for a mixed job) and
    ``gpu_transfer`` (the paths weights took: "host", "staged", "direct", joined by "+")."""
    kinds = sorted({d.split(":")[0] for d in places["device"]})
    paths = sorted(set(places["gpu_transfer"]))
    return {"device": "+".join(kinds), "gpu_transfer": "+".join(paths)}


def describe_places(places: dict[str, np.ndarray]) -> str:
    """One phrase for the start-up line, e.g. "on CPU" or "4 ranks on 1 GPU(s), shared,
    weights staged"."""
    gpus = {(d, u) for d, u in zip(places["device"], places["gpu_uuid"], strict=True) if u}
    if not gpus:
        return "on CPU"
    n_gpu = sum(1 for d in places["device"] if d.startswith("cuda"))
    shared = ", shared" if places["gpu_shared"].any() else ""
    paths = "+".join(sorted(set(places["gpu_transfer"])))
    return f"{n_gpu} rank(s) on {len({u for _, u in gpus})} GPU(s){shared}, weights {paths}"


def _finish(f: Finish) -> None:
    """Gather the whole-run, per-rank figures and the series (collective); rank 0 writes them
    and completes the file."""
    figures, final_sync = _gather_run_figures(f.ctx, f.built)
    hashes = f.ctx.comm.gather_str(model_hash(f.ctx.model))
    mine = f.built.probes.sampler.series()
    series = {  # every rank gathers every series, in the schema's order
        name: f.ctx.comm.gatherv(mine.get(name, np.zeros(0)), name)
        for name in schema.names(schema.SERIES)
    }
    if f.writer is None:
        return
    assert hashes is not None and f.gathered.hosts is not None and f.gathered.places is not None
    _write_tables(f, figures, hashes)
    _write_assignment(f.writer, f.ctx.report)
    if f.ctx.report.final_sync is not None:
        for name, per_rank in final_sync.items():
            f.writer.write_array(schema.path("final_sync", name), per_rank)
    dtypes = schema.dtypes(schema.SERIES)
    for k in range(f.ctx.comm.size):
        f.writer.write_series(
            k, {name: _as(got[k], dtypes[name]) for name, got in series.items() if got is not None}
        )
    path = f.writer.complete()
    ev = f.ctx.record.last_evaluation
    acc = f", final test accuracy {ev['accuracy']:.4f}" if ev else ""
    if ev and f.ctx.cfg.model.family == "lm":
        acc = f", final test perplexity {ev['perplexity']:.3f}"
    print(f"snake-mpi: wrote {path}{acc}", flush=True)


def _as(values: np.ndarray, dtype: str) -> np.ndarray:
    """A gathered (float64) series in its schema dtype."""
    return values.astype(np.int64) if dtype == "int64" else values


def _gather_run_figures(
    ctx: Context, built: Built
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """This rank's whole-run figures (``/ranks``, all int64 counts of bytes or samples) and
    final-sync bytes (0 without one), gathered to rank 0 in one row: ``(ranks, final_sync)``
    columns by name there, empty dicts elsewhere."""
    comm, model = ctx.comm, ctx.model
    probes = built.probes
    mine = {
        "peak_rss_bytes": probes.sampler.peak_rss_bytes(),
        "ru_maxrss_bytes": ru_maxrss_bytes(),
        "rss_before_model_bytes": built.rss[0],
        "rss_model_built_bytes": built.rss[1],
        "disk_write_bytes": probes.disk.total_bytes(),
        "data_samples": len(built.parts[comm.rank]),
        "control_bytes_sent": comm.stats.control_bytes_sent,
        "transfer_buffer_bytes": ctx.hop.buffer_bytes(),
        "model_end_held_bytes": model_bytes_held(model),
    }
    for name in mine:
        schema.path("ranks", name)  # KeyError for a figure the schema does not know
    sync = dataclasses.asdict(ctx.report.final_sync or FinalSync(0, 0))
    names = [*mine, *(f"final_sync/{k}" for k in sync)]
    table = comm.gather_row(np.array([*mine.values(), *sync.values()], dtype=np.float64))
    if table is None:
        return {}, {}
    columns = {k: table[:, i].astype(np.int64) for i, k in enumerate(names)}
    ranks = {k: columns[k] for k in mine}
    return ranks, {k: columns[f"final_sync/{k}"] for k in sync}


def _write_tables(f: Finish, figures: dict[str, np.ndarray], hashes: list[str]) -> None:
    """Rank 0: the ``/attempts``, ``/blocks`` and ``/ranks`` tables (and the label histogram)."""
    writer, model, parts = f.writer, f.ctx.model, f.built.parts
    assert writer is not None and f.gathered.places is not None
    attempts = f.ctx.checkpoint.attempts
    if attempts:
        attempts[-1]["end_round"] = f.ctx.cfg.train.rounds
        writer.write_table("attempts", attempt_columns(attempts))
    blocks = block_table(model)
    blocks["owner"] = f.ctx.report.block_owners(model.n_blocks)
    writer.write_table("blocks", blocks)
    writer.write_table(
        "ranks",
        {
            "host": np.array(f.gathered.hosts, dtype=object),
            **figures,
            "model_sha256": np.array(hashes, dtype=object),
            **f.gathered.places,
        },
    )
    dataset = f.built.dataset
    if dataset.y_train.dim() == 1:  # classification (a language model's targets are tokens)
        hist = label_histogram(dataset.y_train.numpy(), parts, dataset.n_classes)
        writer.write_array("ranks/label_histogram", hist)


def _write_assignment(writer: ResultWriter, report: SchemeReport) -> None:
    """Rank 0: ``/assignment``, what the scheme reported of how it shared out the blocks."""
    if report.capabilities is not None:
        caps = np.asarray(report.capabilities, dtype=np.float64)
        writer.write_array(schema.path("assignment", "capability"), caps)
    if report.block_time_s is not None:
        times = np.asarray(report.block_time_s)
        writer.write_array(schema.path("assignment", "block_time_s"), times)
        spread = np.asarray(report.block_time_spread)
        writer.write_array(schema.path("assignment", "block_time_spread"), spread)
