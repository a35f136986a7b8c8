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

from . import fp8


def materialize_weight(weight: torch.Tensor, scale: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """The real weight in `dtype`: stored weight (maybe float8) times its scale."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(dtype)
    return w


class _FrozenLinearFn(torch.autograd.Function):
    """y = x @ W.T + b for a frozen W, keeping no cast copy of the weight in the graph.
    A resident weight is read again in backward (it may be an inference tensor of the
    model ComfyUI loaded, which autograd cannot save). An offloaded layer's staged copy
    is saved instead: inside its checkpointed block it lives only while that block is
    recomputed and differentiated, so the weight is brought in twice per step
    (forward, recompute), not three times."""

    @staticmethod
    def forward(ctx, x, layer, bias):
        weight, scale = layer.fetch_weight()
        ctx.layer = layer
        ctx.save_for_backward(weight if layer.offloader is not None else None)
        return layer.base_matmul(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        (staged,) = ctx.saved_tensors
        weight = layer.weight if staged is None else staged
        if layer.fp8_backward:
            return fp8.grad_input_fp8(grad_out, weight, layer.fp8_weight_scale, grad_out.dtype,
                                      weight_column_major=layer.fp8_weight_t,
                                      rowwise=layer.fp8_grad_rowwise), None, None
        return grad_out @ materialize_weight(weight, layer.weight_scale, grad_out.dtype), None, None


class FrozenLinear(nn.Module):
    """A Linear whose base weight is frozen and may be stored in float8.

    `lora`, when set, is an adapter module mapping the layer input to a delta of the
    output (fluxtrain.lora, fluxtrain.adapters). An adapter that also has
    `input_scale(weight, weight_scale, dtype)` (DoRA's magnitude per input column) gets
    the layer input multiplied by 1 + that first, for the base matmul and itself alike.
    Computation runs in the dtype of the input.
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
        # Float8 tensor-core matmuls (fluxtrain.fp8.enable_fp8_compute sets these).
        self.fp8_compute = False
        self.fp8_backward = False
        self.fp8_weight_scale: torch.Tensor | None = None
        self.fp8_weight_t: torch.Tensor | None = None   # kept column-major copy (fast mode)
        self.fp8_recipe = fp8.Fp8Recipe()
        self.fp8_grad_rowwise = False
        # Offloaded layers (fluxtrain.offload): `weight` stays in host memory and the
        # offloader places a device copy in `staged_weight` while the layer's block runs.
        self.offloader = None
        self.staged_weight: torch.Tensor | None = None

    def fetch_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored weight on the compute device, its scale)."""
        if self.staged_weight is not None:
            return self.staged_weight, self.weight_scale
        if self.offloader is not None:
            raise RuntimeError(f"{self!r} is offloaded but ran outside its block's staging: "
                               "offloaded layers only run inside their transformer block")
        return self.weight, self.weight_scale

    def base_matmul(self, x, weight, scale, bias):
        """x @ (weight * scale).T + bias, in float8 when enabled, else by casting."""
        if self.fp8_compute:
            return fp8.linear_fp8(x, weight, self.fp8_weight_scale, bias, x.dtype, self.fp8_recipe)
        return F.linear(x, materialize_weight(weight, scale, x.dtype),
                        None if bias is None else bias.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_scale = getattr(self.lora, "input_scale", None)
        if input_scale is not None:
            x = x + x * input_scale(*self.fetch_weight(), x.dtype)
        if torch.is_grad_enabled() and x.requires_grad:
            y = _FrozenLinearFn.apply(x, self, self.bias)
        else:
            y = self.base_matmul(x, *self.fetch_weight(), self.bias)
        if self.lora is not None:
            y = y + self.lora(x)
        return y

    def extra_repr(self) -> str:
        scaled = ", scaled" if self.weight_scale is not None else ""
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight.dtype}{scaled}")
