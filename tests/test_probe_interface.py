"""Every probe meets ``probes.Probe`` (and the round ones ``RoundProbe``): the methods exist
and behave on this CPU machine; a probe that cannot measure says so and why."""

from __future__ import annotations

import math

import pytest

from snake_mpi.probes import Probe, RoundProbe
from snake_mpi.probes.gpu import ROUND_KEYS, GpuProbe
from snake_mpi.probes.memory import MemorySampler
from snake_mpi.probes.rapl import RaplCounter
from snake_mpi.probes.storage import DiskWriteCounter
from snake_mpi.record import ROUND_FIELDS


def _probes(tmp_path) -> list[Probe]:
    return [
        MemorySampler(0.01),
        DiskWriteCounter(),
        GpuProbe(None),
        RaplCounter(tmp_path / "no-powercap"),
    ]


def test_every_probe_class_satisfies_the_protocols(tmp_path):
    for probe in _probes(tmp_path):
        assert isinstance(probe, Probe), type(probe).__name__
        assert isinstance(probe, RoundProbe), type(probe).__name__
        assert isinstance(probe.available(), bool)
        assert isinstance(probe.reason, str)
        assert probe.available() == (probe.reason == "") or isinstance(probe, GpuProbe)


def test_the_life_cycle_runs_on_cpu_and_round_figures_are_round_fields(tmp_path):
    for probe in _probes(tmp_path):
        probe.start()
        sample = probe.sample()
        assert all(isinstance(v, int | float) for v in sample.values()), sample
        probe.begin_round()
        figures = probe.end_round()
        assert set(figures) <= set(ROUND_FIELDS), (type(probe).__name__, figures)
        probe.stop()
        probe.stop()  # twice is safe


@pytest.mark.skipif(not MemorySampler.available(), reason="psutil cannot read RSS")
def test_memory_and_storage_probes_measure_here():
    mem, disk = MemorySampler(0.01), DiskWriteCounter()
    assert mem.available() and mem.reason == ""
    assert mem.sample()["rss_bytes"] > 0
    assert mem.end_round()["peak_rss_bytes"] > 0
    if disk.available():
        assert disk.reason == "" and disk.sample()["disk_write_bytes"] >= 0
    else:
        assert disk.reason


def test_gpu_probe_without_a_gpu_is_unavailable_with_a_reason():
    cpu_rank = GpuProbe(None)
    assert not cpu_rank.available() and "CPU rank" in cpu_rank.reason
    assert cpu_rank.sample() == {}
    assert all(math.isnan(v) for v in cpu_rank.end_round().values())
    assert tuple(cpu_rank.end_round()) == ROUND_KEYS


def test_gpu_probe_for_a_device_torch_cannot_read_says_why():
    class NoDevice:
        def get_device_properties(self, i):
            raise RuntimeError("no CUDA GPUs are available")

    class NoNvml:
        def nvmlInit(self):
            raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    p = GpuProbe(0, nvml=NoNvml(), torch_cuda=NoDevice())
    assert not p.available()
    assert "cannot read CUDA device 0" in p.reason and "no CUDA GPUs" in p.reason
    p.stop()


def test_gpu_probe_with_a_device_but_no_nvml_is_available_and_says_what_is_missing():
    from types import SimpleNamespace

    class OneDevice:
        def get_device_properties(self, i):
            return SimpleNamespace(name="Fake GPU", uuid="0000")

    class NoNvml:
        def nvmlInit(self):
            raise OSError("no driver")

    p = GpuProbe(0, nvml=NoNvml(), torch_cuda=OneDevice())
    assert p.available() and not p.nvml_ok
    assert "NVML unavailable" in p.reason


def test_rapl_without_powercap_is_unavailable_with_a_reason(tmp_path):
    r = RaplCounter(tmp_path / "nowhere")
    assert not r.available() and "no RAPL package zones" in r.reason
    assert r.sample() == {}
    r.begin_round()
    assert math.isnan(r.end_round()["host_cpu_energy_j"])


def test_rapl_round_figures_are_the_energy_in_the_round(tmp_path):
    zone = tmp_path / "intel-rapl:0"
    zone.mkdir()
    (zone / "name").write_text("package-0\n")
    (zone / "energy_uj").write_text("0\n")
    (zone / "max_energy_range_uj").write_text("1000000000\n")
    r = RaplCounter(tmp_path)
    assert r.available() and r.reason == ""
    r.start()
    r.begin_round()
    (zone / "energy_uj").write_text("2500000\n")
    assert r.sample() == {}
    assert r.end_round() == {"host_cpu_energy_j": pytest.approx(2.5)}
