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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from snake_mpi import numerics, provenance
from snake_mpi.blocks import block_table, flat_storage, model_bytes_held, model_hash
from snake_mpi.config import EXIT_CONFIG, ConfigError, RunConfig, check_output, parse_edge, to_toml
from snake_mpi.context import Context, NodeData
from snake_mpi.data import DataError, load_dataset
from snake_mpi.data.augment import crop_flip
from snake_mpi.data.partition import (
    label_histogram,
    partition_dirichlet,
    partition_iid,
    partition_shards,
)
from snake_mpi.models import build_model
from snake_mpi.probes import RoundProbe
from snake_mpi.probes.gpu import SERIES_KEYS as GPU_SERIES
from snake_mpi.probes.memory import MemorySampler, ru_maxrss_bytes
from snake_mpi.probes.storage import DiskWriteCounter
from snake_mpi.record import ROUND_FIELDS, Recorder, eval_layout
from snake_mpi.resources import check_memory
from snake_mpi.schemes import scheme_spec
from snake_mpi.schemes.rules import data_ranks, validate_for_world
from snake_mpi.transport.protocol import Communicator
from snake_mpi.transport.wire import LinkModel


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


def build_shards(cfg: RunConfig, seeds: dict[str, int], world_size: int, dataset: Any = None):
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
    """Root attributes that tell runs apart: scheme, model, dataset (+ Snake's options)."""
    model: str = cfg.model.family
    if model == "lm":
        model = cfg.model.preset or f"checkpoint:{Path(cfg.model.checkpoint).name}"
    attrs = {"scheme": cfg.scheme, "model": model, "dataset": cfg.data.name}
    if cfg.scheme == "snake":
        s = cfg.snake
        attrs |= {"mode": s.mode, "transfer": s.transfer, "ends": s.ends, "keep": s.keep}
    return attrs


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
    from snake_mpi.checkpoint import EXIT_CHECKPOINTED, CheckpointStop
    from snake_mpi.device import SPLIT_SOURCE, DeviceError, local_rank_from_env
    from snake_mpi.store import is_complete

    error, placement = "", None
    try:
        placement = place_before_mpi(cfg)
    except DeviceError as e:
        error = str(e)
    from snake_mpi.outlock import LockError, OutputLock
    from snake_mpi.transport.mpi import world as mpi  # initialises MPI; execute() needs no MPI
    from snake_mpi.transport.mpi.comm import Comm

    rank, size = mpi.world_rank_size()
    on_host = mpi.world_ranks_on_host()  # collective: every rank, before any check can fail
    # a collective: every rank or none (a launcher sets its variable for all ranks or none)
    split = mpi.local_rank_by_split() if local_rank_from_env()[0] is None else None
    dataset, lock, route = None, None, None
    if resume and is_complete(out):  # every rank can see it (one shared file system)
        if rank == 0:
            print(f"snake-mpi: {out} is complete already: nothing to resume", flush=True)
        mpi.settle()
        return 0
    try:
        if not error:
            if placement is None:  # several GPUs and no launcher variable: chosen now
                assert split is not None  # no launcher variable: the split was made
                placement = place_after_mpi(cfg, split)
            elif split is not None:  # the CPU, or the only GPU: the local rank is still news
                placement = dataclasses.replace(
                    placement, local_rank=split, local_rank_source=SPLIT_SOURCE
                )
            route = transfer_route(cfg, placement, mpi.cuda_support)
        validate_for_world(cfg, size)
        out_path = check_output(out, overwrite=overwrite or resume)
        check_memory(
            cfg, size, ranks_on_host=on_host, max_memory_bytes=max_memory, hostname=mpi.hostname()
        )
        dataset = load_checked(cfg, size)
        if rank == 0:
            lock = OutputLock(out_path).acquire()
    except (ConfigError, DataError, LockError) as e:
        error = error or str(e)

    def any_failed() -> bool:
        """Whether some rank's check failed (collective): the first such rank says why, and
        every rank lets go and settles, to return ``EXIT_CONFIG``."""
        codes = mpi.agree(EXIT_CONFIG if error else 0)
        if not any(codes):
            return False
        if error and rank == codes.index(EXIT_CONFIG):
            who = "" if rank == 0 else f"rank {rank}: "
            print(f"snake-mpi: config error: {who}{error}", file=sys.stderr, flush=True)
        if lock is not None:
            lock.release()
        mpi.settle()
        return True

    if any_failed():
        return EXIT_CONFIG
    try:  # the checkpoints: only once every rank has passed its own checks
        checkpoints = prepare_checkpoints(cfg, out_path, size, rank, mpi.agree, resume=resume)
    except (ConfigError, OSError) as e:
        error = str(e)
    if any_failed():
        return EXIT_CONFIG
    if lock is not None:
        mpi.at_abort(lock.release)
        _release_on_signal(lock)
        stop_note_path(out_path).unlink(missing_ok=True)  # of an earlier attempt
        if lock.took_over:
            print(f"snake-mpi: took over the stale lock {lock.path} ({lock.took_over})")
    mpi.install_abort_on_error()
    try:
        execute(
            cfg,
            Comm.world(deadline_s=cfg.comm.deadline_s),
            out_path,
            dataset=dataset,
            placement=placement,
            route=route,
            checkpoints=checkpoints,
        )
    except CheckpointStop as e:
        if rank == 0:
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


