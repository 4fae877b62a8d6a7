"""Decoder language models as block models: block tables, tied weights, bit-exact transfers in
fp32 and bf16, equivalence with the Hugging Face forward pass, presets' parameter counts, local
checkpoints, the text data, and clear errors. No MPI here (see test_mpi_lm.py)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from snake_mpi.blocks import (  # noqa: E402
    block_table,
    flatten,
    model_hash,
    set_trainable,
    unflatten,
)
from snake_mpi.config import ConfigError, ModelConfig, TrainConfig, from_dict  # noqa: E402
from snake_mpi.data import DataError  # noqa: E402
from snake_mpi.data.text import Tokenizer, corpus_files, is_test_file, load_text  # noqa: E402
from snake_mpi.models import build_model  # noqa: E402
from snake_mpi.models.lm import causal_lm, count_params, to_blocks  # noqa: E402
from snake_mpi.models.lm_presets import PUBLISHED_PARAMS, ModelSpecError  # noqa: E402
from snake_mpi.schemes.rules import check, validate_for_world  # noqa: E402
from snake_mpi.train import evaluate, train_local  # noqa: E402


def lm(preset: str, seed: int = 0, dtype: str = "float32"):
    cfg = ModelConfig(family="lm", preset=preset, dtype=dtype)
    return build_model(cfg, sample_shape=(1,), n_classes=256, seed=seed)


def hf_param_count(preset: str) -> int:
    model = causal_lm(ModelConfig(family="lm", preset=preset))
    return model.num_parameters()  # transformers counts tied weights once


@pytest.mark.parametrize("preset", ["opt-tiny", "llama-tiny"])
def test_block_table_sums_to_the_model_and_counts_tied_weights_once(preset):
    model = lm(preset)
    t = block_table(model)
    assert list(t["name"]) == ["embed", "layer0", "layer1", "layer2", "layer3", "head"]
    assert list(t["role"]) == ["stem"] + ["middle"] * 4 + ["head"]
    assert int(t["params"].sum()) == hf_param_count(preset)
    assert int(t["params"].sum()) == sum(p.numel() for p in model.parameters())
    assert int(t["bytes"].sum()) == 4 * int(t["params"].sum())  # fp32, no buffers
    head = model.blocks[-1]
    if preset == "opt-tiny":  # tied: the LM head's matrix is the stem's, counted in the stem
        assert head.lm_head.weight is model.blocks[0].embed_tokens.weight
        assert model.tied_tensors() == 1
        assert int(t["params"][-1]) == 2 * 64  # only the final layer norm's weight and bias
    else:
        assert model.tied_tensors() == 0
        assert int(t["params"][-1]) == 64 + 64 * 256  # RMS norm + untied LM head


@pytest.mark.parametrize("preset", ["opt-tiny", "llama-tiny"])
def test_blocks_compute_exactly_the_hugging_face_forward_and_are_causal(preset):
    torch.manual_seed(3)
    whole = causal_lm(ModelConfig(family="lm", preset=preset)).eval()
    blocks = to_blocks(whole).eval()
    ids = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = whole(input_ids=ids).logits
        got = blocks(ids)
        assert torch.equal(got, want)
        later = ids.clone()
        later[:, 12:] = (later[:, 12:] + 1) % 256
        moved = blocks(later)
    assert torch.equal(moved[:, :12], got[:, :12])  # no position sees a later token
    assert not torch.equal(moved[:, 12:], got[:, 12:])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("preset", ["opt-tiny", "llama-tiny"])
def test_flatten_unflatten_round_trip_is_bit_exact(preset, dtype):
    a, b = lm(preset, seed=1, dtype=dtype), lm(preset, seed=2, dtype=dtype)
    assert model_hash(a) != model_hash(b)
    ids = range(a.n_blocks)
    payload, sizes = flatten(a, ids)
    table = block_table(a)
    assert payload.nbytes == int(table["bytes"].sum())
    assert set(table["dtype"]) == {dtype}
    per_value = 2 if dtype == "bfloat16" else 4
    assert payload.nbytes == per_value * sum(p.numel() for p in a.parameters())
    unflatten(b, ids, payload, sizes)
    assert model_hash(b) == model_hash(a)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert pb.dtype == getattr(torch, dtype)
        assert torch.equal(pa.view(torch.uint8), pb.view(torch.uint8))
    if preset == "opt-tiny":  # the received stem also updated the (tied) LM head
        assert b.blocks[-1].lm_head.weight is b.blocks[0].embed_tokens.weight


def test_the_tied_matrix_trains_with_the_stem_only():
    model = lm("opt-tiny", seed=4)
    x = torch.randint(0, 256, (8, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    cfg = TrainConfig(local_steps=2, batch_size=4, lr=0.01, optimizer="adamw")
    tied = model.blocks[0].embed_tokens.weight
    before = tied.detach().clone()
    res = train_local(model, [5], x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert torch.equal(tied, before)  # the head trains its norm, not the stem's matrix
    assert res.trainable_params == 128
    train_local(model, [0], x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(tied, before)
    assert model.blocks[-1].lm_head.weight is tied
    assert set_trainable(model, []) == []


def test_bf16_training_keeps_bf16_weights_with_fp32_optimiser_state():
    model = lm("llama-tiny", seed=5, dtype="bfloat16")
    x = torch.randint(0, 256, (16, 16), generator=torch.Generator().manual_seed(0))
    y = torch.roll(x, -1, dims=1)
    cfg = TrainConfig(local_steps=8, batch_size=8, lr=0.01, optimizer="adamw", weight_decay=0.0)
    loss0, _ = evaluate(model, x, y)
    res = train_local(model, [1, 2], x, y, cfg=cfg, generator=torch.Generator().manual_seed(0))
    loss1, _ = evaluate(model, x, y)
    assert loss1 < loss0
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    p = res.trainable_params
    assert p == 2 * 46208
    weights = sum(t.numel() * 2 for t in model.parameters())  # bf16 weights held
    # fp32 master (4) + its gradient (4) + Adam's two moments (8) per trainable parameter, plus
    # AdamW's 4-byte step counter per tensor
    n_tensors = sum(1 for b in (1, 2) for _ in model.blocks[b].parameters())
    assert res.train_state_bytes == weights + 16 * p + 4 * n_tensors


def test_meta_device_counts_equal_the_published_parameter_counts():
    # OPT-1.3B 1,315,758,080; OPT-125M 125,239,296; Llama-3-8B 8,030,261,248 (no memory used)
    for preset, published in PUBLISHED_PARAMS.items():
        counted = count_params(ModelConfig(family="lm", preset=preset))
        assert counted["total"] == published, preset
        assert counted["tied"] == preset.startswith("opt")
    llama = count_params(ModelConfig(family="lm", preset="llama-3-8b"))
    assert len(llama["params"]) == 34 and llama["params"][1] == 218_112_000


def test_a_local_checkpoint_loads_with_its_weights(tmp_path):
    torch.manual_seed(7)
    saved = causal_lm(ModelConfig(family="lm", preset="llama-tiny")).eval()
    saved.save_pretrained(tmp_path / "ckpt")
    cfg = ModelConfig(family="lm", checkpoint=str(tmp_path / "ckpt"))
    loaded = build_model(cfg, sample_shape=(1,), n_classes=256, seed=0).eval()
    ids = torch.randint(0, 256, (1, 10))
    with torch.no_grad():
        assert torch.equal(loaded(ids), saved(input_ids=ids).logits)


def base_lm_config(**over):
    raw = {
        "scheme": "snake",
        "model": {"family": "lm", "preset": "opt-tiny"},
        "data": {"name": "text"},
    }
    for key, value in over.items():
        section, name = key.split("__")
        raw.setdefault(section, {})[name] = value
    return raw


def test_unknown_preset_and_missing_checkpoint_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown model.preset 'opt-7b'; known presets: "):
        check(from_dict(base_lm_config(model__preset="opt-7b")))
    missing = tmp_path / "nowhere"
    cfg = check(from_dict(base_lm_config(model__preset="", model__checkpoint=str(missing))))

    with pytest.raises(ConfigError, match=r"model.checkpoint .*nowhere.* is not a directory"):
        validate_for_world(cfg, 2)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelSpecError, match="has no config.json"):
        build_model(
            dataclasses.replace(cfg.model, checkpoint=str(tmp_path / "empty")),
            sample_shape=(1,),
            n_classes=256,
            seed=0,
        )
    with pytest.raises(ConfigError, match="exactly one of model.preset"):
        from_dict(base_lm_config(model__checkpoint=str(tmp_path)))
    with pytest.raises(ConfigError, match="go together"):
        from_dict(base_lm_config(data__name="synthetic"))
    with pytest.raises(ConfigError, match="does not support language models"):
        check(from_dict(base_lm_config() | {"scheme": "split"}))


def test_a_tokenizer_larger_than_the_vocabulary_is_refused():
    with pytest.raises(ModelSpecError, match="tokenizer has 300 tokens but the model's"):
        build_model(
            ModelConfig(family="lm", preset="opt-tiny"), sample_shape=(1,), n_classes=300, seed=0
        )


def write_corpus(root, n_files=40, size=400):
    root.mkdir()
    for i in range(n_files):
        (root / f"f{i:02d}.txt").write_bytes(bytes((i + k) % 97 + 30 for k in range(size)))
    (root / "skip.bin").write_bytes(b"\0" * 1000)
    return root


def test_text_sequences_are_byte_tokens_shifted_by_one_with_held_out_files(tmp_path):
    root = write_corpus(tmp_path / "corpus")
    files = corpus_files(root)
    assert [f.name for f in files] == [f"f{i:02d}.txt" for i in range(40)]  # not skip.bin
    held = [f for f in files if is_test_file(root, f)]
    assert 0 < len(held) < len(files)
    d = load_text(str(root), n_train=50, n_test=2, seq_len=16, tokenizer=Tokenizer())
    assert d.x_train.shape == (50, 16) and d.y_train.shape == (50, 16)
    assert d.x_train.dtype == torch.int64 and d.n_classes == 256
    assert torch.equal(d.x_train[:, 1:], d.y_train[:, :-1])
    first = files[0] if files[0] not in held else files[1]
    assert d.x_train[0].tolist() == list(first.read_bytes()[:16])
    test_bytes = b"".join(f.read_bytes() + b"\n" for f in held)
    assert d.x_test[0].tolist() == list(test_bytes[:16])


def test_too_little_text_and_a_missing_corpus_are_clear_errors(tmp_path):
    root = write_corpus(tmp_path / "corpus", n_files=12, size=50)
    with pytest.raises(DataError, match=r"training tokens; 100 sequences of 16 \+ 1 tokens need"):
        load_text(str(root), n_train=100, n_test=1, seq_len=16, tokenizer=Tokenizer())
    with pytest.raises(DataError, match="neither a file nor a directory"):
        load_text(str(tmp_path / "no"), n_train=1, n_test=1, seq_len=4, tokenizer=Tokenizer())


def test_the_default_corpus_is_the_standard_library():
    d = load_text("", n_train=8, n_test=2, seq_len=32, tokenizer=Tokenizer())
    text = bytes(d.x_train.flatten().tolist())
    assert text.isascii() and np.unique(d.x_train.numpy()).size > 20


def test_memory_accounting_for_opt_1_3b_beside_the_paper(capsys):
    from snake_mpi.analysis.memory import block_counts, held_bytes, main, rows_for

    cfg = from_dict(base_lm_config(model__preset="opt-1.3b", snake__ends="frozen"))
    counts = block_counts(cfg)
    assert counts.total == 1_315_758_080 and len(counts.params) == 26
    rows = rows_for(cfg, counts, [6])
    full, node = rows[0], rows[1]
    assert full.paper_bytes == 16 * counts.total  # 19.61 GiB (the paper's 19.37: 1.3e9 x 16)
    assert node.trainable == 4 * 50_358_272  # 24 layers over 6 nodes, ends frozen
    assert node.paper_bytes == 16 * node.trainable  # 3.00 GiB (the paper: 3.13 GB)
    assert node.held_bytes == 4 * counts.total + 12 * node.trainable  # frozen weights kept
    assert held_bytes(10, 4, 2) == 2 * 10 + 16 * 4  # bf16: fp32 master, grad, moments
    assert (
        main(
            [
                "/dev/null",
                "--set",
                'model.family="lm"',
                "--set",
                'data.name="text"',
                "--set",
                'model.preset="opt-1.3b"',
                "--nodes",
                "6",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "1,315,758,080 parameters in 26 blocks" in out
    assert "19.37 GB full fine-tuning, 3.13 GB per Snake node" in out
    assert main(["/dev/null", "--nodes", "zero"]) == 2


def test_a_checkpoint_with_a_tokenizer_tokenizes_the_text(tmp_path):
    """data.tokenizer = auto takes the checkpoint's tokenizer where it has one (made here with
    the tokenizers library: nothing downloaded), else bytes."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from snake_mpi.config import DataConfig
    from snake_mpi.data import load_dataset

    root = write_corpus(tmp_path / "corpus", n_files=30, size=300)
    tok = HFTokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>", "</s>"])
    tok.train([str(f) for f in corpus_files(root)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")
    ckpt = tmp_path / "ckpt"
    torch.manual_seed(0)
    causal_lm(ModelConfig(family="lm", preset="llama-tiny")).save_pretrained(ckpt)
    fast.save_pretrained(ckpt)
    d = DataConfig(name="text", path=str(root), seq_len=8, n_train=20, n_test=2)
    with_tok = load_dataset(d, 0, checkpoint=str(ckpt))
    assert with_tok.n_classes == len(fast) <= 256
    first = sorted(f for f in corpus_files(root) if not is_test_file(root, f))[0]
    assert with_tok.x_train[0].tolist() == fast(first.read_text())["input_ids"][:8]
    as_bytes = load_dataset(dataclasses.replace(d, tokenizer="bytes"), 0, checkpoint=str(ckpt))
    assert as_bytes.n_classes == 256
    assert as_bytes.x_train[0].tolist() == list(first.read_bytes()[:8])
    model = build_model(
        ModelConfig(family="lm", checkpoint=str(ckpt)),
        sample_shape=(1,),
        n_classes=with_tok.n_classes,
        seed=0,
    )
    loss, _ = evaluate(model, with_tok.x_test, with_tok.y_test)
    assert np.isfinite(loss)
