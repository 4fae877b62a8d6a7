"""GPU and RAPL probes against fakes (no GPU, no powercap here): NVML by UUID, energy deltas,
time-averaged power, sampled peaks, NaN (never 0) where a figure is unavailable; the memory
sampler's extra series."""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from snake_mpi.probes import gpu
from snake_mpi.probes.gpu import ROUND_KEYS, SERIES_KEYS, GpuProbe
from snake_mpi.probes.memory import MemorySampler
from snake_mpi.probes.rapl import RaplCounter

UUID = "58e7ef6c-1a2b-3c4d-5e6f-000000000001"


class NVMLError(Exception):
    """Like pynvml.NVMLError: carries a return code."""

    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value


NOT_SUPPORTED = 3


def _not_supported(*_args):
    raise NVMLError(NOT_SUPPORTED)


class FakeNvml:
    """The few pynvml calls the probe makes, with state the test controls."""

    NVMLError = NVMLError

    def __init__(self) -> None:
        self.inits = 0
        self.shutdowns = 0
        self.uuids: list[str] = []
        self.energy_mj = 1_000_000
        self.power_mw = 250_000
        self.util_percent = 80
        self.used_bytes = 10 * 2**30
        self.procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=3 * 2**30)]

    def nvmlInit(self):
        self.inits += 1

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetHandleByUUID(self, uuid):
        self.uuids.append(uuid)
        return ("handle", uuid)

    def nvmlDeviceGetHandleByIndex(self, index):
        raise AssertionError("NVML indices ignore CUDA_VISIBLE_DEVICES; look up by UUID")

    def nvmlSystemGetDriverVersion(self):
        return b"550.54.15"

    def nvmlSystemGetNVMLVersion(self):
        return "12.550.54.15"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        assert handle == ("handle", f"GPU-{UUID}")
        return self.energy_mj

    def nvmlDeviceGetPowerUsage(self, handle):
        return self.power_mw

    def nvmlDeviceGetUtilizationRates(self, handle):
        return SimpleNamespace(gpu=self.util_percent, memory=10)

    def nvmlDeviceGetMemoryInfo(self, handle):
        return SimpleNamespace(used=self.used_bytes, total=80 * 2**30, free=0)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return list(self.procs)


class FakeCuda:
    """torch.cuda's allocator statistics for one device."""

    def __init__(self, uuid: str = UUID) -> None:
        self.uuid = uuid
        self.calls: list[tuple[str, int]] = []
        self.max_allocated = 0
        self.max_reserved = 0

    def get_device_properties(self, i):
        return SimpleNamespace(name="Fake H100", uuid=self.uuid)

    def max_memory_allocated(self, i):
        return self.max_allocated

    def max_memory_reserved(self, i):
        return self.max_reserved

    def reset_peak_memory_stats(self, i):
        self.calls.append(("reset", i))
        self.max_allocated = self.max_reserved = 0

    def synchronize(self, i):
        self.calls.append(("sync", i))


@pytest.fixture
def clock(monkeypatch):
    """A perf_counter for the GPU module that moves only when the test says so."""
    now = [100.0]
    monkeypatch.setattr(gpu, "perf_counter", lambda: now[0])
    return now


def _probe(nvml=None, cuda=None, index=1):
    return GpuProbe(index, nvml=nvml or FakeNvml(), torch_cuda=cuda or FakeCuda())


# ------------------------------------------------------------------ GpuProbe


def test_handle_is_looked_up_by_uuid_with_gpu_prefix():
    nvml = FakeNvml()
    p = GpuProbe(3, nvml=nvml, torch_cuda=FakeCuda())
    assert p.enabled and p.nvml_ok
    assert nvml.uuids == [f"GPU-{UUID}"] and nvml.inits == 1
    assert p.identity() == {"gpu_name": "Fake H100", "gpu_uuid": f"GPU-{UUID}"}
    prefixed = FakeNvml()
    GpuProbe(0, nvml=prefixed, torch_cuda=FakeCuda(uuid=f"GPU-{UUID}"))
    assert prefixed.uuids == [f"GPU-{UUID}"]


