"""The lean node's options (issue 31): the optimiser step fused into the backward pass
(``train.fused_step``), activation checkpointing (``train.activation_checkpointing``), the
8-bit AdamW, the mmap threshold, the fused kernel, master chunks and stochastic rounding. The
exact ones must train exactly the weights of the plain turn, each must hold what it says it
holds and be refused where it does not apply. No MPI here; their memory is measured by
bench/lean_node.py and bench/memory_ledger.py.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")

from snake_mpi.blocks import model_hash  # noqa: E402
from snake_mpi.config import ConfigError, ModelConfig, TrainConfig, from_dict  # noqa: E402
from snake_mpi.models import build_model  # noqa: E402
from snake_mpi.probes.memory import set_mmap_threshold  # noqa: E402
from snake_mpi.train import train_local  # noqa: E402


def lm(preset: str, dtype: str = "float32"):
    cfg = ModelConfig(family="lm", preset=preset, dtype=dtype)
    return build_model(cfg, sample_shape=(1,), n_classes=256, seed=3)


def tokens(n: int = 16, seq: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randint(0, 256, (n, seq), generator=torch.Generator().manual_seed(1))
    return x, torch.roll(x, -1, dims=1)


def turn(model, trainable, cfg, x, y):
    return train_local(model, trainable, x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))


PLAIN = TrainConfig(local_steps=4, batch_size=8, lr=0.01, optimizer="adamw")


@pytest.mark.parametrize(
    ("option", "preset", "dtype", "trainable", "optimizer"),
    [
        ("fused_step", "opt-tiny", "float32", [1, 2], "adamw"),
        ("fused_step", "opt-tiny", "float32", [0], "adamw"),  # the stem: the head shares its matrix
        ("fused_step", "llama-tiny", "bfloat16", [1, 2], "adamw"),  # fp32 masters
        ("fused_step", "opt-tiny", "float32", [2, 3], "sgd"),
        ("activation_checkpointing", "opt-tiny", "float32", [1, 2], "adamw"),
        ("activation_checkpointing", "llama-tiny", "bfloat16", [1, 2], "adam"),
    ],
)
def test_a_lean_option_trains_exactly_the_plain_weights(
    option, preset, dtype, trainable, optimizer
):
    x, y = tokens()
    plain_cfg = dataclasses.replace(PLAIN, optimizer=optimizer)
    lean_cfg = dataclasses.replace(plain_cfg, **{option: True})
    plain, lean = lm(preset, dtype), lm(preset, dtype)
    assert model_hash(plain) == model_hash(lean)
    a, b = turn(plain, trainable, plain_cfg, x, y), turn(lean, trainable, lean_cfg, x, y)
    assert model_hash(plain) == model_hash(lean)
    assert model_hash(plain) != model_hash(lm(preset, dtype))  # the turn did train
    assert a.loss == b.loss and a.steps == b.steps == 4


def test_the_fused_step_holds_no_gradient_after_the_turn_and_says_so():
    x, y = tokens()
    cfg = dataclasses.replace(PLAIN, weight_decay=0.0)
    plain, fused = lm("llama-tiny", "bfloat16"), lm("llama-tiny", "bfloat16")
    a = turn(plain, [1, 2], cfg, x, y)
    b = turn(fused, [1, 2], dataclasses.replace(cfg, fused_step=True), x, y)
    p = a.trainable_params
    # the plain turn ends holding each fp32 master's gradient (4 bytes a parameter); fused, each
    # gradient is dropped as soon as its parameter has stepped
    assert a.train_state_bytes - b.train_state_bytes == 4 * p
    assert all(q.grad is None for q in fused.parameters())


def test_the_fused_steps_hooks_leave_with_the_turn():
    x, y = tokens()
    once, twice = lm("opt-tiny"), lm("opt-tiny")
    turn(once, [1, 2], dataclasses.replace(PLAIN, fused_step=True), x, y)
    turn(once, [1, 2], PLAIN, x, y)  # a hook left behind would step a second time in here
    turn(twice, [1, 2], PLAIN, x, y)
    turn(twice, [1, 2], PLAIN, x, y)
    assert model_hash(once) == model_hash(twice)


def test_activation_checkpointing_recomputes_the_blocks_that_run_with_autograd():
    x, y = tokens()
    calls: dict[int, int] = {}
    model = lm("opt-tiny")

    def count(b):
        def hook(*_):
            calls[b] = calls.get(b, 0) + 1

        return hook

    for b, blk in enumerate(model.blocks):
        blk.register_forward_pre_hook(count(b))  # a recomputation may stop before the end
    turn(model, [2], dataclasses.replace(PLAIN, activation_checkpointing=True), x, y)
    steps = PLAIN.local_steps
    # below the segment: once a step, without autograd; from the segment up: again in the
    # backward pass, where each block recomputes what it did not keep
    assert calls[0] == calls[1] == steps
    assert all(calls[b] == 2 * steps for b in range(2, model.n_blocks))


def test_activation_checkpointing_is_refused_for_a_trainable_block_with_batch_norm():
    model = build_model(
        ModelConfig(family="vgg11", width=4), sample_shape=(3, 32, 32), n_classes=10, seed=0
    )
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 10, (8,), generator=torch.Generator().manual_seed(0))
    cfg = TrainConfig(local_steps=1, batch_size=4, activation_checkpointing=True)
    with pytest.raises(ValueError, match="block 1 has batch-norm"):
        train_local(model, [1], x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))


def test_the_lean_options_are_off_by_default_and_read_from_the_config():
    assert not TrainConfig().fused_step and not TrainConfig().activation_checkpointing
    cfg = from_dict({"train": {"fused_step": True, "activation_checkpointing": True}})
    assert cfg.train.fused_step and cfg.train.activation_checkpointing
    with pytest.raises(ConfigError):
        from_dict({"train": {"fused_step": "yes"}})


def test_adamw8bit_state_is_counted_by_its_codes_and_scales():
    pytest.importorskip("torchao")
    from snake_mpi.blocks import optimizer_state_bytes
    from snake_mpi.train import lean_adamw8bit

    big = torch.nn.Parameter(torch.randn(256, 64))  # 16,384 elements: 8-bit moments
    small = torch.nn.Parameter(torch.randn(64))  # under 4,096: fp32 moments
    opt = lean_adamw8bit([big, small], lr=1e-3, weight_decay=0.0)
    big.grad, small.grad = torch.randn_like(big), torch.randn_like(small)
    opt.step()
    # torchao's layout: a byte per element, an fp32 scale per block of 256, its 256-entry fp32
    # code book; each moment, two moments; a 4-byte step counter per parameter
    eight_bit = 16_384 + 4 * (16_384 // 256) + 4 * 256
    assert optimizer_state_bytes(opt) == 2 * eight_bit + 4 + 2 * 4 * 64 + 4


def test_adamw8bit_trains_and_fuses_into_the_backward_pass_exactly():
    pytest.importorskip("torchao")
    x, y = tokens()
    cfg = dataclasses.replace(PLAIN, optimizer="adamw8bit", local_steps=6, lr=0.003)
    plain, fused, full = lm("opt-tiny"), lm("opt-tiny"), lm("opt-tiny")
    a = turn(plain, [1, 2], cfg, x, y)
    b = turn(fused, [1, 2], dataclasses.replace(cfg, fused_step=True), x, y)
    c = turn(full, [1, 2], dataclasses.replace(cfg, optimizer="adamw"), x, y)
    assert model_hash(plain) == model_hash(fused) != model_hash(full)
    assert a.loss == b.loss
    assert abs(a.loss - c.loss) < 0.05 * c.loss  # the same training, 8-bit moments
    # fp32 weights (no masters): the unfused turn ends holding its gradients, the fused one not;
    # 8-bit moments are a quarter of fp32 AdamW's and their scales
    n = a.trainable_params
    assert a.train_state_bytes - b.train_state_bytes == 4 * n
    weights = sum(p.numel() * 4 for p in plain.parameters())
    moments_8, moments_32 = b.train_state_bytes - weights, c.train_state_bytes - weights - 4 * n
    assert 2 * n < moments_8 < 0.3 * moments_32


MMAP_PROBE = """
import ctypes, sys, torch
from snake_mpi.probes.memory import set_mmap_threshold
def rss_mib():
    return int(open('/proc/self/statm').read().split()[1]) * 4096 / 2**20
