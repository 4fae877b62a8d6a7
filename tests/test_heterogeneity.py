"""Heterogeneity and Snake's options: measured capabilities, emulated slow nodes and links,
knowledge distillation."""

from __future__ import annotations

import sys
import time
import tomllib
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from conftest import REPO, mpi_run, run_mpi
from snake_mpi.analysis.expected import expected_bytes
from snake_mpi.blocks import model_hash
from snake_mpi.config import ConfigError, ModelConfig, from_dict, load_config
from snake_mpi.context import Context, NodeData
from snake_mpi.models import build_model
from snake_mpi.run import execute
from snake_mpi.schemes.capability import BlockMeter, summarise
from snake_mpi.store import read_result
from snake_mpi.train import KDSpec, train_local
from snake_mpi.transport.localcomm import ThreadWorld
from snake_mpi.transport.wire import KIND_MODEL, LinkModel, Transfer, TransferSpec

SMALL = REPO / "tests" / "configs" / "small.toml"
TINY = REPO / "tests" / "configs" / "tiny.toml"


def test_kd_with_weight_zero_equals_no_kd_exactly():
    cfg = load_config(SMALL)
    x, y = torch.randn(128, 32), torch.randint(0, 4, (128,))
    models = []
    for kd in (None, KDSpec(weight=0.0, temperature=3.0)):
        model = build_model(cfg.model, sample_shape=(32,), n_classes=4, seed=1)
        res = train_local(
            model, [1, 2], x, y, cfg=cfg.train, generator=torch.Generator().manual_seed(0), kd=kd
        )
        models.append((model, res))
    (plain, r0), (distilled, r1) = models
    assert model_hash(plain) == model_hash(distilled)
    assert r0.loss == r1.loss and np.isnan(r0.kd_loss) and r1.kd_loss > 0  # it was computed
    # the teacher's copy of the trained blocks is part of the node's training state
    copy_bytes = sum(t.numel() * 4 for b in (1, 2) for t in plain.blocks[b].state_dict().values())
    assert r1.train_state_bytes == r0.train_state_bytes + copy_bytes


def test_kd_pulls_the_student_towards_the_teacher():
    cfg = load_config(SMALL, ["train.local_steps=20"])
    x, y = torch.randn(256, 32), torch.randint(0, 4, (256,))
    gaps = {}
    for weight in (0.0, 50.0):
        model = build_model(cfg.model, sample_shape=(32,), n_classes=4, seed=1)
        teacher = build_model(cfg.model, sample_shape=(32,), n_classes=4, seed=1)
        kd = KDSpec(weight, 2.0) if weight else None
        train_local(model, [2, 3], x, y, cfg=cfg.train, generator=torch.Generator(), kd=kd)
        with torch.no_grad():
            gaps[weight] = float((model(x).softmax(1) - teacher(x).softmax(1)).abs().mean())
    assert gaps[50.0] < 0.5 * gaps[0.0], gaps


def test_a_snake_run_with_kd_records_task_and_kd_loss_apart(tmp_path):
    cfg = load_config(SMALL, ["probes.enabled=false", "train.rounds=2", "snake.kd.weight=0.5"])
    ThreadWorld(3).run(lambda c: execute(cfg, c, tmp_path / "kd.h5"))
    res = read_result(tmp_path / "kd.h5")
    assert (res.rounds["kd_loss"] > 0).all() and (res.rounds["loss"] > 0).all()
    assert tomllib.loads(res.config_toml)["snake"]["kd"] == {"weight": 0.5, "temperature": 2.0}


def test_a_slow_node_measured_as_slow_gets_fewer_blocks(tmp_path):
    """Node 1 is slowed 4x: measured capability ratio 4 against each other node, plan
    [4, 1, 5] or [5, 1, 4] of the 10 middle blocks. Margin relied on: the assertions hold while
    every rank's measured real speed is within a factor 1.8 of every other's (block times
    within 20 %; checked against ``assign.partition_blocks``): node 0 or 2 could take 8 blocks
    only at a ratio >= 8, and the capability assertion needs a ratio > 2. (Slowdown 6 on 9
    blocks, as before, failed at a 15 % error.) Seen under load: within a factor 1.4."""
    cfg = load_config(
        SMALL,
        [
            "probes.enabled=false",
            "train.rounds=1",
            "model.middle_blocks=10",
            "model.width=128",
            'snake.capability="measure"',
            "emulate.slowdown=[1.0, 4.0, 1.0]",
        ],
    )
    ctxs = ThreadWorld(3).run(lambda c: execute(cfg, c, tmp_path / "cap.h5"))
    plan = ctxs[0].report.plan
    mids = [[b for b in ids if 0 < b < 11] for ids in plan]
    assert len(mids[1]) < min(len(mids[0]), len(mids[2])), mids
    res = read_result(tmp_path / "cap.h5")
    caps = res.arrays["assignment/capability"]
    assert caps[1] < 0.5 * min(caps[0], caps[2]), caps
    assert res.arrays["assignment/block_time_s"].shape == (3, 12)
    spread = ctxs[0].report.block_time_spread
    assert spread.shape == (3, 12) and (spread >= 0).all(), spread
    assert res.rounds["slowdown_s"][0, 1] > 0 and res.rounds["slowdown_s"][0, 0] == 0
    sent, received = expected_bytes(res)  # rebuilt from the recorded measurement
    np.testing.assert_array_equal(res.rounds["bytes_sent"], sent)