def test_versions_decode_bytes():
    v = _probe().versions()
    assert v["cuda_driver_version"] == "550.54.15"
    assert v["nvml_version"] == "12.550.54.15"
    assert isinstance(v["cuda_version"], str) and v["cuda_version"]


def test_round_energy_power_and_peaks(clock):
    nvml, cuda = FakeNvml(), FakeCuda()
    p = GpuProbe(1, nvml=nvml, torch_cuda=cuda)
    cuda.max_allocated = 999  # from before the round: reset by begin_round
    p.begin_round()
    assert cuda.calls[:2] == [("sync", 1), ("reset", 1)]
    cuda.max_allocated, cuda.max_reserved = 5 * 2**30, 6 * 2**30
    nvml.used_bytes = 20 * 2**30
    s = p.sample()
    assert s == {"gpu_power_w": 250.0, "gpu_util_percent": 80.0, "gpu_nvml_used_bytes": 20 * 2**30}
    assert tuple(s) == SERIES_KEYS
    nvml.used_bytes = 12 * 2**30  # the peak stays at 20 GiB
    nvml.procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=4 * 2**30)]
    p.sample()
    nvml.procs = [SimpleNamespace(pid=os.getpid(), usedGpuMemory=2 * 2**30)]
    nvml.energy_mj += 500_000  # 500 J
    clock[0] += 2.0
    r = p.end_round()
    assert tuple(r) == ROUND_KEYS
    assert r["gpu_max_allocated_bytes"] == 5 * 2**30
    assert r["gpu_max_reserved_bytes"] == 6 * 2**30
    assert r["gpu_nvml_used_bytes"] == 20 * 2**30
    assert r["gpu_nvml_process_bytes"] == 4 * 2**30
    assert r["gpu_energy_j"] == pytest.approx(500.0)
    assert r["gpu_power_w"] == pytest.approx(250.0)  # time average, not the last sample
    assert cuda.calls[-1] == ("sync", 1)

    p.begin_round()  # the peaks start again
    nvml.used_bytes = 11 * 2**30
    nvml.energy_mj += 30_000
    clock[0] += 0.5
    r = p.end_round()
    assert r["gpu_nvml_used_bytes"] == 11 * 2**30
    assert r["gpu_nvml_process_bytes"] == 2 * 2**30
    assert r["gpu_energy_j"] == pytest.approx(30.0)
    assert r["gpu_power_w"] == pytest.approx(60.0)


def test_real_clock_power_is_energy_over_elapsed():
    import time

    nvml = FakeNvml()
    p = _probe(nvml)
    p.begin_round()
    time.sleep(0.05)
    nvml.energy_mj += 10_000
    r = p.end_round()
    assert r["gpu_energy_j"] == pytest.approx(10.0)
    assert 10.0 / 5.0 < r["gpu_power_w"] <= 10.0 / 0.05


@pytest.mark.parametrize(
    "procs",
    [
        [],
        [SimpleNamespace(pid=os.getpid() + 1, usedGpuMemory=2**30)],  # a host PID, not ours
        [SimpleNamespace(pid=os.getpid(), usedGpuMemory=None)],  # not available
    ],
)
def test_process_memory_is_nan_not_zero_when_unavailable(procs):
    nvml = FakeNvml()
    nvml.procs = procs
    p = _probe(nvml)
    p.begin_round()
    p.sample()
    r = p.end_round()
    assert math.isnan(r["gpu_nvml_process_bytes"])
    assert r["gpu_nvml_used_bytes"] == nvml.used_bytes


def test_not_supported_calls_give_nan_and_the_rest_still_works(clock):
    nvml = FakeNvml()
    nvml.nvmlDeviceGetTotalEnergyConsumption = _not_supported
    nvml.nvmlDeviceGetPowerUsage = _not_supported
    nvml.nvmlDeviceGetComputeRunningProcesses = _not_supported
    cuda = FakeCuda()
    p = GpuProbe(0, nvml=nvml, torch_cuda=cuda)
    p.begin_round()
    cuda.max_allocated = 7
    clock[0] += 1.0
    s = p.sample()
    assert math.isnan(s["gpu_power_w"]) and s["gpu_util_percent"] == 80.0
    r = p.end_round()
    assert math.isnan(r["gpu_energy_j"]) and math.isnan(r["gpu_power_w"])
    assert math.isnan(r["gpu_nvml_process_bytes"])
    assert r["gpu_max_allocated_bytes"] == 7 and r["gpu_nvml_used_bytes"] == nvml.used_bytes


