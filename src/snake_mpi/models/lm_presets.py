"""Named decoder-LM configurations (published sizes, and tiny ones for tests) and the layer count
of a model config, without importing ``transformers`` (config validation needs only this)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    # OPT (Zhang et al. 2022): facebook/opt-125m and facebook/opt-1.3b config.json sizes.
    "opt-125m": (
        "opt",
        dict(
            hidden_size=768,
            num_hidden_layers=12,
            ffn_dim=3072,
            num_attention_heads=12,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=768,
        ),
    ),
    "opt-1.3b": (
        "opt",
        dict(
            hidden_size=2048,
            num_hidden_layers=24,
            ffn_dim=8192,
            num_attention_heads=32,
            vocab_size=50272,
            max_position_embeddings=2048,
            word_embed_proj_dim=2048,
        ),
    ),
    # Llama 3 8B (meta-llama/Meta-Llama-3-8B config.json): GQA with 8 KV heads, untied head.
    "llama-3-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            max_position_embeddings=8192,
            rope_theta=500000.0,
            rms_norm_eps=1e-5,
            tie_word_embeddings=False,
        ),
    ),
    # Tiny models of the same families for tests and the CI-time benchmark (byte vocabulary).
    "opt-tiny": (
        "opt",
        dict(
            hidden_size=64,
            num_hidden_layers=4,
            ffn_dim=256,
            num_attention_heads=4,
            vocab_size=256,
            max_position_embeddings=512,
            word_embed_proj_dim=64,
        ),
    ),
    "llama-tiny": (
        "llama",
        dict(
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=256,
            max_position_embeddings=512,
            tie_word_embeddings=False,
        ),
    ),
}
"""name -> (family, ``transformers`` config keyword arguments)."""

PUBLISHED_PARAMS = {
    "opt-125m": 125_239_296,
    "opt-1.3b": 1_315_758_080,
    "llama-3-8b": 8_030_261_248,
}
"""Parameter counts of the released checkpoints (tied embeddings counted once)."""


class ModelSpecError(ValueError):
    """An unknown preset, or a checkpoint directory that is missing or unreadable."""


def preset(name: str) -> tuple[str, dict[str, Any]]:
    """The family and config keywords of preset ``name``, or a ModelSpecError listing them."""
    try:
        family, kwargs = PRESETS[name]
    except KeyError:
        raise ModelSpecError(
            f"unknown model.preset {name!r}; known presets: {', '.join(sorted(PRESETS))}"
        ) from None
    return family, dict(kwargs)


def checkpoint_config(path: str) -> dict[str, Any]:
    """``config.json`` of a local checkpoint directory (never downloaded)."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelSpecError(
            f"model.checkpoint {path!r} is not a directory: give a local directory saved by "
            "transformers' save_pretrained (config.json + weights); nothing is downloaded"
        )
    cfg_file = p / "config.json"
    try:
        data = json.loads(cfg_file.read_text())
    except FileNotFoundError:
        raise ModelSpecError(f"model.checkpoint {path!r} has no config.json") from None
    except (OSError, json.JSONDecodeError) as e:
        raise ModelSpecError(f"model.checkpoint {path!r}: cannot read config.json: {e}") from None
    kind = data.get("model_type")
    if kind not in ("opt", "llama"):
        raise ModelSpecError(
            f"model.checkpoint {path!r} is a {kind!r} model; supported: opt, llama"
        )
    return data


def n_layers(preset_name: str, checkpoint: str) -> int:
    """Decoder layers (= middle blocks) of a preset or a checkpoint."""
    if checkpoint:
        return int(checkpoint_config(checkpoint)["num_hidden_layers"])
    return int(preset(preset_name)[1]["num_hidden_layers"])