def test_a_block_time_is_the_least_sample_and_a_slow_spell_shows_only_in_the_spread():
    samples = np.array([[1.0, 2.0], [1.0, 2.0], [9.0, 2.5], [1.5, 2.0], [1.0, 4.0]])
    times, spread = summarise(samples)
    np.testing.assert_array_equal(times, [1.0, 2.0])
    np.testing.assert_allclose(spread, [0.0, 0.0])  # median / min - 1
    _, spread = summarise(samples[2:])
    np.testing.assert_allclose(spread, [0.5, 0.25])
    np.testing.assert_array_equal(summarise(np.zeros((3, 2)))[1], [0.0, 0.0])


def meter_context(cfg, model, x) -> Context:
    """A one-rank context with ``x`` as both training and test data, for a ``BlockMeter``."""
    data = NodeData(x_train=x, y_train=torch.zeros(8), x_test=x, y_test=torch.zeros(8))
    return Context(
        cfg=cfg,
        comm=SimpleNamespace(rank=0),
        model=model,
        data=data,
        record=None,
        generator=torch.Generator(),
    )


def test_a_block_meter_stops_after_its_minimum_passes_once_over_its_cap():
    """One pass per turn (``turn_passes=1``), cap 0 s: the fourth and later turns time
    nothing, so a large model is timed ``min_passes`` times (after one warm-up), not once per
    round. Counts only, no timing."""
    cfg = load_config(SMALL)
    model = build_model(cfg.model, sample_shape=(32,), n_classes=4, seed=1)
    x = torch.randn(8, 32)
    ctx = meter_context(cfg, model, x)
    meter = BlockMeter(ctx, turn_passes=1, min_passes=3, cap_s=0.0)
    for _ in range(6):
        meter.turn()
    assert len(meter.samples) == 3
    times, spread = meter.result()
    assert times.shape == spread.shape == (model.n_blocks,) and (times > 0).all()
    assert not any(p.requires_grad for p in model.parameters())  # frozen again
    assert all(p.grad is None for p in model.parameters())


def test_measuring_leaves_batch_norm_statistics_as_they_were():
    """However many passes the timings allow, the model (VGG: batch norm) ends as it began,
    so a run with ``snake.capability = "measure"`` is as reproducible as one without."""
    cfg = load_config(SMALL)
    model = build_model(
        ModelConfig(family="vgg11", width=8, middle_blocks=4),
        sample_shape=(3, 32, 32),
        n_classes=10,
        seed=0,
    )
    before = model_hash(model)
    x = torch.randn(8, 3, 32, 32)
    ctx = meter_context(cfg, model, x)
    meter = BlockMeter(ctx, turn_passes=2)
    meter.turn()
    meter.turn()
    assert len(meter.samples) >= 2
    assert model_hash(model) == before