def test_energy_counter_going_backwards_is_nan(clock):
    nvml = FakeNvml()
    p = _probe(nvml)
    p.begin_round()
    nvml.energy_mj = 10  # driver reloaded
    clock[0] += 1.0
    r = p.end_round()
    assert math.isnan(r["gpu_energy_j"]) and math.isnan(r["gpu_power_w"])


def test_without_nvml_torch_figures_still_work():
    class Broken(FakeNvml):
        def nvmlInit(self):
            raise NVMLError(9)  # driver not loaded

    cuda = FakeCuda()
    p = GpuProbe(0, nvml=Broken(), torch_cuda=cuda)
    assert p.enabled and not p.nvml_ok
    p.begin_round()
    cuda.max_allocated, cuda.max_reserved = 5, 8
    s = p.sample()
    assert set(s) == set(SERIES_KEYS) and all(math.isnan(v) for v in s.values())
    r = p.end_round()
    assert r["gpu_max_allocated_bytes"] == 5 and r["gpu_max_reserved_bytes"] == 8
    assert all(math.isnan(r[k]) for k in ROUND_KEYS[2:])
    assert p.versions()["cuda_driver_version"] == "unavailable"
    p.close()


def test_unknown_uuid_keeps_versions_and_nans_the_device():
    class NoSuchDevice(FakeNvml):
        def nvmlDeviceGetHandleByUUID(self, uuid):
            raise NVMLError(13)

    nvml = NoSuchDevice()
    p = GpuProbe(0, nvml=nvml, torch_cuda=FakeCuda())
    assert not p.nvml_ok
    assert p.versions()["cuda_driver_version"] == "550.54.15"
    p.begin_round()
    assert math.isnan(p.end_round()["gpu_nvml_used_bytes"])
    p.close()
    assert nvml.shutdowns == 1


def test_cpu_rank_is_all_nan():
    p = GpuProbe(None, nvml=FakeNvml(), torch_cuda=FakeCuda())
    assert not p.enabled and not p.nvml_ok
    p.begin_round()
    assert p.sample() == {}
    r = p.end_round()
    assert tuple(r) == ROUND_KEYS and all(math.isnan(v) for v in r.values())
    assert p.identity() == {"gpu_name": "", "gpu_uuid": ""}
    assert p.versions() == dict.fromkeys(
        ("cuda_version", "cuda_driver_version", "nvml_version"), "none"
    )
    p.close()


def test_close_shuts_nvml_down_once():
    nvml = FakeNvml()
    p = _probe(nvml)
    p.close()
    p.close()
    assert nvml.shutdowns == 1
    assert math.isnan(p.sample()["gpu_power_w"])


def test_module_functions_degrade_without_a_gpu():
    assert isinstance(gpu.available(), bool)
    if not gpu.available():
        assert gpu.gpu_memory() == {}


# ------------------------------------------------------------------ RAPL


def _zone(root: Path, name: str, label: str, energy_uj: int, max_uj: int = 1_000_000) -> Path:
    z = root / name
    z.mkdir()
    (z / "name").write_text(f"{label}\n")
    (z / "energy_uj").write_text(f"{energy_uj}\n")
    (z / "max_energy_range_uj").write_text(f"{max_uj}\n")
    return z


def _set(zone: Path, energy_uj: int) -> None:
    (zone / "energy_uj").write_text(f"{energy_uj}\n")


def test_rapl_sums_packages_ignores_subzones_and_handles_wrap(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 100)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 900_000)
    dram = _zone(tmp_path, "intel-rapl:0:0", "dram", 0)
    psys = _zone(tmp_path, "intel-rapl:2", "psys", 0)
    mmio = _zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0)
    r = RaplCounter(tmp_path)
    assert r.available() and r.package_count == 2
    r.begin()
    _set(p0, 300_100)  # +0.3 J
    _set(p1, 200_000)  # wrapped at 1 J: +0.3 J
    for z in (dram, psys, mmio):
        _set(z, 999_999)
    assert r.take_j() == pytest.approx(0.6)
    _set(p0, 400_100)
    _set(p1, 250_000)
    assert r.take_j() == pytest.approx(0.15)  # since the last take
    _set(p0, 900_100)
    r.poll()  # folds 0.5 J in, so a second wrap before the take is not lost
    _set(p0, 100)
    assert r.take_j() == pytest.approx(0.6)