libc = ctypes.CDLL("libc.so.6")
libc.mallopt(-1, 1 << 30)  # M_TRIM_THRESHOLD: keep freed heap memory (the control's setting)
libc.mallopt(-3, 32 << 20)  # M_MMAP_THRESHOLD at glibc's largest dynamic value: 4 MiB in the heap
if sys.argv[1] != "0":
    assert set_mmap_threshold(int(sys.argv[1]))
warm = [torch.ones(1 << 20) for _ in range(2)]  # torch's first fills (its threads) before base
del warm
base = rss_mib()
held = [torch.ones(1 << 20) for _ in range(40)]  # 40 x 4 MiB
del held
print(rss_mib() - base)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt: Linux only")
def test_a_fixed_mmap_threshold_hands_freed_tensors_back_to_the_os():
    def kept_mib(threshold: int) -> float:
        job = subprocess.run(
            [sys.executable, "-c", MMAP_PROBE, str(threshold)],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert job.returncode == 0, job.stderr
        return float(job.stdout.split()[-1])

    # the control: glibc's threshold as its default grows it (32 MiB) and nothing trimmed, so
    # freed 4 MiB tensors stay in the RSS; set_mmap_threshold(128 KiB) maps each, and freed
    # they go back to the OS
    assert kept_mib(0) >= 100  # of 160 MiB freed
    assert kept_mib(1 << 17) < 20
    assert not set_mmap_threshold(0)  # 0: glibc's default, nothing set
    with pytest.raises(ConfigError, match="mmap_threshold_bytes"):
        TrainConfig(mmap_threshold_bytes=2**26)


def test_the_fused_kernel_is_only_for_adam_and_adamw():
    assert not TrainConfig().fused_kernel
    assert from_dict({"train": {"optimizer": "adam", "fused_kernel": True}}).train.fused_kernel
    for optimizer in ("sgd", "adamw8bit"):
        with pytest.raises(ConfigError, match="train.fused_kernel applies to"):
            from_dict({"train": {"optimizer": optimizer, "fused_kernel": True}})


def test_the_fused_kernel_takes_the_eager_step_to_the_last_bits():
    from snake_mpi.train import make_optimizer

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(k, generator=g) for k in (4099, 70_001)]
    grads = [[torch.randn(t.shape, generator=g) for t in start] for _ in range(3)]
    out = {}
    for kernel in (False, True):
        ps = [torch.nn.Parameter(t.clone()) for t in start]
        opt = make_optimizer(ps, dataclasses.replace(PLAIN, fused_kernel=kernel))
        for step in grads:
            for p, grad in zip(ps, step, strict=True):
                p.grad = grad.clone()
            opt.step()
        out[kernel] = [p.detach() for p in ps]
    for eager, fused, s in zip(out[False], out[True], start, strict=True):
        assert not torch.equal(eager, s)
        torch.testing.assert_close(fused, eager, rtol=2e-6, atol=2e-6)  # a few fp32 ulps


