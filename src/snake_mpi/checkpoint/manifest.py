"""The checkpoint directory: one ``round-NNNNNN`` folder per checkpoint, each rank's file in
it, and ``manifest.json`` written last by rank 0 (the commit point: a folder without one, or
whose files disagree with it, is not a checkpoint). Also the config comparison a resume makes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import shutil
import tomllib
from pathlib import Path
from typing import Any

from snake_mpi.checkpoint import tensorfile
from snake_mpi.config import ConfigError, RunConfig, stored_config

FORMAT = 1
MANIFEST = "manifest.json"
_ROUND_DIR = re.compile(r"^round-(\d{6,})$")
MAY_DIFFER = (
    "debug",
    "comm.deadline_s",
    "comm.hop_plans",
    "comm.pipelined_min_bytes",
    "probes",
    "torch_threads",
    "checkpoint",
)
"""Config keys a resumed run may change (everything else must equal the checkpoint's)."""


def checkpoint_dir(cfg: RunConfig, out_path: Path) -> Path:
    """Where this run's checkpoints live: ``checkpoint.dir``, else ``OUT.ckpt``."""
    return Path(cfg.checkpoint.dir) if cfg.checkpoint.dir else Path(f"{out_path}.ckpt")


def round_dir(directory: Path, rounds_done: int) -> Path:
    """The folder of the checkpoint taken after ``rounds_done`` rounds."""
    return directory / f"round-{rounds_done:06d}"


def rank_file(rank: int) -> str:
    """A rank's file name inside a checkpoint folder."""
    return f"rank-{rank:05d}.safetensors"


def round_dirs(directory: Path) -> list[tuple[int, Path]]:
    """``(rounds_done, folder)`` of every checkpoint folder, committed or not, newest first."""
    if not directory.is_dir():
        return []
    found = []
    for p in directory.iterdir():
        m = _ROUND_DIR.match(p.name)
        if m and p.is_dir():
            found.append((int(m.group(1)), p))
    return sorted(found, reverse=True)


def committed(directory: Path) -> list[tuple[int, Path]]:
    """Checkpoint folders with a manifest, newest first."""
    return [(k, p) for k, p in round_dirs(directory) if (p / MANIFEST).is_file()]


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` durably (temporary name, fsync, rename, fsync of the folder)."""
    tmp = folder / (MANIFEST + ".tmp")
    with open(tmp, "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / MANIFEST)
    tensorfile.fsync_dir(folder)


def read_manifest(folder: Path) -> dict[str, Any]:
    """A checkpoint's manifest, checked in full; ``ValueError`` saying why it cannot be used:
    unreadable, not a manifest, a field missing or of the wrong type, ``rounds_done`` not the
    round its folder is named for, or ``files`` not exactly one entry per rank naming that
    rank's file of this folder (``rank_file``)."""
    where = folder / MANIFEST
    try:
        m = json.loads(where.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{where} cannot be read ({e})") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise ValueError(f"{where} is not a snake-mpi checkpoint manifest")
    for key in ("rounds_done", "world_size", "config_toml", "files"):
        if key not in m:
            raise ValueError(f"{where} lacks {key!r}")
    rounds, world = m["rounds_done"], m["world_size"]
    for key, value in (("rounds_done", rounds), ("world_size", world)):
        if not _is_int(value) or value < 1:
            raise ValueError(f"{where}: {key} = {value!r} is not a positive integer")
    named = _ROUND_DIR.match(folder.name)
    if named and int(named.group(1)) != rounds:
        raise ValueError(
            f"{where} says rounds_done = {rounds}, but its folder is the checkpoint after round "
            f"{int(named.group(1))}: the manifest is not this folder's"
        )
    if not isinstance(m["config_toml"], str):
        raise ValueError(f"{where}: config_toml is not a string")
    _check_files(m["files"], world, where)
    attempts = m.get("attempts", [])
    if not isinstance(attempts, list) or not all(isinstance(a, dict) for a in attempts):
        raise ValueError(f"{where}: attempts is not a list of records")
    return m


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_files(files: Any, world_size: int, where: Path) -> None:
    """``files``: one entry per rank 0..world_size-1, each ``{"rank", "name" (that rank's
    ``rank_file``), "bytes", "sha256"}``; a name may not point anywhere else (``../x``, an
    absolute path), since the file that is checked must be the file that is read."""
    if not isinstance(files, list) or not all(isinstance(e, dict) for e in files):
        raise ValueError(f"{where}: files is not a list of entries")
    ranks = []
    for i, e in enumerate(files):
        rank = e.get("rank")
        if not _is_int(rank) or not 0 <= rank < world_size:
            raise ValueError(
                f"{where}: files[{i}] has rank {rank!r}, not one of 0..{world_size - 1}"
            )
        if e.get("name") != rank_file(rank):
            raise ValueError(
                f"{where}: files[{i}] names {e.get('name')!r}; rank {rank}'s file is "
                f"{rank_file(rank)!r} in the checkpoint's own folder"
            )
        if not _is_int(e.get("bytes")) or e["bytes"] < 0:
            raise ValueError(f"{where}: files[{i}] bytes = {e.get('bytes')!r} is not a size")
        sha = e.get("sha256")
        if not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            raise ValueError(f"{where}: files[{i}] sha256 = {sha!r} is not a SHA-256 digest")
        if not isinstance(e.get("write_s", 0.0), int | float):
            raise ValueError(f"{where}: files[{i}] write_s is not a number")
        ranks.append(rank)
    if sorted(ranks) != list(range(world_size)):
        raise ValueError(
            f"{where}: files list ranks {sorted(ranks)}, not each of 0..{world_size - 1} once"
        )


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest ``keep`` committed checkpoints, and every uncommitted folder
    older than the newest committed one (left by a run killed while writing). Returns what
    was deleted."""
    done = committed(directory)
    if not done:
        return []
    kept = {p for _, p in done[:keep]}
    newest = done[0][0]
    gone = []
    for k, p in round_dirs(directory):
        if p in kept or (k > newest and not (p / MANIFEST).is_file()):
            continue
        shutil.rmtree(p, ignore_errors=True)
        gone.append(p)
    return gone


def clear(directory: Path) -> None:
    """Delete every checkpoint folder (a fresh run, or a completed one); the directory too
    when nothing else is left in it."""
    for _, p in round_dirs(directory):
        shutil.rmtree(p, ignore_errors=True)
    with contextlib.suppress(OSError):
        directory.rmdir()


def remove_newer(directory: Path, rounds_done: int) -> list[Path]:
    """Delete the committed checkpoints newer than the one a run resumes from: they were
    skipped as unusable, and the resumed run writes its own folders of those rounds."""
    gone = []
    for k, p in committed(directory):
        if k > rounds_done:
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Delete ``*.tmp`` files (writes a killed run left half done) and uncommitted folders."""
    gone = []
    for _, p in round_dirs(directory):
        if not (p / MANIFEST).is_file():
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
            continue
        for tmp in p.glob("*.tmp"):
            tmp.unlink(missing_ok=True)
            gone.append(tmp)
    return gone


def config_difference(old: Any, new: Any, prefix: str = "") -> str | None:
    """The first key (in declaration order) where ``new`` differs from ``old``, as a phrase,
    ignoring the keys of ``MAY_DIFFER``; None when they agree."""
    for f in dataclasses.fields(old):
        key = f"{prefix}{f.name}"
        if key in MAY_DIFFER:
            continue
        a, b = getattr(old, f.name), getattr(new, f.name)
        if dataclasses.is_dataclass(a) and not isinstance(a, type):
            found = config_difference(a, b, f"{key}.")
            if found:
                return found
        elif a != b:
            return f"{key} = {_show(a)} in the checkpoint, {_show(b)} now"
    return None


def _show(v: Any) -> str:
    return json.dumps(list(v) if isinstance(v, tuple) else v)


def check_same_run(manifest: dict[str, Any], folder: Path, cfg: RunConfig, world_size: int) -> None:
    """``ConfigError`` naming the first difference when ``cfg`` on ``world_size`` ranks is not
    the run the checkpoint was taken from (only ``MAY_DIFFER`` keys may change)."""
    if int(manifest["world_size"]) != world_size:
        raise ConfigError(
            f"the checkpoint {folder} was taken on {manifest['world_size']} ranks, this run has "
            f"{world_size}; resume on the same number of ranks, or run without --resume"
        )
    try:
        old = stored_config(manifest["config_toml"])
    except (ConfigError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(
            f"the checkpoint {folder} holds a config this version rejects: {e}"
        ) from None
    diff = config_difference(old, cfg)
    if diff:
        raise ConfigError(
            f"the checkpoint {folder} is of another run: {diff} (only debug.*, "
            "comm.deadline_s, probes.*, torch_threads and checkpoint.* may change on resume); "
            "run without --resume to start again"
        )


def check_rank_file(manifest: dict[str, Any], folder: Path, rank: int) -> str | None:
    """Why this rank's file of a checkpoint cannot be used (missing, size or checksum not the
    manifest's), or None when it matches."""
    entries = [e for e in manifest["files"] if e["rank"] == rank]
    if len(entries) != 1:
        return f"{folder / MANIFEST} lists no file for rank {rank}"
    e = entries[0]
    path = folder / rank_file(rank)  # the file that is read (``read_manifest`` checked the name)
    try:
        size = path.stat().st_size
    except OSError:
        return f"{path} is missing"
    if size != int(e["bytes"]):
        return f"{path} has {size} bytes, the manifest says {e['bytes']}"
    if tensorfile.sha256_of(path) != e["sha256"]:
        return f"{path}: SHA-256 differs from the manifest's (the file is damaged)"
    return None
