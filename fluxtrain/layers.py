"""FrozenLinear: the one module that owns base-model weights.

Every concern about how a frozen weight is stored and brought to compute lives
here, not in the transformer blocks: float8 storage with an optional per-tensor
scale (ComfyUI's scaled-fp8 files), the cast to the compute dtype at call time,
and the LoRA slot. Training never builds a bf16 copy of the whole model: the
cast copy of a weight lives only while its matmul runs, and backward casts again
instead of keeping the copy alive in the autograd graph.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def materialize_weight(weight: torch.Tensor, scale: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """The real weight in `dtype`: stored weight (maybe float8) times its scale."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(dtype)
    return w


class _FrozenLinearFn(torch.autograd.Function):
    """y = x @ W.T + b for a frozen W. Saves the *stored* weight (float8 stays
    float8) rather than the cast copy, and casts again in backward."""

    @staticmethod
    def forward(ctx, x, weight, scale, bias):
        w = materialize_weight(weight, scale, x.dtype)
        ctx.save_for_backward(weight, scale)
        ctx.x_dtype = x.dtype
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale = ctx.saved_tensors
        w = materialize_weight(weight, scale, grad_out.dtype)
        return grad_out @ w, None, None, None


class FrozenLinear(nn.Module):
    """A Linear whose base weight is frozen and may be stored in float8.

    `lora`, when set, is a module mapping the layer input to a delta of the
    output (see fluxtrain.lora). Computation runs in the dtype of the input.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 device=None, dtype=None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device,
                                               dtype=dtype), requires_grad=False)
        self.bias = (nn.Parameter(torch.empty(out_features, device=device, dtype=dtype),
                                  requires_grad=False) if bias else None)
        # Per-tensor scale of ComfyUI's scaled-fp8 files; not part of the BFL key layout.
        self.register_buffer("weight_scale", None, persistent=False)
        self.lora: nn.Module | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenLinearFn.apply(x, self.weight, self.weight_scale, self.bias)
        else:
            w = materialize_weight(self.weight, self.weight_scale, x.dtype)
            y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if self.lora is not None:
            y = y + self.lora(x)
        return y

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.weight_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight.dtype}{scaled}")