def test_rapl_accepts_amd_names(tmp_path):
    z = _zone(tmp_path, "amd-rapl:0", "package-0", 0)
    r = RaplCounter(tmp_path)
    assert r.available()
    _set(z, 2_000_000)
    assert r.take_j() == pytest.approx(2.0)


def test_rapl_unreadable_or_missing_is_unavailable(tmp_path, monkeypatch):
    assert not RaplCounter(tmp_path / "nowhere").available()
    assert math.isnan(RaplCounter(tmp_path / "nowhere").take_j())
    _zone(tmp_path, "intel-rapl:0", "package-0", 5)
    real_read_text = Path.read_text

    def deny(self, *args, **kwargs):
        if self.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(self))
        return real_read_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", deny)
    r = RaplCounter(tmp_path)
    assert not r.available()
    r.begin()
    assert math.isnan(r.take_j())


def test_rapl_counter_lost_mid_run_is_nan_once(tmp_path):
    z = _zone(tmp_path, "intel-rapl:0", "package-0", 0)
    r = RaplCounter(tmp_path)
    r.begin()
    (z / "energy_uj").unlink()
    assert math.isnan(r.take_j())
    _set(z, 10)
    assert math.isnan(r.take_j())  # no reading to start from
    _set(z, 1_000_010)
    assert r.take_j() == pytest.approx(1.0)


# ------------------------------------------------------------------ MemorySampler extra

needs_psutil = pytest.mark.skipif(not MemorySampler.available(), reason="psutil cannot read RSS")


@needs_psutil
def test_sampler_extra_series_align_with_t_s_and_survive_errors():
    ticks = [0]

    def extra():
        ticks[0] += 1
        if ticks[0] == 3:
            raise RuntimeError("sensor lost")
        out = {"gpu_power_w": float(ticks[0])}
        if ticks[0] >= 5:
            out["late_key"] = 1.0
        return out

    s = MemorySampler(0.01, max_samples=1000, extra=extra)
    for _ in range(6):
        s._tick()
    series = s.series()
    assert series["gpu_power_w"].dtype == np.float64
    np.testing.assert_array_equal(series["gpu_power_w"], [1, 2, np.nan, 4, 5, 6])
    np.testing.assert_array_equal(series["late_key"], [np.nan] * 4 + [1, 1])
    assert all(v.size == series["t_s"].size for v in series.values())


@needs_psutil
def test_sampler_extra_decimation_keeps_lengths_equal():
    calls = [0]

    def extra():
        calls[0] += 1
        return {"gpu_util_percent": float(calls[0]), "t_s": -1.0}  # a clash is ignored

    s = MemorySampler(0.001, max_samples=8, extra=extra)
    for _ in range(100):
        s._tick()
    series = s.series()
    assert calls[0] == 100  # every tick, recorded or not (the GPU probe keeps peaks)
    assert 4 <= series["t_s"].size <= 8
    assert series["gpu_util_percent"].size == series["t_s"].size
    assert np.all(series["t_s"] >= 0)
    assert np.all(np.diff(series["gpu_util_percent"]) > 0)


@needs_psutil
def test_sampler_thread_calls_extra_with_a_gpu_probe():
    nvml = FakeNvml()
    probe = _probe(nvml)
    s = MemorySampler(0.005, extra=probe.sample)
    probe.begin_round()
    nvml.used_bytes = 30 * 2**30
    s.start()
    try:
        import time

        deadline = time.monotonic() + 30
        while s.series()["t_s"].size < 3 and time.monotonic() < deadline:
            time.sleep(0.005)
    finally:
        s.stop()
    series = s.series()
    assert set(SERIES_KEYS) <= set(series)
    assert series["gpu_power_w"].size == series["t_s"].size >= 3
    nvml.used_bytes = 1
    assert probe.end_round()["gpu_nvml_used_bytes"] == 30 * 2**30
