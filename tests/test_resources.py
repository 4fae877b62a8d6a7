"""The memory estimate a run is checked against before it allocates anything
(``snake_mpi.resources``): its parts against the model and data they count, its data part
against what generating the data really takes, the limits it is compared with, and the
refusal's one line."""

from __future__ import annotations

import resource

import pytest

from conftest import REPO
from snake_mpi import resources
from snake_mpi.blocks import block_tensors
from snake_mpi.config import ConfigError, load_config
from snake_mpi.models import build_model
from snake_mpi.resources import (
    Limit,
    MemoryEstimate,
    check_fits,
    check_memory,
    estimate,
    format_bytes,
    limits,
    parse_size,
)

TINY = REPO / "tests" / "configs" / "tiny.toml"
DEMO = REPO / "bench" / "configs" / "demo.toml"


@pytest.mark.parametrize(
    ("text", "value"),
    [("8GiB", 8 * 2**30), ("512MiB", 512 * 2**20), ("2G", 2 * 10**9), ("1.5e9", 1_500_000_000),
     ("100", 100), (" 3 kib ", 3072), ("0.5TiB", 2**39)],
)  # fmt: skip
def test_sizes_parse_in_decimal_and_binary_units(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "12x", "GiB", "-1G", "0", "1e999", "nan"])
def test_a_size_that_is_not_one_is_refused(text):
    with pytest.raises(ValueError, match="size"):
        parse_size(text)


def test_bytes_are_shown_in_binary_units():
    assert format_bytes(512) == "512 B"
    assert format_bytes(3 * 2**20) == "3 MiB"
    assert format_bytes(1.5 * 2**40) == "1.5 TiB"
    assert format_bytes(3 * 2**50) == "3,072 TiB"


def params_of(cfg) -> list[int]:
    model = build_model(
        cfg.model, sample_shape=tuple(cfg.data.sample_shape), n_classes=cfg.data.n_classes, seed=0
    )
    return [sum(t.numel() for t in block_tensors(model, b)) for b in range(model.n_blocks)]


def test_the_model_parts_are_the_model_counted():
    """Weights: every parameter and buffer once at 4 bytes (centralised: no copy in flight;
    FedAvg: one more); training: gradient + Adam's two moments per trained parameter; a Snake
    node trains its own segment only, and nodes train one at a time."""
    central = load_config(TINY, ['scheme="centralised"', 'train.optimizer="adam"'])
    blocks = params_of(central)
    est = estimate(central, 1)
    assert est.resident["weights"] == 4 * sum(blocks)
    assert est.turn["training"] == (4 + 8) * sum(blocks)
    fedavg = estimate(load_config(TINY, ['scheme="fedavg"']), 3)
    assert fedavg.resident["weights"] == 2 * 4 * sum(blocks)
    assert fedavg.concurrent_turns == 3
    snake = estimate(load_config(TINY, ["snake.kd.weight=0", "snake.prox_mu=0"]), 4)
    # tiny: ends = owner, 4 middle blocks over 4 nodes: node 0 trains the stem + one block
    assert snake.turn["training"] == (4 + 4) * max(
        blocks[0] + blocks[1], blocks[2], blocks[3], blocks[4] + blocks[5]
    )
    assert snake.concurrent_turns == 1
    assert snake.ranks_bytes(4) == 4 * sum(snake.resident.values()) + sum(snake.turn.values())


def test_the_lean_options_lower_the_training_part_by_what_they_drop():
    """Fused step: no whole gradient (4 B per trained parameter); 8-bit AdamW: 2 B of moments
    instead of 8; the estimate follows what train_local holds (tests/test_lean_options.py)."""
    base = ['scheme="centralised"', 'train.optimizer="adamw"']
    n = sum(params_of(load_config(TINY, base)))
    plain = estimate(load_config(TINY, base), 1).turn["training"]
    fused = estimate(load_config(TINY, [*base, "train.fused_step=true"]), 1).turn["training"]
    eight = estimate(load_config(TINY, [*base, 'train.optimizer="adamw8bit"']), 1)
    assert plain == (4 + 8) * n
    assert fused == 8 * n
    assert eight.turn["training"] == (4 + 2) * n


def _measured_data_bytes(overrides: list[str], ranks: int) -> int:
    """Peak bytes of array data (numpy reports every array to ``tracemalloc``) while a rank
    builds its data: the dataset from the seed, then its shard copied out."""
    import tracemalloc

    from snake_mpi.run import build_shards, seeds_for

    cfg = load_config(TINY, overrides)
    seeds, _ = seeds_for(cfg.seed, ranks)
    tracemalloc.start()
    try:
        dataset, parts = build_shards(cfg, seeds, ranks)
        shard = dataset.x_train.numpy()[parts[0]]  # as execute() copies its shard
        assert shard.shape[0] == len(parts[0])
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", [[3, 32, 32], [256]])
def test_the_data_part_covers_what_building_the_data_takes(shape):
    sets = ["data.n_train=40000", "data.n_test=8000", f"data.sample_shape={shape}"]
    measured = _measured_data_bytes(sets, 4)
    est = estimate(load_config(TINY, sets), 4).resident["data"]
    assert measured <= est <= 1.3 * measured, (format_bytes(measured), format_bytes(est))


