"""FrozenLinear: the one module that owns base-model weights.

Every concern about how a frozen weight is stored and brought to compute lives
here, not in the transformer blocks: float8 storage with an optional per-tensor
scale (ComfyUI's scaled-fp8 files), the cast to the compute dtype at call time,
float8 tensor-core matmuls (`Fp8Compute`, turned on by `enable_fp8_compute`; the
kernels are fluxtrain.fp8's), a weight streamed from host memory (`Streamed`, set
by fluxtrain.offload), and the adapter slot. Training never builds a bf16 copy of
the whole model: the cast copy of a weight lives only while its matmul runs, and
backward casts again instead of keeping the copy alive in the autograd graph.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import fp8

log = logging.getLogger(__name__)


def materialize_weight(weight: torch.Tensor, scale: torch.Tensor | None,
                       dtype: torch.dtype) -> torch.Tensor:
    """The real weight in `dtype`: stored weight (maybe float8) times its scale."""
    w = weight.to(dtype)
    if scale is not None:
        w = w * scale.to(dtype)
    return w


@dataclass
class Fp8Compute:
    """How a layer's matmuls run on float8 tensor cores."""
    recipe: fp8.Fp8Recipe
    weight_scale: torch.Tensor            # float32 scale of the stored weight
    backward: bool                        # the input-gradient in float8 too
    grad_rowwise: bool                    # per-row scales for that gradient
    weight_t: torch.Tensor | None = None  # a kept column-major copy (fast mode), or None


class Streamed:
    """An offloaded layer's weight source: `weight` stays in host memory and the
    offloader puts a device copy in `staged` while the layer's block runs."""

    def __init__(self, offloader):
        self.offloader = offloader
        self.staged: torch.Tensor | None = None


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
        ctx.save_for_backward(weight if layer.streamed is not None else None)
        return layer.base_matmul(x, weight, scale, bias)

    @staticmethod
    def backward(ctx, grad_out):
        layer = ctx.layer
        (staged,) = ctx.saved_tensors
        weight = layer.weight if staged is None else staged
        f8 = layer.fp8
        if f8 is not None and f8.backward:
            return fp8.grad_input_fp8(grad_out, weight, f8.weight_scale, grad_out.dtype,
                                      weight_column_major=f8.weight_t,
                                      rowwise=f8.grad_rowwise), None, None
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
        # Every state the layer can be in besides its weight: float8 matmuls or the cast
        # path (None), and resident or streamed from host memory (None).
        self.fp8: Fp8Compute | None = None
        self.streamed: Streamed | None = None

    def fetch_weight(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored weight on the compute device, its scale)."""
        if self.streamed is None:
            return self.weight, self.weight_scale
        if self.streamed.staged is None:
            raise RuntimeError(f"{self!r} is offloaded but ran outside its block's staging: "
                               "offloaded layers only run inside their transformer block")
        return self.streamed.staged, self.weight_scale

    def base_matmul(self, x, weight, scale, bias):
        """x @ (weight * scale).T + bias, in float8 when enabled, else by casting."""
        if self.fp8 is not None:
            return fp8.linear_fp8(x, weight, self.fp8.weight_scale, bias, x.dtype, self.fp8.recipe)
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
        state = (", float8 matmuls" if self.fp8 is not None else "") + (
            ", streamed" if self.streamed is not None else "")
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, weight={self.weight.dtype}{scaled}{state}")


def fp8_eligible(layer: FrozenLinear) -> bool:
    """A FrozenLinear can run in float8 when its stored weight is e4m3 with a
    per-tensor (or no) scale and both sizes are multiples of 16."""
    w, s = layer.weight, layer.weight_scale
    return (w.dtype == fp8.E4M3 and w.dim() == 2 and w.shape[0] % 16 == 0
            and w.shape[1] % 16 == 0 and (s is None or s.numel() == 1))


def enable_fp8_compute(model: nn.Module, device=None, enabled: bool = True,
                       backward: bool = True, keep_transposed: bool = False,
                       recipe: fp8.Fp8Recipe = fp8.Fp8Recipe(), layers=None) -> int:
    """Route the frozen matmuls of `model` through float8 tensor cores where the
    device supports it. Returns how many layers now compute in float8 (0 when
    disabled or unsupported). Safe to call again to switch off. `backward=False`
    keeps the input-gradient matmul on the bf16-cast path (forward and recompute
    stay float8). `keep_transposed` keeps a column-major copy of every resident
    float8 weight for the input-gradient (one more byte per weight, ~12 GB for
    Flux) instead of transposing each weight in every backward. `recipe` sets the
    scaling granularity, the accumulation and which layers run in float8; per-row
    scales fall back to per-tensor ones where the device has no per-row kernel.
    `layers` (FrozenLinears of `model`) overrides the recipe's choice of layers."""
    if device is None:
        device = next((p.device for p in model.parameters()), torch.device("cpu"))
    on = bool(enabled) and fp8.supports_fp8_matmul(device)
    if enabled and not on:
        log.info("fluxtrain: float8 compute unavailable on %s; using the bf16-cast path", device)
    if on and recipe.rowwise and not fp8.rowwise_supported(device, fp8.E4M3):
        recipe = dataclasses.replace(recipe, rowwise=False)
    grad_rowwise = on and backward and recipe.rowwise and fp8.rowwise_supported(device, fp8.E5M2)
    if layers is None and not recipe.all_layers and hasattr(model, "token_linears"):
        layers = model.token_linears()
    scope = None if layers is None else {id(m) for m in layers}
    count = 0
    for module in model.modules():
        if not isinstance(module, FrozenLinear):
            continue
        module.fp8 = None
        if on and fp8_eligible(module) and (scope is None or id(module) in scope):
            kept = keep_transposed and backward and module.streamed is None
            module.fp8 = Fp8Compute(
                recipe, fp8.weight_scale_f32(module.weight, module.weight_scale, device), backward,
                grad_rowwise, fp8.column_major(module.weight) if kept else None)
            count += 1
    return count