def test_link_emulation_stretches_a_transfer_to_the_formula():
    link = LinkModel(bandwidth_bps=8e6, latency_s=0.05, edges=((1, 0, 4e6, 0.01),))
    payload = np.zeros(200_000, dtype=np.uint8)
    ids = np.array([0], dtype=np.int64)

    def hop_of(hop: int) -> Transfer:
        sizes = np.array([payload.nbytes])
        return Transfer(KIND_MODEL, 0, hop, ids, ids, sizes, payload)

    def body(comm):
        t0 = time.perf_counter()
        if comm.rank == 0:
            comm.send_blocks(1, hop_of(0))
            comm.recv_blocks(1, TransferSpec(KIND_MODEL, 0, 1))
        else:
            comm.recv_blocks(0, TransferSpec(KIND_MODEL, 0, 0))
            comm.send_blocks(0, hop_of(1))
        return time.perf_counter() - t0, comm.stats.take()

    (t0, s0), (t1, s1) = ThreadWorld(2).run(body, link=link)
    nbytes = payload.nbytes + 48 + 24
    there = 0.05 + 8 * nbytes / 8e6  # 0 -> 1: the default link, 0.250 s
    back = 0.01 + 8 * nbytes / 4e6  # 1 -> 0: its own edge, 0.410 s
    assert link.hop_s(0, 1, nbytes) == pytest.approx(there)
    # Never shorter than the formula (each stretch sleeps until its start + hop time); longer
    # by thread wake-ups: margin 50 ms (1.5 ms seen under load), below the 60 ms of a latency
    # counted twice.
    assert there + back - 1e-3 <= t0 <= there + back + 0.05, t0
    for s in (s0, s1):  # each rank sent one hop and received the other, each stretched
        # send/recv time + sleep = hop time by construction, unless a real copy of 200 kB
        # outlasted its hop (0.25 s): margin 30 ms either way
        moving = s["send_s"] + s["recv_s"] + s["link_emulated_s"]
        assert moving == pytest.approx(there + back, abs=0.03), s
        assert s["link_emulated_s"] > 0.6  # margin: 60 ms of real send + receive time


@pytest.mark.mpi
def test_link_emulation_under_mpi_makes_every_transfer_last_the_formula():
    """Sender: from the start of the send; receiver: from the header's arrival; both to the end
    of the (stretched) transfer: latency + 8 bytes / bandwidth. Never shorter (to 1 ms); longer
    by at most 100 ms of a process's wake-up on a loaded host (0.6 ms seen with a core busy,
    35 ms with the test suite's two workers and another job), which is below the 200 ms
    latency that a latency counted twice would add."""
    program = REPO / "tests" / "mpi_programs" / "link_hops.py"
    job = run_mpi(2, [sys.executable, str(program), "4e6", "0.2"], timeout_s=60)
    assert job.returncode == 0, job.output
    rows = [line.split(",") for line in job.stdout.split() if line.count(",") == 2]
    assert len(rows) == 6, job.output
    for rank, nbytes, seconds in rows:
        formula = 0.2 + 8 * int(nbytes) / 4e6
        assert formula - 1e-3 <= float(seconds) <= formula + 0.1, (rank, nbytes, seconds)


LINKS = mpi_run(
    2, TINY, "emulate.bandwidth_bps=1e6", "emulate.latency_s=0.02", "probes.enabled=false"
)


@pytest.mark.mpi
def test_a_run_with_emulated_links_records_the_stretch(mpi_runs):
    r = mpi_runs(LINKS).result.rounds
    sent = r["messages_sent"] > 0
    formula = 0.02 + 8 * r["bytes_sent"] / 1e6  # one hop per rank per round here
    # a lower bound only (a stretch sleeps until the hop time has passed): load cannot break it
    assert (r["send_s"] + r["link_emulated_s"] >= formula - 0.005)[sent].all()
    assert (r["link_emulated_s"][sent] > 0).all()


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"emulate": {"slowdown": [0.5]}}, r"emulate.slowdown\[0\] must be a finite number >= 1"),
        ({"emulate": {"edges": ["0-1 1e6 0"]}}, "is not of the form"),
        ({"emulate": {"bandwidth_bps": -1.0}}, "emulate.bandwidth_bps must be"),
        ({"snake": {"kd": {"temperature": 0.0}}}, "snake.kd.temperature"),
        ({"snake": {"capability": "guess"}}, "unknown snake.capability"),
    ],
)
def test_bad_emulation_and_kd_settings_are_config_errors(raw, message):
    with pytest.raises(ConfigError, match=message):
        from_dict(raw)


@pytest.mark.mpi
def test_payloads_above_the_message_limit_travel_in_pieces_and_count_once():
    """MPI counts are C ints: a 2.4 GB OPT-1.3B segment failed as one message. With the limit
    lowered to 1000 bytes, payloads of 0..4500 bytes arrive intact however the receive is
    posted and into whatever buffer (torch tensors included: the GPU paths' buffers), and each
    is counted as one transfer (payload + header)."""
    program = REPO / "tests" / "mpi_programs" / "chunked.py"
    job = run_mpi(2, [sys.executable, str(program)], timeout_s=60)
    assert job.returncode == 0, job.output
    rows = [line.split(",") for line in job.stdout.split() if line.startswith("ok,")]
    assert len(rows) == 25, job.output  # 5 sizes x 5 ways to receive
    for _, how, size, counted in rows:
        assert int(counted) == int(size) + 8 * (6 + 3), (how, size, counted)