@pytest.mark.parametrize(("dtype", "fused_step"), [("float32", False), ("bfloat16", True)])
def test_a_turn_with_the_fused_kernel_trains_as_the_plain_turn(dtype, fused_step):
    x, y = tokens()
    cfg = dataclasses.replace(PLAIN, fused_step=fused_step)
    kernel_cfg = dataclasses.replace(cfg, fused_kernel=True)
    plain, kernel, start = lm("opt-tiny", dtype), lm("opt-tiny", dtype), lm("opt-tiny", dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the turn's forward and backward differ with the thread count
    try:
        a = turn(plain, [1, 2], cfg, x, y)
        b = turn(kernel, [1, 2], kernel_cfg, x, y)
    finally:
        torch.set_num_threads(threads)
    assert model_hash(plain) != model_hash(kernel)  # the kernel rounds differently ...

    def norm(m1, m2) -> float:
        pairs = zip(m1.parameters(), m2.parameters(), strict=True)
        return sum(float((p.float() - q.float()).pow(2).sum()) for p, q in pairs) ** 0.5

    # ... but takes the same steps: the weights differ from the plain turn's by a small part of
    # what the turn moved them (more with bf16 weights, where a flipped last bit of a weight
    # changes the later gradients: 0.6 % here on one thread)
    assert norm(plain, kernel) < 0.05 * norm(plain, start)
    assert abs(a.loss - b.loss) < 1e-3 * a.loss


def test_the_fused_kernels_bits_do_not_depend_on_the_thread_count():
    # the step alone (a turn's forward and backward may: torch_threads is recorded); sizes
    # that leave a tail after the kernel's vector width and a block of its own per thread
    from snake_mpi.train import make_optimizer

    cfg = dataclasses.replace(PLAIN, fused_kernel=True, weight_decay=0.01)
    threads = torch.get_num_threads()
    results = set()
    try:
        for n in (1, 2, 3, 8):
            torch.set_num_threads(n)
            g = torch.Generator().manual_seed(0)
            ps = [torch.nn.Parameter(torch.randn(k, generator=g)) for k in (4099, 300_007)]
            opt = make_optimizer(ps, cfg)
            for _ in range(3):
                for p in ps:
                    p.grad = torch.randn(p.shape, generator=g)
                opt.step()
            results.add(b"".join(p.detach().numpy().tobytes() for p in ps))
    finally:
        torch.set_num_threads(threads)
    assert len(results) == 1


def chunk_run(chunk: int, *, fused_step: bool = False, fused_kernel: bool = False):
    """Four steps of a bf16 layer big enough to chunk (300,000 weights: four chunks of 65,536
    elements and a short fifth), trained through ``Optimiser``; its weights and masters."""
    from snake_mpi.train import Optimiser

    torch.manual_seed(0)
    layer = torch.nn.Linear(600, 500).to(torch.bfloat16)
    x = torch.randn(32, 600, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    cfg = dataclasses.replace(
        PLAIN, master_chunk_elements=chunk, fused_kernel=fused_kernel, weight_decay=0.01
    )
    opt = Optimiser(list(layer.parameters()), cfg, fused=fused_step)
    for _ in range(4):
        layer(x).float().pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    opt.close()
    return layer, opt


@pytest.mark.parametrize(
    ("fused_step", "fused_kernel"), [(False, False), (True, False), (False, True), (True, True)]
)
def test_chunked_masters_train_exactly_the_whole_masters_weights(fused_step, fused_kernel):
    whole, whole_opt = chunk_run(0, fused_step=fused_step, fused_kernel=fused_kernel)
    chunked, opt = chunk_run(65536, fused_step=fused_step, fused_kernel=fused_kernel)
    assert [m.numel() for m in opt.masters[0]] == [65536] * 4 + [300_000 - 4 * 65536]
    assert [m.numel() for m in opt.masters[1]] == [500]  # the bias: one chunk
    for p, q in zip(whole.parameters(), chunked.parameters(), strict=True):
        assert torch.equal(p, q)
    masters = torch.cat([m.detach().reshape(-1) for m in opt.master_parameters()])
    assert torch.equal(masters, torch.cat([m.reshape(-1) for m in whole_opt.master_parameters()]))
    assert opt.master_bytes() == whole_opt.master_bytes() == 4 * 300_500


def test_master_chunks_are_whole_multiples_of_the_kernels_blocks():
    assert TrainConfig(master_chunk_elements=131072).master_chunk_elements == 131072
    for bad in (-65536, 1000, 65537):
        with pytest.raises(ConfigError, match="master_chunk_elements"):
            TrainConfig(master_chunk_elements=bad)


def test_stochastic_rounding_is_only_for_the_8bit_adamw_and_has_no_masters_to_chunk():
    for optimizer in ("sgd", "adam", "adamw"):
        with pytest.raises(ConfigError, match="stochastic_rounding applies to"):
            TrainConfig(optimizer=optimizer, stochastic_rounding=True)
    with pytest.raises(ConfigError, match="no fp32 masters to chunk"):
        TrainConfig(optimizer="adamw8bit", stochastic_rounding=True, master_chunk_elements=65536)
    assert TrainConfig(optimizer="adamw8bit", stochastic_rounding=True).stochastic_rounding


def sr_steps(seed: int = 0) -> torch.Tensor:
    """50 AdamW8bit steps with stochastic rounding of a bf16 tensor of ones, through
    ``Optimiser``, with a constant gradient: Adam's bias-corrected update is then the learning
    rate, 1e-3, each step (under half of bf16's spacing of 2^-8 just below 1: rounded to the
    nearest value, the weights would never move); the tensor after."""
    from snake_mpi.train import Optimiser

    p = torch.nn.Parameter(torch.ones(8192, dtype=torch.bfloat16))
    cfg = TrainConfig(optimizer="adamw8bit", lr=1e-3, weight_decay=0.0, stochastic_rounding=True)
    opt = Optimiser([p], cfg)
    assert not opt.masters and opt.master_bytes() == 0
    torch.manual_seed(seed)
    for _ in range(50):
        p.grad = torch.ones_like(p)
        opt.step()
        opt.zero_grad()
    return p.detach()


def test_stochastic_rounding_moves_bf16_weights_as_far_as_the_updates_ask():
    pytest.importorskip("torchao")
    sr = sr_steps()
    assert sr.dtype == torch.bfloat16
    # 50 updates of 1e-3 ask for 0.05; stochastic rounding keeps them on average (each element
    # goes down a whole bf16 step with the update's probability)
    moved = 1 - sr.float().mean().item()
    assert abs(moved - 0.05) < 0.005
    assert len(set(sr.float().tolist())) > 1  # elements rounded apart: random, not nearest
    # its random bits are torch's generator's: the same seed, the same bits
    assert torch.equal(sr, sr_steps()) and not torch.equal(sr, sr_steps(seed=1))


def test_a_turn_with_stochastic_rounding_follows_the_turns_generator_not_the_global_one():
    pytest.importorskip("torchao")
    x, y = tokens()
    cfg = dataclasses.replace(
        PLAIN, optimizer="adamw8bit", stochastic_rounding=True, lr=1e-3, local_steps=2
    )
    hashes = []
    for global_seed, turn_seed in ((1, 0), (2, 0), (1, 5)):
        model = lm("opt-tiny", "bfloat16")
        torch.manual_seed(global_seed)  # whatever ran before the turn
        gen = torch.Generator().manual_seed(turn_seed)
        r = train_local(model, [1, 2], x, y, cfg=cfg, generator=gen)
        assert r.steps == 2 and next(model.parameters()).dtype == torch.bfloat16
        hashes.append(model_hash(model))
    assert hashes[0] == hashes[1] != hashes[2]


def test_stochastic_rounding_is_refused_for_fp32_weights():
    base = {"model": {"family": "lm", "preset": "opt-tiny"}, "data": {"name": "text"}}
    sr = {"optimizer": "adamw8bit", "stochastic_rounding": True}
    with pytest.raises(ConfigError, match="needs model.dtype = 'bfloat16'"):
        from_dict({**base, "train": sr})
    bf16 = {**base, "model": {**base["model"], "dtype": "bfloat16"}, "train": sr}
    assert from_dict(bf16).train.stochastic_rounding
