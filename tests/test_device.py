"""Device placement and transfer paths, checked without a GPU: the local rank from every
launcher's variables, the device choice and its error, the transfer path from a stubbed
CUDA-support query, and the staged path's buffers and byte counts (exercised on the CPU with
unpinned staging buffers: the same code as on a GPU, where the buffers are pinned)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, run_mpi, snake_mpi
from snake_mpi import device as dev
from snake_mpi import run as run_module
from snake_mpi.analysis.expected import expected_bytes
from snake_mpi.blocks import block_nbytes, model_bytes_held, model_hash
from snake_mpi.config import load_config
from snake_mpi.models import build_model
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.payloads import HopBuffers

SMALL = REPO / "tests" / "configs" / "small.toml"
TINY = REPO / "tests" / "configs" / "tiny.toml"


# ---------------------------------------------------------------- local rank


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "3"}, (3, "OMPI_COMM_WORLD_LOCAL_RANK")),
        ({"SLURM_LOCALID": "2"}, (2, "SLURM_LOCALID")),
        ({"MPI_LOCALRANKID": "1"}, (1, "MPI_LOCALRANKID")),
        ({"PMI_LOCAL_RANK": "5"}, (5, "PMI_LOCAL_RANK")),
        # Open MPI's own variable wins over Slurm's (mpirun inside an allocation)
        (
            {"SLURM_LOCALID": "0", "OMPI_COMM_WORLD_LOCAL_RANK": "1"},
            (1, "OMPI_COMM_WORLD_LOCAL_RANK"),
        ),
        ({"SLURM_LOCALID": "4", "MPI_LOCALRANKID": "0"}, (4, "SLURM_LOCALID")),
        ({"SLURM_LOCAL_ID": "3"}, (None, "")),  # the typo is not a launcher variable
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "", "PMI_LOCAL_RANK": "2"}, (2, "PMI_LOCAL_RANK")),
        ({"OMPI_COMM_WORLD_LOCAL_RANK": "-1"}, (None, "")),
        ({"SLURM_LOCALID": "x", "MPI_LOCALRANKID": " 7 "}, (7, "MPI_LOCALRANKID")),
        ({}, (None, "")),
    ],
)
def test_local_rank_comes_from_the_launchers_variables_in_order(env, expected):
    assert dev.local_rank_from_env(env) == expected


# ---------------------------------------------------------------- device choice


def test_auto_and_cpu_choose_the_cpu_without_a_gpu():
    for setting in ("auto", "cpu"):
        p = dev.choose(setting, cuda_available=False, n_devices=0, local_rank=3)
        assert (p.kind, p.name, p.local_rank) == ("cpu", "cpu", 3)
    p = dev.choose("cpu", cuda_available=True, n_devices=4, local_rank=1)
    assert p.kind == "cpu"  # an explicit cpu is honoured on a GPU node


def test_cuda_without_a_gpu_is_a_config_error_that_says_what_torch_sees():
    with pytest.raises(dev.DeviceError, match=r'device = "cuda" but torch sees no usable CUDA'):
        dev.choose("cuda", cuda_available=False, n_devices=0, local_rank=0)
    with pytest.raises(dev.DeviceError, match="0 device"):
        dev.choose("cuda", cuda_available=True, n_devices=0, local_rank=0)


@pytest.mark.parametrize(
    ("n_devices", "local_rank", "index"),
    [(1, 0, 0), (1, 5, 0), (4, 2, 2), (4, 5, 1), (2, 3, 1), (8, 7, 7)],
)
def test_gpus_by_local_rank_one_visible_device_for_all_and_round_robin(
    n_devices, local_rank, index
):
    for setting in ("auto", "cuda"):
        p = dev.choose(setting, cuda_available=True, n_devices=n_devices, local_rank=local_rank)
        assert (p.kind, p.index, p.name) == ("cuda", index, f"cuda:{index}")
        assert p.visible_devices == n_devices


def test_place_before_mpi_uses_the_launcher_variable_and_defers_only_when_it_must(monkeypatch):
    made_current = []
    monkeypatch.setattr(dev, "activate", lambda p: made_current.append(p.index))
    monkeypatch.setattr(dev, "cuda_state", lambda: (True, 2))
    cfg = load_config(TINY, ['device="auto"'])
    p = run_module.place_before_mpi(cfg, {"SLURM_LOCALID": "3"})
    assert (p.kind, p.index, p.local_rank_source) == ("cuda", 1, "SLURM_LOCALID")
    assert made_current == [1]  # set before MPI starts
    # two GPUs and no launcher variable: wait for the communicator split
    assert run_module.place_before_mpi(cfg, {}) is None
    assert run_module.place_after_mpi(cfg, 1).index == 1
    # one GPU: every rank uses it, no split needed
    monkeypatch.setattr(dev, "cuda_state", lambda: (True, 1))
    assert run_module.place_before_mpi(cfg, {}).index == 0
    # device = "cpu" never asks torch about CUDA
    monkeypatch.setattr(dev, "cuda_state", lambda: pytest.fail("CUDA queried for a CPU run"))
    cpu = run_module.place_before_mpi(load_config(TINY, ['device="cpu"']), {"PMI_LOCAL_RANK": "1"})
    assert (cpu.kind, cpu.local_rank) == ("cpu", 1)


def test_a_gpu_that_cannot_be_used_is_a_config_error_naming_it(monkeypatch):
    def refuse(index):
        raise RuntimeError("CUDA error: all CUDA-capable devices are busy or unavailable")

    monkeypatch.setattr(torch.cuda, "set_device", refuse)
    with pytest.raises(dev.DeviceError, match="cannot use cuda:1: RuntimeError: CUDA error: all"):
        dev.activate(dev.Placement("cuda", index=1))


# ---------------------------------------------------------------- transfer path


@pytest.mark.parametrize(
    ("setting", "support", "path"),
    [
        ("auto", True, "direct"),
        ("auto", False, "staged"),
        ("auto", None, "staged"),  # unknown: only confirmed support goes direct
        ("staged", True, "staged"),
        ("direct", True, "direct"),
        ("direct", None, "direct"),  # cannot be confirmed: taken at the user's word
    ],
)
def test_transfer_path_from_the_mpi_librarys_answer(setting, support, path):
    got, reason = dev.choose_transfer(setting, "cuda", support, "MPIX_Query_cuda_support")
    assert got == path
    assert f"comm.gpu_transfer = {setting}" in reason and "MPIX_Query_cuda_support" in reason


def test_direct_is_refused_where_the_library_says_it_has_no_cuda_support():
    with pytest.raises(dev.DeviceError, match="reports no CUDA support"):
        dev.choose_transfer("direct", "cuda", False, "MPIX_Query_cuda_support")


def test_a_cpu_rank_takes_the_host_path_without_asking_mpi():
    cpu = dev.Placement("cpu")
    cfg = load_config(TINY, ['comm.gpu_transfer="direct"'])
    path, _ = run_module.transfer_route(cfg, cpu, lambda: pytest.fail("queried on a CPU rank"))
    assert path == "host"
    gpu = dev.Placement("cuda", index=0)
    assert run_module.transfer_route(cfg, gpu, lambda: (None, "stub"))[0] == "direct"
    auto = load_config(TINY, [])
    assert run_module.transfer_route(auto, gpu, lambda: (True, "stub"))[0] == "direct"
    assert run_module.transfer_route(auto, gpu, lambda: (False, "stub"))[0] == "staged"


# ---------------------------------------------------------------- ranks table


def test_ranks_sharing_a_gpu_on_one_host_are_marked_shared():
    hosts = ["a", "a", "a", "b", "b"]
    place = run_module.RankPlace
    where = [
        place("cuda:0", "staged", "H100", "GPU-1", 0, "SLURM_LOCALID", "0-3", 16),
        place("cuda:0", "staged", "H100", "GPU-1", 1, "SLURM_LOCALID", "4-7", 16),
        place("cuda:1", "staged", "H100", "GPU-2", 2, "SLURM_LOCALID", "8-11", 16),
        place("cuda:0", "direct", "H100", "GPU-3", 0, "SLURM_LOCALID", "0-7", 8),
        place("cpu", "host", "", "", 1, "SLURM_LOCALID", "0-7", 8),
    ]
    assert [place.decode(p.encode()) for p in where] == where  # as gathered to rank 0
    places = run_module.rank_places(hosts, where)
    assert places["gpu_shared"].tolist() == [1, 1, 0, 0, 0]
    assert places["cpu_affinity"].tolist() == ["0-3", "4-7", "8-11", "0-7", "0-7"]
    assert places["host_cpu_count"].tolist() == [16, 16, 16, 8, 8]
    assert places["local_rank"].tolist() == [0, 1, 2, 0, 1]
    assert run_module.run_device_attrs(places) == {
        "device": "cpu+cuda",
        "gpu_transfer": "direct+host+staged",
    }
    assert "on 3 GPU(s), shared" in run_module.describe_places(places)


# ---------------------------------------------------------------- staged buffers


def _model(seed=0):
    cfg = load_config(SMALL, [])
    return build_model(
        cfg.model, sample_shape=tuple(cfg.data.sample_shape), n_classes=10, seed=seed
    )


def test_staged_pack_and_unpack_are_bit_exact_and_reuse_one_buffer_per_direction():
    src, dst = _model(1), _model(2)
    hop = HopBuffers("staged", "cpu")
    ids = [1, 2]
    payload, sizes = hop.pack(src, ids)
    assert payload.nbytes == sum(block_nbytes(src, b) for b in ids) == int(sizes.sum())
    first_ptr = payload.ctypes.data
    small, _ = hop.pack(src, [1])  # a smaller hop: the same send buffer, not a new one
    assert small.ctypes.data == first_ptr
    into = hop.receive_into(payload.nbytes)
    into[...] = payload
    hop.unpack(dst, ids, into, sizes)
    for b in ids:
        for t_src, t_dst in zip(
            src.blocks[b].parameters(), dst.blocks[b].parameters(), strict=True
        ):
            assert torch.equal(t_src, t_dst)
    assert hop.receive_into(10).ctypes.data == into.ctypes.data
    # buffers grow to the largest payload, never beyond what was asked
    assert hop.buffer_bytes() == 2 * payload.nbytes <= 2 * model_bytes_held(src)


def test_host_path_allocates_per_transfer_and_direct_needs_cuda():
    hop = HopBuffers("host", "cpu")
    assert hop.alloc is None and hop.receive_into(8) is None
    with pytest.raises(ValueError, match="needs a CUDA device"):
        HopBuffers("direct", "cpu")


def _threads(tmp_path, n, route, *sets, name):
    cfg = load_config(SMALL, ["probes.enabled=false", "train.rounds=3", *sets])
    out = tmp_path / name
    ctxs = ThreadWorld(n).run(lambda comm: execute(cfg, comm, out, route=route), deadline_s=60)
    return ctxs, read_result(out)


@pytest.mark.parametrize(
    "sets",
    [
        ['scheme="snake"', 'snake.transfer="delta"'],
        ['scheme="snake"', 'snake.mode="cs"'],
        ['scheme="fedavg"'],
        ['scheme="splitfed"'],
    ],
)
def test_staged_path_moves_exactly_the_analytic_bytes_and_the_same_models(tmp_path, sets):
    staged_ctxs, staged = _threads(tmp_path, 3, ("staged", "test"), *sets, name="s.h5")
    host_ctxs, host = _threads(tmp_path, 3, None, *sets, name="h.h5")
    sent, received = expected_bytes(staged)
    np.testing.assert_array_equal(staged.rounds["bytes_sent"], sent)
    np.testing.assert_array_equal(staged.rounds["bytes_received"], received)
    np.testing.assert_array_equal(staged.rounds["bytes_sent"], host.rounds["bytes_sent"])
    # the path changes where bytes wait, not what they are: bit-identical models
    assert [model_hash(c.model) for c in staged_ctxs] == [model_hash(c.model) for c in host_ctxs]
    assert staged.attrs["gpu_transfer"] == "staged" and host.attrs["gpu_transfer"] == "host"
    assert all(c.hop.path == "staged" for c in staged_ctxs)
    # the reusable buffers are recorded: within two payloads of the whole model, 0 on host
    held = staged.tables["ranks"]["transfer_buffer_bytes"]
    model_bytes = int(staged.tables["blocks"]["bytes"].sum())
    assert (held > 0).any() and (held <= 2 * model_bytes).all(), held
    assert host.tables["ranks"]["transfer_buffer_bytes"].tolist() == [0, 0, 0]


def test_a_cpu_result_says_plainly_that_no_gpu_was_used(tmp_path):
    _, res = _threads(tmp_path, 2, None, name="c.h5")
    assert res.attrs["device"] == "cpu" and res.attrs["gpu_transfer"] == "host"
    assert res.tables["ranks"]["device"].tolist() == ["cpu", "cpu"]
    assert res.tables["ranks"]["gpu_uuid"].tolist() == ["", ""]
    assert res.tables["ranks"]["gpu_shared"].tolist() == [0, 0]
    assert res.tables["ranks"]["local_rank_source"].tolist() == ["", ""]
    for name in ("gpu_max_allocated_bytes", "gpu_nvml_used_bytes", "gpu_energy_j"):
        assert np.isnan(res.rounds[name]).all(), name  # unavailable, never 0
    assert res.provenance["cuda_version"] == "none"


@pytest.mark.mpi
@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_device_cuda_without_a_gpu_ends_every_rank_with_exit_2_and_no_file(tmp_path):
    out = tmp_path / "r.h5"
    job = run_mpi(2, snake_mpi("run", str(TINY), "--out", str(out), "--set", 'device="cuda"'))
    assert job.returncode == 2, job.output
    assert job.output.count('device = "cuda" but torch sees no usable CUDA device') == 1
    assert "Traceback" not in job.output
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.mpi
def test_the_cuda_support_query_agrees_with_ompi_info(tmp_path):
    """``comm.cuda_support`` asks the loaded library at run time; for Open MPI its build flag,
    as ``ompi_info`` reports it, must give the same answer."""
    ompi_info = shutil.which("ompi_info", path=os.path.dirname(sys.executable))
    if ompi_info is None:
        pytest.skip("no ompi_info next to this Python (not Open MPI)")
    info = subprocess.run(
        [ompi_info, "--parsable", "--all"], capture_output=True, text=True, timeout=120
    ).stdout
    flags = re.findall(r"(?:mpi|opal)_built_with_cuda_support:value:(\w+)", info)
    assert flags, "ompi_info does not report the CUDA build flag"
    code = (
        "from snake_mpi.transport.mpi.world import cuda_support; "
        "s, how = cuda_support(); print(f'{s}|{how}')"
    )
    job = run_mpi(1, [sys.executable, "-c", code], timeout_s=60)
    assert job.returncode == 0, job.output
    support, how = job.output.strip().splitlines()[-1].split("|")
    assert support == str(flags[0] == "true")
    assert "MPIX_Query_cuda_support" in how or "mpi_memory_alloc_kinds" in how


@pytest.mark.mpi
def test_without_a_launcher_variable_every_rank_learns_its_local_rank_from_a_split(tmp_path):
    """No launcher variable (an unusual launcher): every rank takes part in the shared-memory
    split, so each gets its own local rank (one host reader of RAPL, GPUs by local rank)."""
    out = tmp_path / "r.h5"
    unset = [arg for var in dev.LOCAL_RANK_VARS for arg in ("-u", var)]
    argv = ["env", *unset, *snake_mpi("run", str(TINY), "--out", str(out))]
    job = run_mpi(3, argv, timeout_s=120)
    assert job.returncode == 0, job.output
    ranks = read_result(out).tables["ranks"]
    assert sorted(ranks["local_rank"].tolist()) == [0, 1, 2]
    assert set(ranks["local_rank_source"]) == {"MPI_COMM_TYPE_SHARED split"}
