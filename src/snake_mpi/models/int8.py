"""Frozen linear layers held as weight-only int8: torchao's ``Int8Tensor`` (per output row,
symmetric: ``w ~ scale * q``, ``q`` in [-128, 127]) with its quantised parts as the module's
own tensors, so a block buffer (``blocks.flat_storage``) holds them and a hop carries them as
it carries any block: 1 byte per weight plus 5 bytes per output row, instead of 2 (bf16) or 4.

The layer is never trained (``snake.frozen_weights = "int8"``: the block's owner trains its
own full-precision copy, ``schemes.frozen``). Gradients flow through it to the input; the
backward pass keeps only the int8 tensors and dequantises the weight when it needs it, so the
autograd graph holds 1 byte per weight, not a dequantised copy.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def _torchao() -> tuple[Any, Any]:
    """torchao's ``Int8Tensor`` and ``PerRow`` (imported once, on first use)."""
    try:
        from torchao.quantization.granularity import PerRow
        from torchao.quantization.quantize_.workflows.int8.int8_tensor import Int8Tensor
    except ImportError:  # pragma: no cover - depends on the installed extras
        raise RuntimeError(
            "snake.frozen_weights = 'int8' needs torchao: pip install 'snake-mpi[lean]'"
        ) from None
    return Int8Tensor, PerRow


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """torchao's per-row symmetric int8 of a 2-D weight: ``(qdata int8 [out, in], scale fp32
    [out, 1], zero_point int8 [out, 1])`` (the zero points are 0: symmetric)."""
    int8_tensor, per_row = _torchao()
    w = int8_tensor.from_hp(weight.detach(), per_row())
    return w.qdata, w.scale, w.zero_point


def _weight(
    qdata: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    int8_tensor, _ = _torchao()
    return int8_tensor(qdata, scale, [1, qdata.shape[1]], dtype, zero_point=zero)


class _Int8Linear(torch.autograd.Function):
    """``x @ dequant(W).T`` through torchao's weight-only kernel; saves the int8 tensors only."""

    @staticmethod
    def forward(
        ctx: Any,
        x: torch.Tensor,
        qdata: torch.Tensor,
        scale: torch.Tensor,
        zero: torch.Tensor,
        dtype: torch.dtype,
    ) -> torch.Tensor:
        ctx.save_for_backward(qdata, scale, zero)
        ctx.dtype = dtype
        return F.linear(x, _weight(qdata, scale, zero, dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        qdata, scale, zero = ctx.saved_tensors
        w = _weight(qdata, scale, zero, ctx.dtype).dequantize()
        return grad @ w.to(grad.dtype), None, None, None, None


class Int8Linear(nn.Module):
    """A frozen ``nn.Linear`` as weight-only int8. ``qdata`` is a parameter (never trainable:
    int8), so the block's parameter count is the float layer's; the fp32 scales (held as their
    int32 bits, ``scale_bits``: a model's dtype cast, ``.to(torch.bfloat16)``, leaves them
    whole) and ``zero_point`` are buffers. ``dtype``: the float layer's, the output's."""

    scale_bits: torch.Tensor
    zero_point: torch.Tensor

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        q, s, z = quantize_rows(linear.weight)
        self.qdata = nn.Parameter(q, requires_grad=False)
        self.register_buffer("scale_bits", s.view(torch.int32))
        self.register_buffer("zero_point", z)
        self.bias = linear.bias
        if self.bias is not None:
            self.bias.requires_grad_(False)

    @torch.no_grad()
    def load_from(self, linear: nn.Linear) -> None:
        """Quantise ``linear``'s weight (and copy its bias) into this layer's tensors, in place
        (they may be views into a block buffer)."""
        q, s, z = quantize_rows(linear.weight)
        self.qdata.copy_(q)
        self.scale_bits.copy_(s.view(torch.int32))
        self.zero_point.copy_(z)
        if self.bias is not None:
            self.bias.copy_(linear.bias)

    def dequantized(self) -> torch.Tensor:
        """The weight as the forward pass uses it (``scale * q``, in ``dtype``)."""
        return _weight(self.qdata, self.scale, self.zero_point, self.dtype).dequantize()

    @property
    def scale(self) -> torch.Tensor:
        """The fp32 scale per output row, ``[out, 1]`` (a view of ``scale_bits``)."""
        return self.scale_bits.view(torch.float32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _Int8Linear.apply(x, self.qdata, self.scale, self.zero_point, self.dtype)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 weight"


def quantize_linears(module: nn.Module) -> int:
    """Replace every ``nn.Linear`` inside ``module`` by an ``Int8Linear`` of it; the count."""
    n = 0
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
                n += 1
    return n


@torch.no_grad()
def load_quantized(target: nn.Module, source: nn.Module) -> None:
    """Write ``source`` (the full-precision module ``target`` was quantised from, trained since)
    into ``target`` in place: its linear layers quantised, every other tensor copied."""
    src = dict(source.named_modules())
    for name, mod in target.named_modules():
        if isinstance(mod, Int8Linear):
            mod.load_from(src[name])
            continue
        s = src[name]
        for key, t in list(mod.named_parameters(recurse=False)) + list(
            mod.named_buffers(recurse=False)
        ):
            t.copy_(getattr(s, key))
