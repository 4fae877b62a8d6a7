"""Probes: the memory sampler sees real allocations, the disk counter sees real writes."""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from snake_mpi.probes import gpu
from snake_mpi.probes.memory import MemorySampler, ru_maxrss_bytes
from snake_mpi.probes.storage import DiskWriteCounter, nbytes_on_disk

MB = 10**6

pytestmark = pytest.mark.skipif(not MemorySampler.available(), reason="psutil cannot read RSS")


def _touched(n_bytes: int) -> np.ndarray:
    arr = np.empty(n_bytes, dtype=np.uint8)
    arr[::4096] = 1  # touch every page so it is resident
    return arr


def _wait_for(ok, timeout_s: float = 30.0) -> None:
    """Until ``ok()``: the sampler thread ticks every 10 ms, but on a loaded host it may not be
    scheduled for a while; 30 s is the margin relied on."""
    deadline = time.monotonic() + timeout_s
    while not ok() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_sampler_sees_peak_and_records_series():
    s = MemorySampler(0.01)
    s.start()
    try:
        base = s.peak_rss_bytes()
        big = _touched(200 * MB)
        _wait_for(lambda: s.series()["rss_bytes"].max() - base >= 150 * MB)  # a tick saw it
        peak = s.peak_rss_bytes()
        del big
        _wait_for(lambda: s.series()["t_s"].size >= 3)
    finally:
        s.stop()
    assert peak - base >= 150 * MB
    series = s.series()
    assert set(series) == {"t_s", "rss_bytes", "cpu_percent"}
    assert series["t_s"].dtype == np.float64 and series["rss_bytes"].dtype == np.int64
    assert series["t_s"].size >= 3
    assert series["t_s"].size == series["rss_bytes"].size == series["cpu_percent"].size
    assert np.all(np.diff(series["t_s"]) > 0)
    assert series["rss_bytes"].max() - base >= 150 * MB


def test_stop_is_idempotent_and_joins():
    s = MemorySampler(0.01)
    s.start()
    thread = s._thread
    s.stop()
    s.stop()
    assert thread is not None and not thread.is_alive()


def test_disabled_sampler_has_no_thread_but_still_samples():
    s = MemorySampler(0.01, enabled=False)
    s.start()
    assert s._thread is None
    assert s.sample_now() > 0
    assert s.take_round_peak() > 0
    assert s.peak_rss_bytes() > 0
    assert all(v.size == 0 for v in s.series().values())
    s.stop()


def test_take_round_peak_resets_the_window():
    s = MemorySampler(0.01, enabled=False)
    s.take_round_peak()
    big = _touched(200 * MB)
    high = s.take_round_peak()
    del big
    low = s.take_round_peak()
    assert high - low >= 150 * MB
    assert s.peak_rss_bytes() >= high


def test_series_is_decimated_to_stay_bounded():
    s = MemorySampler(0.001, max_samples=8)
    for _ in range(100):
        s._tick()
    t = s.series()["t_s"]
    assert 4 <= t.size <= 8
    assert np.all(np.diff(t) > 0)


def test_ru_maxrss_is_at_least_current_rss():
    rss = MemorySampler(enabled=False).sample_now()
    assert rss > 0
    assert ru_maxrss_bytes() >= rss


def test_disk_write_counter_counts_a_written_file(tmp_path):
    if not DiskWriteCounter.available():
        pytest.skip("no per-process write counter on this platform")
    c = DiskWriteCounter()
    data = os.urandom(10 * 2**20)
    with open(tmp_path / "f.bin", "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    if c.field == "write_bytes" and c.total_bytes() == 0:
        pytest.skip("this file system does no per-process block accounting (write_bytes = 0)")
    assert c.total_bytes() >= len(data)
    assert c.take_round() >= len(data)
    assert c.take_round() < len(data)
    assert c.total_bytes() >= len(data)


def test_nbytes_on_disk_file_and_tree(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(os.urandom(100_000))
    (tmp_path / "b.bin").write_bytes(os.urandom(50_000))
    one = nbytes_on_disk(tmp_path / "sub" / "a.bin")
    assert one >= 100_000
    assert nbytes_on_disk(tmp_path) >= one + 50_000


def test_gpu_probe_degrades():
    mem = gpu.gpu_memory()
    assert isinstance(mem, dict)
    if not gpu.available():
        assert mem == {}
    else:
        assert mem["allocated_bytes"] >= 0