def place_before_mpi(cfg: RunConfig, environ: Any = None) -> Any:
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


def place_after_mpi(cfg: RunConfig, local_rank: int) -> Any:
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


def transfer_route(cfg: RunConfig, placement: Any, query: Any) -> tuple[str, str]:
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


def load_checked(cfg: RunConfig, world_size: int):
    """The configured dataset, read and checked in full (``DataError`` before any message:
    paths, formats, label ranges, finite features, enough samples); the loaders make the
    checks of ``check_data`` themselves, so the data are read once."""
    seeds, _ = seeds_for(cfg.seed, world_size)
    return load_dataset(cfg.data, seeds["data"], checkpoint=cfg.model.checkpoint)


def execute(
    cfg: RunConfig,
    comm: Communicator,
    out_path: Path,
    *,
    dataset: Any = None,
    placement: Any = None,
    route: tuple[str, str] | None = None,
    checkpoints: Any = None,
) -> Context:
    """The run on this rank over ``comm`` (``mpi.comm.Comm``, or an in-process ``LocalComm``).

    Rank 0 writes ``out_path``; returns the scheme's context (model, recorder, info).
    ``dataset``: the configured dataset if already loaded (``load_checked``); ``placement``
    and ``route``: this rank's device and transfer path (default: the CPU, host path);
    ``checkpoints``: this run's ``checkpoint.Checkpointer`` (default: none taken).
    """
    from snake_mpi.checkpoint import Checkpointer
    from snake_mpi.device import PATH_HOST, Placement, activate
    from snake_mpi.probes.gpu import GpuProbe
    from snake_mpi.probes.rapl import RaplCounter
    from snake_mpi.transport.payloads import HopBuffers

    rank, n = comm.rank, comm.size
    placement = placement or Placement("cpu", local_rank=rank)
    path, path_reason = route or (PATH_HOST, "CPU rank: weights travel from host memory")
    device = activate(placement)
    link = link_model(cfg)
    comm.link = link if link.active else None
    threads = torch_threads(cfg, comm)
    torch.set_num_threads(threads)
    seeds, rank_seeds = seeds_for(cfg.seed, n)

    probing = cfg.probes.enabled  # off: no GPU or energy figures either (NaN), only identity
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

    dataset, parts = build_shards(cfg, seeds, n, dataset)
    idx = torch.from_numpy(parts[rank])
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
    rss_before_model = sampler.sample_now()
    model = build_model(
        cfg.model,
        sample_shape=tuple(cfg.data.sample_shape),
        n_classes=dataset.n_classes,
        seed=seeds["model"],
    ).to(device)
    if cfg.comm.hop_buffers == "views":  # each block's state in one buffer that hops send
        flat_storage(model)
    rss_model_built = sampler.sample_now()
    generator = torch.Generator().manual_seed(rank_seeds[rank])

    hosts = comm.gather_str(comm.hostname())
    ident = gpu.identity()
    where = comm.gather_str(
        "|".join([placement.name, path, ident["gpu_name"], ident["gpu_uuid"]])
        + f"|{placement.local_rank}|{placement.local_rank_source}"
        + f"|{provenance.cpu_ranges(provenance.cpu_affinity())}|{os.cpu_count() or 0}"
    )
    settings = numerics.current(threads)
    numeric = comm.gather_str(
        json.dumps(dataclasses.asdict(settings) | {"data_sha256": numerics.dataset_sha256(dataset)})
    )
    checkpoints = checkpoints or Checkpointer()
    resume = checkpoints.resume
    # classification: per-class accuracy (a language model's targets are tokens)
    n_classes = dataset.n_classes if dataset.y_train.dim() == 1 else 0
    writer, places = None, None
    if rank == 0:
        assert hosts is not None and where is not None and numeric is not None  # gathered
        places = rank_places(hosts, where) | numeric_columns(numeric)
        from snake_mpi.store import ResultWriter

        eval_fields, eval_widths = eval_layout(n_classes)
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
            mpi_library_version=comm.library_version(), hosts=hosts, world_size=n, seeds=seeds
        )
        prov["torch_num_threads"] = threads
        # rank 0's; every rank's in /ranks
        prov |= {"cpu_capability": settings.cpu_capability, "numeric_env": settings.numeric_env}
        prov |= gpu.versions() | {"gpu_transfer_reason": path_reason}
        writer.write_provenance(prov)
        _WRITTEN.writer, _WRITTEN.checkpoints = writer, checkpoints
        _WRITTEN.rounds = cfg.train.rounds
        print(
            f"snake-mpi: {cfg.scheme} on {n} ranks, {cfg.train.rounds} rounds, "
            f"writing {out_path} ({threads} torch thread(s) per rank; {describe_places(places)})",
            flush=True,
        )

    rec = Recorder(
        comm=comm,
        model=model,
        # a rank that measures no GPU or energy figure records NaN there
        probes=[p for p in every if probing or p is not gpu],
        writer=writer,
        debug=cfg.debug,
        n_rounds=cfg.train.rounds,
        progress=rank == 0,
        perplexity=cfg.model.family == "lm",
        n_classes=n_classes,
    )
    hop_buffers = HopBuffers(path, device)
    comm.use_pipelined_copy(cfg.comm.pipelined_min_bytes, host=path == PATH_HOST)
    ctx = Context(
        cfg=cfg,
        comm=comm,
        model=model,
        data=data,
        record=rec,
        generator=generator,
        info={},
        shard_sizes=[len(p) for p in parts],
        seeds=seeds,
        hop=hop_buffers,
        checkpoint=checkpoints,
    )
    ctx.hops.plans = cfg.comm.hop_plans
    checkpoints.restore(ctx)
    if writer is not None and checkpoints.attempts:  # at once: an attempt that dies is listed
        writer.write_table("attempts", attempt_columns(checkpoints.attempts))
    if writer is not None and resume is not None:
        rec.last_evaluation = _last_evaluation(writer)
    try:
        scheme_spec(cfg.scheme).run_function()(ctx)
    except BaseException:
        if writer is not None:
            writer.close_incomplete()
        raise
    finally:
        for probe in every:  # the sampler first: no tick reads a stopped probe
            probe.stop()
    ctx.hops.free()  # the hops are over: their persistent requests go
    rss = (rss_before_model, rss_model_built)
    _finish(ctx, writer, sampler, disk, hosts, parts, dataset, rss, places)
    if writer is not None and checkpoints.directory is not None:
        from snake_mpi.checkpoint import manifest as mf

        mf.clear(checkpoints.directory)  # the result is complete: they are of no more use
    return ctx


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


