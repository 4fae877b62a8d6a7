"""Decoder language models (OPT, Llama) from Hugging Face ``transformers`` as block models.

Blocks: the stem is the token embeddings (+ learned positions for OPT), one block per decoder
layer, the head is the final norm + LM head. A model comes from a named preset with seeded
random initialisation (``model.preset``) or from a local checkpoint directory
(``model.checkpoint``, ``from_pretrained`` on a path; nothing is ever downloaded).

Tied embeddings (OPT): the LM head's weight *is* the stem's embedding matrix. ``blocks.py``
gives a tensor shared by several blocks to the first of them, so the tied matrix belongs to the
stem: it is counted, sent and trained once, by the stem's trainer.

Every decoder block rebuilds the causal mask (``None`` with SDPA: causal attention, no padding,
as sequences are packed) and, for Llama, the rotary position embeddings from its input, so
blocks pass one tensor (the hidden states) to the next. Dropout is off so that a run is
determined by its seeds (dropout would draw from torch's process-wide generator).
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable
from types import ModuleType
from typing import Any

import torch
from torch import nn

from snake_mpi.blocks import BlockModel
from snake_mpi.config import ModelConfig
from snake_mpi.models.lm_presets import ModelSpecError, checkpoint_config, preset

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _transformers() -> ModuleType:
    # Nothing is downloaded at run time: keep the Hugging Face hub off even if asked.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    try:
        import transformers
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise ModelSpecError(
            "model.family 'lm' needs Hugging Face transformers: pip install 'snake-mpi[llm]'"
        ) from None
    return transformers


_PRELOAD_LOCK = threading.Lock()


def preload() -> None:
    """Import transformers and the model classes now (so that a memory baseline taken next
    includes the libraries, not just the interpreter). Under a lock: transformers' lazy
    imports are not thread-safe, and in-process ranks (``ThreadWorld``) call this at once."""
    with _PRELOAD_LOCK:
        tf = _transformers()
        _ = (tf.OPTForCausalLM, tf.LlamaForCausalLM)
        from transformers.masking_utils import create_causal_mask  # noqa: F401


def hf_config(cfg: ModelConfig) -> Any:
    """The ``transformers`` config of the preset or checkpoint, with SDPA attention and no
    dropout."""
    tf = _transformers()
    if cfg.checkpoint:
        raw = checkpoint_config(cfg.checkpoint)
        conf = tf.AutoConfig.from_pretrained(cfg.checkpoint, local_files_only=True)
        family = raw["model_type"]
    else:
        family, kwargs = preset(cfg.preset)
        cls = tf.OPTConfig if family == "opt" else tf.LlamaConfig
        conf = cls(**kwargs)
    for key in ("dropout", "attention_dropout", "activation_dropout", "layerdrop"):
        if hasattr(conf, key):
            setattr(conf, key, 0.0)
    conf.use_cache = False
    conf._attn_implementation = "sdpa"
    conf.snake_family = family
    return conf


def causal_lm(cfg: ModelConfig, *, device: str | torch.device = "cpu") -> nn.Module:
    """The whole ``*ForCausalLM`` (random init under torch's current seed, or the checkpoint),
    built directly in ``model.dtype`` (a bf16 model never exists in fp32 first)."""
    tf = _transformers()
    conf = hf_config(cfg)
    if cfg.checkpoint:
        model = tf.AutoModelForCausalLM.from_pretrained(
            cfg.checkpoint,
            config=conf,
            local_files_only=True,
            dtype=DTYPES.get(cfg.dtype, torch.float32),
            attn_implementation="sdpa",
        )
        return model
    cls = tf.OPTForCausalLM if conf.snake_family == "opt" else tf.LlamaForCausalLM
    with torch.device(device):
        return cls._from_config(conf, dtype=DTYPES.get(cfg.dtype, torch.float32))


def causal_lm_by_layer(
    cfg: ModelConfig, on_layer: Callable[[int, nn.Module], nn.Module | None]
) -> nn.Module:
    """``causal_lm`` of a preset with the same weights to the bit, made one module at a time:
    built on the meta device, then every module given its memory just before Hugging Face
    initialises it, and ``on_layer(i, layer)`` called as soon as decoder layer ``i`` is
    initialised (e.g. to quantise it; a module it returns takes the layer's place), so the
    whole model in ``model.dtype`` never exists at once. The random draws are the ones
    ``causal_lm`` makes, in its order: constructing a module on the CPU draws its PyTorch
    default initialisation (replayed into scratch tensors here), and each ``PreTrainedModel``
    initialises its own modules at the end of its construction (tested: every tensor and
    buffer equal for the OPT and Llama presets)."""
    if cfg.checkpoint:
        raise ValueError("a checkpoint's weights are loaded whole: build it with causal_lm")
    lm = causal_lm(cfg, device="meta")
    layers = layers_of(lm)
    index = {id(layer): i for i, layer in enumerate(layers)}

    def done(i: int, layer: nn.Module) -> None:
        new = on_layer(i, layer)
        if new is not None:
            layers[i] = new

    _replay(lm, index, done)
    return lm


def layers_of(lm: Any) -> nn.ModuleList:
    """The decoder layers of an OPT or Llama ``*ForCausalLM``."""
    return lm.model.decoder.layers if hasattr(lm.model, "decoder") else lm.model.layers


def _construction_draws(mod: nn.Module) -> None:
    """Draw what constructing ``mod`` on the CPU drew (PyTorch's default initialisation of a
    linear or embedding layer), into scratch tensors of its shapes and dtypes."""
    if isinstance(mod, nn.Linear):
        nn.init.kaiming_uniform_(torch.empty_like(mod.weight, device="cpu"), a=math.sqrt(5))
        if mod.bias is not None:
            bound = 1 / math.sqrt(mod.in_features) if mod.in_features > 0 else 0
            nn.init.uniform_(torch.empty_like(mod.bias, device="cpu"), -bound, bound)
    elif isinstance(mod, nn.Embedding):
        nn.init.normal_(torch.empty_like(mod.weight, device="cpu"))


def _replay(
    mod: nn.Module, index: dict[int, int], on_layer: Callable[[int, nn.Module], None]
) -> None:
    """Construction order: the module's own draws, its children's in turn, then (a
    ``PreTrainedModel``) its initialisation, with each module materialised just before."""
    tf = _transformers()
    _construction_draws(mod)
    for child in mod.children():
        _replay(child, index, on_layer)
    if not isinstance(mod, tf.PreTrainedModel):
        return
    subs = [m for m in mod.modules() if isinstance(m, tf.PreTrainedModel)]
    for sub in subs:

        def init(module: nn.Module, is_custom_code: bool = False, _own: Any = sub) -> None:
            if getattr(module, "_is_hf_initialized", False):
                return
            own = list(module.parameters(recurse=False)) + list(module.buffers(recurse=False))
            if any(t.is_meta for t in own):
                module.to_empty(device="cpu", recurse=False)
            type(_own)._initialize_weights(_own, module, is_custom_code)
            if id(module) in index:
                on_layer(index[id(module)], module)

        sub._initialize_weights = init
    try:
        mod.initialize_weights()
    finally:
        for sub in subs:
            del sub._initialize_weights
    mod.tie_weights()


def count_params(cfg: ModelConfig) -> dict[str, Any]:
    """Parameter count per block on the meta device (no memory, e.g. Llama-3-8B), each tensor
    once: ``{"names": [...], "params": [...], "total": int, "tied": bool}``."""
    with torch.device("meta"):
        model = to_blocks(causal_lm(cfg, device="meta"))
    from snake_mpi.blocks import block_params

    params = [block_params(model, b) for b in range(model.n_blocks)]
    return {
        "names": list(model.names),
        "params": params,
        "total": sum(params),
        "tied": model.tied_tensors() > 0,
    }


class OPTStem(nn.Module):
    """Token embeddings (+ projection) + learned positions: token ids -> hidden states."""

    def __init__(self, decoder: Any) -> None:
        super().__init__()
        self.embed_tokens = decoder.embed_tokens
        self.embed_positions = decoder.embed_positions
        self.project_in = decoder.project_in

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(ids)
        if self.project_in is not None:
            x = self.project_in(x)
        pos = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0).expand(ids.shape[0], -1)
        mask = torch.ones(ids.shape, dtype=torch.long, device=ids.device)
        return x + self.embed_positions(mask, 0, position_ids=pos).to(x.dtype)


class LlamaStem(nn.Module):
    """Token embeddings: token ids -> hidden states (positions are rotary, inside each layer)."""

    def __init__(self, model: Any) -> None:
        super().__init__()
        self.embed_tokens = model.embed_tokens

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(ids)


class DecoderBlock(nn.Module):
    """One decoder layer, with the causal mask (and rotary embedding) made from its input."""

    _conf: Any
    _rotary: nn.Module | None

    def __init__(self, layer: nn.Module, conf: Any, rotary: nn.Module | None) -> None:
        super().__init__()
        self.layer = layer
        # Plain attributes, not submodules: neither is state that travels or trains.
        object.__setattr__(self, "_conf", conf)
        object.__setattr__(self, "_rotary", rotary)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        from transformers.masking_utils import create_causal_mask

        pos = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
        mask = create_causal_mask(
            config=self._conf, inputs_embeds=h, attention_mask=None, cache=None, position_ids=pos
        )
        kw = {}
        if self._rotary is not None:
            kw["position_embeddings"] = self._rotary(h, position_ids=pos)
        out = self.layer(h, attention_mask=mask, position_ids=pos, **kw)
        return out[0] if isinstance(out, tuple) else out


class LMHead(nn.Module):
    """Final norm (+ OPT's output projection) + LM head: hidden states -> logits (B, T, V)."""

    def __init__(self, norm: nn.Module | None, project_out: nn.Module | None, lm_head: nn.Module):
        super().__init__()
        self.norm = norm
        self.project_out = project_out
        self.lm_head = lm_head

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.norm is not None:
            h = self.norm(h)
        if self.project_out is not None:
            h = self.project_out(h)
        return self.lm_head(h)


def to_blocks(lm: Any) -> BlockModel:
    """Re-house the modules of a ``*ForCausalLM`` as stem, decoder layers, head (shared, not
    copied: tied weights stay tied)."""
    conf = lm.config
    family = getattr(conf, "snake_family", conf.model_type)
    if family == "opt":
        dec = lm.model.decoder
        stem: nn.Module = OPTStem(dec)
        rotary = None
        head = LMHead(dec.final_layer_norm, dec.project_out, lm.lm_head)
        layers = dec.layers
    else:
        inner = lm.model
        stem = LlamaStem(inner)
        rotary = None  # on the meta device (counting only) it is not needed
        if next(iter(lm.parameters())).device.type != "meta":
            with torch.device("cpu"):
                rotary = type(inner.rotary_emb)(config=conf)  # fp32, whatever the model's dtype
        head = LMHead(inner.norm, None, lm.lm_head)
        layers = inner.layers
    blocks = [("embed", stem)]
    blocks += [(f"layer{i}", DecoderBlock(layer, conf, rotary)) for i, layer in enumerate(layers)]
    blocks.append(("head", head))
    model = BlockModel(blocks)
    model.lm_config = conf
    return model


def build(
    cfg: ModelConfig,
    *,
    vocab_size: int,
    int8_layers: tuple[frozenset[int], frozenset[int]] | None = None,
) -> BlockModel:
    """The configured LM as a block model in ``model.dtype`` (random init under torch's current
    seed, or the checkpoint's weights); ``vocab_size`` is the tokenizer's, which must fit.

    ``int8_layers = (quantised, kept)`` (a preset, ``snake.frozen_weights = "int8"``): the
    decoder layers ``quantised`` are made weight-only int8 as soon as each is initialised
    (``causal_lm_by_layer``), those also in ``kept`` after a copy is taken; the copies, as
    blocks, are ``model.int8_masters`` (block id -> module; ``schemes.frozen``)."""
    if cfg.dtype not in DTYPES:
        raise ModelSpecError(
            f"unknown model.dtype {cfg.dtype!r}; choose one of: {', '.join(DTYPES)}"
        )
    masters: dict[int, nn.Module] = {}
    if int8_layers is None or cfg.checkpoint:
        model = to_blocks(causal_lm(cfg))
    else:
        from snake_mpi.blocks import copy_modules
        from snake_mpi.models.int8 import quantize_linears

        quantised, kept = int8_layers

        def on_layer(i: int, layer: nn.Module) -> nn.Module | None:
            if i not in quantised:
                return None
            if i in kept:  # the initialised layer is the master; the model gets a copy
                masters[i] = layer
                layer = copy_modules({i: layer})[i]
            quantize_linears(layer)
            return layer

        lm = causal_lm_by_layer(cfg, on_layer)
        model = to_blocks(lm)
    if masters:
        conf = model.lm_config
        first = model.blocks[1]
        assert isinstance(first, DecoderBlock)
        rotary = first._rotary
        model.int8_masters = {i + 1: DecoderBlock(m, conf, rotary) for i, m in masters.items()}
    have = model.lm_config.vocab_size
    if vocab_size > have:
        raise ModelSpecError(
            f"the tokenizer has {vocab_size} tokens but the model's vocabulary has {have}"
        )
    return model.to(DTYPES[cfg.dtype])
