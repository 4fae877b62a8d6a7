"""GPU ranks (marker ``gpu``; skipped where torch sees no CUDA device): both transfer paths
from device memory are bit-exact and move the analytic bytes, the GPU figures are filled, and
a rank leaves no CUDA context on a GPU other than its own. ``bench/gpu_check.sh`` runs these."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch

from conftest import REPO, check_int8_layer, run_mpi, snake_mpi
from snake_mpi.analysis.expected import expected_bytes
from snake_mpi.blocks import model_hash
from snake_mpi.config import load_config
from snake_mpi.device import Placement
from snake_mpi.models import build_model
from snake_mpi.run import execute
from snake_mpi.store import read_result
from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.payloads import HopBuffers

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device"),
]

SMALL = REPO / "tests" / "configs" / "small.toml"
TINY = REPO / "tests" / "configs" / "tiny.toml"
TORCH_FIGURES = ("gpu_max_allocated_bytes", "gpu_max_reserved_bytes")
NVML_FIGURES = ("gpu_nvml_used_bytes", "gpu_energy_j", "gpu_power_w")


def _nvml():
    try:
        import pynvml
    except ImportError:
        return None
    pynvml.nvmlInit()
    return pynvml


def _model(seed, device):
    cfg = load_config(SMALL, [])
    model = build_model(
        cfg.model, sample_shape=tuple(cfg.data.sample_shape), n_classes=10, seed=seed
    )
    return model.to(device)


@pytest.mark.parametrize("path", ["staged", "direct"])
def test_pack_and_unpack_from_device_memory_are_bit_exact(path):
    src, dst = _model(1, "cuda"), _model(2, "cuda")
    hop = HopBuffers(path, "cuda")
    assert hop.pinned == (path == "staged")
    payload, sizes = hop.pack(src, [1, 2, 3])
    assert torch.is_tensor(payload) == (path == "direct")
    into = hop.receive_into(int(sizes.sum()))
    (into if torch.is_tensor(into) else torch.from_numpy(into)).copy_(
        payload if torch.is_tensor(payload) else torch.from_numpy(payload)
    )
    hop.unpack(dst, [1, 2, 3], into, sizes)
    for b in (1, 2, 3):
        for a, c in zip(src.blocks[b].parameters(), dst.blocks[b].parameters(), strict=True):
            assert torch.equal(a, c)


def _threads(tmp_path, n, path, name, *sets):
    cfg = load_config(SMALL, ["train.rounds=2", "probes.interval_s=0.02", 'device="cuda"', *sets])
    out = tmp_path / name
    place = Placement("cuda", index=0, visible_devices=torch.cuda.device_count())
    ctxs = ThreadWorld(n).run(
        lambda comm: execute(cfg, comm, out, placement=place, route=(path, "test")),
        deadline_s=120,
    )
    return ctxs, read_result(out)


def test_both_paths_move_the_analytic_bytes_and_give_the_same_models(tmp_path):
    staged_ctxs, staged = _threads(tmp_path, 3, "staged", "s.h5")
    direct_ctxs, direct = _threads(tmp_path, 3, "direct", "d.h5")
    for res in (staged, direct):
        sent, received = expected_bytes(res)
        np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
        np.testing.assert_array_equal(res.rounds["bytes_received"], received)
        assert res.attrs["device"] == "cuda"
        for name in TORCH_FIGURES:
            assert np.isfinite(res.rounds[name]).all() and (res.rounds[name] > 0).all(), name
    assert [model_hash(c.model) for c in staged_ctxs] == [model_hash(c.model) for c in direct_ctxs]
    assert staged.attrs["gpu_transfer"] == "staged" and direct.attrs["gpu_transfer"] == "direct"
    assert staged.tables["ranks"]["gpu_shared"].tolist() == [1, 1, 1]
    assert all(u.startswith("GPU-") for u in staged.tables["ranks"]["gpu_uuid"])
    if _nvml() is not None:
        for name in NVML_FIGURES:
            assert np.isfinite(staged.rounds[name]).all(), name
        assert len(staged.series[0]["gpu_power_w"]) > 0


def test_a_rank_leaves_no_cuda_context_on_another_gpu():
    nvml = _nvml()
    if nvml is None:
        pytest.skip("nvidia-ml-py is not installed")
    index = torch.cuda.device_count() - 1
    torch.cuda.set_device(index)
    _model(0, f"cuda:{index}")
    torch.cuda.synchronize()
    mine = str(torch.cuda.get_device_properties(index).uuid)
    mine = mine if mine.startswith("GPU-") else f"GPU-{mine}"
    on = []
    for i in range(nvml.nvmlDeviceGetCount()):
        h = nvml.nvmlDeviceGetHandleByIndex(i)
        pids = {p.pid for p in nvml.nvmlDeviceGetComputeRunningProcesses(h)}
        if os.getpid() in pids:
            uuid = nvml.nvmlDeviceGetUUID(h)
            on.append(uuid.decode() if isinstance(uuid, bytes) else uuid)
    if not on:
        pytest.skip("NVML does not list this process (PID namespace): cannot check")
    assert on == [mine]


@pytest.mark.mpi
def test_two_mpi_ranks_share_the_gpu_and_fill_every_gpu_field(tmp_path):
    out = tmp_path / "r.h5"
    job = run_mpi(2, snake_mpi("run", str(TINY), "--out", str(out), "--set", 'device="cuda"'))
    assert job.returncode == 0, job.output
    res = read_result(out)
    ranks = res.tables["ranks"]
    assert ranks["device"].tolist() == ["cuda:0", "cuda:0"] or torch.cuda.device_count() > 1
    sent, _ = expected_bytes(res)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
    for name in TORCH_FIGURES:
        assert np.isfinite(res.rounds[name]).all(), name
    if _nvml() is not None:
        for name in NVML_FIGURES:
            assert np.isfinite(res.rounds[name]).all(), name
        assert res.provenance["cuda_driver_version"] not in ("none", "unavailable")
    assert not math.isnan(float(res.rounds["gpu_max_allocated_bytes"].max()))


def test_an_int8_frozen_layer_runs_on_the_gpu_within_a_percent_and_saves_only_int8():
    pytest.importorskip("torchao")
    from torch import nn

    torch.manual_seed(0)
    lin = nn.Linear(256, 512).to("cuda", torch.bfloat16)
    x = torch.randn(4, 16, 256, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    check_int8_layer(lin, x)


def test_a_ring_with_int8_frozen_blocks_trains_on_the_gpu(tmp_path):
    pytest.importorskip("torchao")
    pytest.importorskip("transformers")
    tiny_lm = REPO / "bench" / "configs" / "llm" / "tiny-snake.toml"
    sets = ["probes.enabled=false", "train.rounds=2", "data.n_train=256", "data.n_test=32"]
    sets += ["checkpoint.every=0", 'snake.frozen_weights="int8"', 'device="cuda"']
    cfg = load_config(tiny_lm, sets)
    out = tmp_path / "int8.h5"
    ThreadWorld(4).run(lambda comm: execute(cfg, comm, out), deadline_s=120)
    res = read_result(out)
    sent, _ = expected_bytes(res)
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)
    assert len(set(res.tables["ranks"]["model_sha256"])) == 1
    loss = res.evaluation["loss"]
    assert loss[-1] < loss[0]