def test_the_activations_grow_with_the_batch_and_the_logits_with_the_classes():
    small_eval = ["train.eval_batch_size=8"]
    a = estimate(load_config(DEMO, ["train.batch_size=64", *small_eval]), 4)
    b = estimate(load_config(DEMO, ["train.batch_size=640", *small_eval]), 4)
    assert b.turn["activations"] == 10 * a.turn["activations"]
    wide = estimate(load_config(DEMO, ["data.n_classes=100000000", "train.batch_size=64"]), 4)
    assert "data.n_classes = 100,000,000" in wide.notes["activations"]
    assert wide.advice["activations"].startswith("lower data.n_classes")


def test_the_paper_and_llm_configs_of_this_machine_fit_it():
    """The configs the benchmarks run here (docs) are not refused by the estimate: OPT-1.3B
    Snake on 2 ranks and bf16 on 6, with 24 GiB."""
    fits = [
        ("llm/opt-1.3b-snake.toml", 2),
        ("llm/opt-1.3b-snake-bf16.toml", 6),
        ("llm/opt-1.3b-full.toml", 1),
        ("demo.toml", 4),
    ]
    for name, ranks in fits:
        cfg = load_config(REPO / "bench" / "configs" / name)
        need = estimate(cfg, ranks).ranks_bytes(ranks)
        assert need <= 22 * 2**30, (name, format_bytes(need))


def _est(resident: int, turn: int, concurrent: int = 1) -> MemoryEstimate:
    return MemoryEstimate(
        resident={"data": resident, "weights": 0, "runtime": 0},
        turn={"training": 0, "activations": turn},
        concurrent_turns=concurrent,
        notes={"data": "what the data are"},
    )


def test_the_refusal_is_one_line_with_the_need_the_limit_and_the_key():
    est = _est(3 * 2**30, 2**30)
    check_fits(est, [Limit(13 * 2**30, 4, "available on the host")])  # 4 x 3 + 1 = 13 GiB
    with pytest.raises(ConfigError) as e:
        check_fits(est, [Limit(13 * 2**30 - 1, 4, "available on the host")], "h1")
    text = str(e.value)
    assert "\n" not in text
    assert text.startswith("this run needs about 13 GiB of memory on host h1 (4 ranks, each")
    assert "but 13 GiB is available on the host; data is the largest part (what the data are)"
    assert "lower data.n_train, data.n_test or data.sample_shape" in text
    with pytest.raises(ConfigError, match="needs about 16 GiB"):  # all four train at once
        check_fits(_est(3 * 2**30, 2**30, concurrent=4), [Limit(15 * 2**30, 4, "x")])


def test_the_limits_are_the_host_the_cap_and_the_process_s_own():
    found = limits(4)
    assert found[0].ranks == 4 and found[0].source == "available on the host"
    capped = limits(4, max_memory_bytes=2**30)
    assert capped[0] == Limit(2**30, 4, "the limit given by --max-memory")
    soft, hard = resource.getrlimit(resource.RLIMIT_DATA)  # conftest: each test runs under one
    assert soft != resource.RLIM_INFINITY
    process = [x for x in found if "ulimit -d" in x.source]
    assert process and process[0].ranks == 1
    assert 0 < process[0].room_bytes <= soft
    threads = [x for x in limits(4, ranks_in_process=4) if "ulimit -d" in x.source]
    assert threads[0].ranks == 4


def test_a_config_too_large_for_this_test_s_own_limit_is_refused_naming_it():
    cfg = load_config(TINY, ["data.n_train=50000000"])  # ~3.2 GiB of data on every rank
    with pytest.raises(ConfigError, match=r"left under the data-size limit \(ulimit -d\)"):
        check_memory(cfg, 2, ranks_on_host=1, ranks_in_process=2, max_memory_bytes=2**40)


def test_a_control_group_limit_is_found_along_the_process_s_path(tmp_path, monkeypatch):
    """cgroup v2: the tightest ``memory.max`` minus ``memory.current`` on the way up."""
    root = tmp_path / "cg"
    job = root / "slurm" / "job_7"
    job.mkdir(parents=True)
    (root / "memory.max").write_text("max\n")
    (root / "memory.current").write_text("1000\n")
    (root / "slurm" / "memory.max").write_text(f"{64 * 2**30}\n")
    (root / "slurm" / "memory.current").write_text(f"{2**30}\n")
    (job / "memory.max").write_text(f"{4 * 2**30}\n")
    (job / "memory.current").write_text(f"{2**30}\n")
    real_path = resources.Path

    def fake(p, *rest):
        p = str(p)
        if p == "/proc/self/cgroup":
            return real_path(tmp_path / "self-cgroup")
        if p.startswith("/sys/fs/cgroup"):
            return real_path(str(root) + p.removeprefix("/sys/fs/cgroup"), *rest)
        return real_path(p, *rest)

    (tmp_path / "self-cgroup").write_text("0::/slurm/job_7\n")
    monkeypatch.setattr(resources, "Path", fake)
    assert resources._cgroup_room_bytes() == 3 * 2**30
    (tmp_path / "self-cgroup").write_text("0::/\n")
    assert resources._cgroup_room_bytes() is None