def rank_places(hosts: list[str], where: list[str]) -> dict[str, np.ndarray]:
    """The ``/ranks`` columns of where each rank ran, from the gathered ``device|path|GPU
    name|GPU UUID|local rank|its source|CPU affinity|host CPUs`` strings; a GPU is shared when
    several ranks of one host have the same UUID."""
    rows = [w.split("|") for w in where]
    keys = [(h, r[3]) for h, r in zip(hosts, rows, strict=True)]
    shared = [int(bool(r[3]) and keys.count(k) > 1) for k, r in zip(keys, rows, strict=True)]
    return {
        "device": np.array([r[0] for r in rows], dtype=object),
        "local_rank": np.array([int(r[4]) for r in rows], dtype=np.int64),
        "local_rank_source": np.array([r[5] for r in rows], dtype=object),
        "gpu_name": np.array([r[2] for r in rows], dtype=object),
        "gpu_uuid": np.array([r[3] for r in rows], dtype=object),
        "gpu_shared": np.array(shared, dtype=np.int64),
        "gpu_transfer": np.array([r[1] for r in rows], dtype=object),
        "cpu_affinity": np.array([r[6] for r in rows], dtype=object),
        "host_cpu_count": np.array([int(r[7]) for r in rows], dtype=np.int64),
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


def _finish(ctx, writer, sampler, disk, hosts, parts, dataset, rss, places) -> None:
    """Gather the whole-run, per-rank figures and the series; rank 0 completes the file.

    ``rss``: this rank's RSS just before and just after the model was built."""
    comm, model = ctx.comm, ctx.model
    sync = ctx.info.get("final_sync", {})
    mine_run = {  # this rank's whole-run figures, by name (all int64 counts of bytes or samples)
        "peak_rss_bytes": sampler.peak_rss_bytes(),
        "ru_maxrss_bytes": ru_maxrss_bytes(),
        "rss_before_model_bytes": rss[0],
        "rss_model_built_bytes": rss[1],
        "disk_write_bytes": disk.total_bytes(),
        "data_samples": len(parts[comm.rank]),
        "control_bytes_sent": comm.stats.control_bytes_sent,
        "transfer_buffer_bytes": ctx.hop.buffer_bytes(),
        "model_end_held_bytes": model_bytes_held(model),
        "final_sync_bytes_sent": sync.get("bytes_sent", 0),
        "final_sync_bytes_received": sync.get("bytes_received", 0),
    }
    table = comm.gather_row(np.array(list(mine_run.values()), dtype=np.float64))
    per_rank = (
        {k: table[:, i].astype(np.int64) for i, k in enumerate(mine_run)}
        if table is not None
        else {}
    )
    hashes = comm.gather_str(model_hash(model))
    mine = sampler.series()
    names = ("t_s", "rss_bytes", "cpu_percent", *GPU_SERIES)  # the same on every rank
    series = {k: comm.gatherv(mine.get(k, np.zeros(0)), k) for k in names}
    if writer is None:
        return
    attempts = ctx.checkpoint.attempts
    if attempts:
        attempts[-1]["end_round"] = ctx.cfg.train.rounds
        writer.write_table("attempts", attempt_columns(attempts))
    blocks = block_table(model)
    blocks["owner"] = np.asarray(ctx.info.get("owners", np.full(model.n_blocks, -2)), np.int64)
    writer.write_table("blocks", blocks)
    writer.write_table(
        "ranks",
        {
            "host": np.array(hosts, dtype=object),
            **{k: v for k, v in per_rank.items() if not k.startswith("final_sync_")},
            "model_sha256": np.array(hashes, dtype=object),
            **places,
        },
    )
    if dataset.y_train.dim() == 1:  # classification (a language model's targets are tokens)
        hist = label_histogram(dataset.y_train.numpy(), parts, dataset.n_classes)
        writer.write_array("ranks/label_histogram", hist)
    if "capabilities" in ctx.info:
        caps = np.asarray(ctx.info["capabilities"], dtype=np.float64)
        writer.write_array("assignment/capability", caps)
    if "block_time_s" in ctx.info:
        writer.write_array("assignment/block_time_s", np.asarray(ctx.info["block_time_s"]))
        spread = np.asarray(ctx.info["block_time_spread"])
        writer.write_array("assignment/block_time_spread", spread)
    if "final_sync" in ctx.info:
        writer.write_array("final_sync/bytes_sent", per_rank["final_sync_bytes_sent"])
        writer.write_array("final_sync/bytes_received", per_rank["final_sync_bytes_received"])
    for k in range(comm.size):
        extra = {name: series[name][k] for name in GPU_SERIES}
        writer.write_series(
            k,
            {
                "t_s": series["t_s"][k],
                "rss_bytes": series["rss_bytes"][k].astype(np.int64),
                "cpu_percent": series["cpu_percent"][k],
                **extra,
            },
        )
    path = writer.complete()
    ev = ctx.record.last_evaluation
    acc = f", final test accuracy {ev['accuracy']:.4f}" if ev else ""
    if ev and ctx.cfg.model.family == "lm":
        acc = f", final test perplexity {ev['perplexity']:.3f}"
    print(f"snake-mpi: wrote {path}{acc}", flush=True)
