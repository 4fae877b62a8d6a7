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

import os
import threading
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


def build(cfg: ModelConfig, *, vocab_size: int) -> BlockModel:
    """The configured LM as a block model in ``model.dtype`` (random init under torch's current
    seed, or the checkpoint's weights); ``vocab_size`` is the tokenizer's, which must fit."""
    if cfg.dtype not in DTYPES:
        raise ModelSpecError(
            f"unknown model.dtype {cfg.dtype!r}; choose one of: {', '.join(DTYPES)}"
        )
    model = to_blocks(causal_lm(cfg))
    have = model.lm_config.vocab_size
    if vocab_size > have:
        raise ModelSpecError(
            f"the tokenizer has {vocab_size} tokens but the model's vocabulary has {have}"
        )
    return model.to(DTYPES[cfg.dtype])
