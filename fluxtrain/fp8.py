"""Float8 compute for the frozen base matmuls.

A FLUX.1 float8 checkpoint already stores every big weight as float8_e4m3fn. The
plain path casts each weight to bf16 before its matmul, which costs a full pass
over the weight and runs the product at the bf16 rate. On GPUs with float8
tensor cores (compute capability 8.9 and up: Ada, Hopper, Blackwell) the product
can instead run through `torch._scaled_mm` straight on the stored weight:

    forward / recompute:  y  = (x8 * s_x) @ (W8 * s_w).T + b      x8: e4m3, per-tensor s_x
    backward (input):     dx = (g8 * s_g) @ (W8 * s_w)            g8: e5m2, per-tensor s_g

`s_w` is the weight's own scale (1 for a plain float8 file, `scale_weight` for
ComfyUI's scaled fp8); `s_x` and `s_g` are taken from the tensor's absolute
maximum at call time (dynamic scaling), per tensor or, with `Fp8Recipe.rowwise`,
per row (token). The base weight is frozen, so no weight gradient is ever needed;
the LoRA path runs in bf16 elsewhere. `Fp8Recipe` holds the choices that trade
speed against the float8 forward's error (benchmarks/NOTES.md measures them).

This module holds the kernels and the recipe only; a layer's float8 state, and
turning it on for a model (`fluxtrain.layers.enable_fp8_compute`), belong to
FrozenLinear.
"""

from __future__ import annotations

import dataclasses
import logging

import torch

log = logging.getLogger(__name__)

E4M3 = torch.float8_e4m3fn
E5M2 = torch.float8_e5m2
FP8_MAX = {E4M3: 448.0, E5M2: 57344.0}
# Smallest amax we scale by: an all-zero tensor quantises to zeros with a finite scale.
_AMAX_FLOOR = 1e-12


@dataclasses.dataclass(frozen=True)
class Fp8Recipe:
    """How the frozen matmuls run in float8.

    rowwise     one scale per row (token) of the activation and of the output gradient,
                instead of one per tensor: a token far louder than the others no longer
                pushes the quiet ones towards float8's subnormals.
    fast_accum  Hopper's fast accumulation in the forward GEMM (partial sums kept at
                reduced precision); the input-gradient always accumulates exactly.
    all_layers  every eligible layer in float8, instead of only the token-wise linears
                of the transformer blocks (a model's `token_linears()`). The others
                (embedders, modulation, final layer) do a few tenths of a percent of
                the matmul work, but their error is not diluted in the residual stream:
                it starts the stream (img_in, txt_in), is shared by every token
                (modulation, one row per sample), or is the output (final layer).
    """
    rowwise: bool = True
    fast_accum: bool = True
    all_layers: bool = False


def supports_fp8_matmul(device) -> bool:
    """True where `torch._scaled_mm` runs on float8 tensor cores: CUDA devices of
    compute capability 8.9 or newer (not ROCm: its float8 formats differ)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if getattr(torch.version, "hip", None):
        return False
    if not hasattr(torch, "_scaled_mm"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    return tuple(torch.cuda.get_device_capability(index)) >= (8, 9)


def tensor_scale(x: torch.Tensor, fp8_dtype: torch.dtype, rowwise: bool = False) -> torch.Tensor:
    """Scale that maps max|x| onto the largest finite value of `fp8_dtype`: a float32
    scalar, or with `rowwise` one per row of the 2-D `x` (shape [M, 1])."""
    if rowwise:
        amax = x.abs().amax(dim=-1, keepdim=True).float().clamp_min(_AMAX_FLOOR)
    else:
        lo, hi = torch.aminmax(x)
        amax = torch.maximum(hi.float(), -lo.float()).clamp_min(_AMAX_FLOOR)
    return amax / FP8_MAX[fp8_dtype]


def quantize(x: torch.Tensor, fp8_dtype: torch.dtype = E4M3, rowwise: bool = False):
    """(q, scale) with q in `fp8_dtype` and x ~= q.float() * scale.

    Plain torch ops: under torch.compile (the blocks compiled) they fuse into the
    neighbouring kernels; eager they cost a few passes over x."""
    scale = tensor_scale(x, fp8_dtype, rowwise)
    m = FP8_MAX[fp8_dtype]
    q = (x.float() / scale).clamp(-m, m).to(fp8_dtype)
    return q, scale


def _as_2d(x: torch.Tensor):
    """Rows of x as a contiguous [M, K] matrix, padded to a multiple of 16 rows
    (float8 GEMMs want 16-aligned sizes; modulation layers see one row)."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    m = x2.shape[0]
    pad = (-m) % 16
    if pad:
        x2 = torch.nn.functional.pad(x2, (0, 0, 0, pad))
    return x2, m


def weight_scale_f32(weight: torch.Tensor, scale: torch.Tensor | None,
                     device=None) -> torch.Tensor:
    """The weight's per-tensor scale as a float32 scalar on `device` (default: the
    weight's device)."""
    device = weight.device if device is None else torch.device(device)
    if scale is None:
        return torch.ones((), dtype=torch.float32, device=device)
    if scale.numel() != 1:
        raise ValueError(f"float8 compute needs a per-tensor weight scale, got shape "
                         f"{tuple(scale.shape)}; turn fp8 compute off for this model")
    return scale.reshape(()).to(device=device, dtype=torch.float32)


def _b_scale(w_scale: torch.Tensor, n: int, rowwise: bool) -> torch.Tensor:
    """The weight's per-tensor scale in the shape `_scaled_mm` wants beside a per-row
    scale of the first operand: [1, n]."""
    return w_scale.reshape(1, 1).expand(1, n).contiguous() if rowwise else w_scale


def linear_fp8(x: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
               bias: torch.Tensor | None, out_dtype: torch.dtype,
               recipe: Fp8Recipe = Fp8Recipe()) -> torch.Tensor:
    """x @ (weight * w_scale).T + bias with x quantised to e4m3 (per tensor, or per
    row with `recipe.rowwise`). `weight` is float8_e4m3fn [N, K] (row-major, as stored)."""
    x2, m = _as_2d(x)
    xq, sx = quantize(x2, E4M3, recipe.rowwise)
    y = torch._scaled_mm(xq, weight.t(), scale_a=sx,
                         scale_b=_b_scale(w_scale, weight.shape[0], recipe.rowwise),
                         bias=None if bias is None else bias.to(out_dtype),
                         out_dtype=out_dtype, use_fast_accum=recipe.fast_accum)
    if y.shape[0] != m:
        y = y[:m]
    return y.reshape(*x.shape[:-1], weight.shape[0])


def column_major(weight: torch.Tensor) -> torch.Tensor:
    """The same [N, K] matrix stored column-major: the layout `_scaled_mm` wants for
    its second operand when the contraction runs over N (the input-gradient)."""
    return weight.t().contiguous().t()


def grad_input_fp8(grad_out: torch.Tensor, weight: torch.Tensor, w_scale: torch.Tensor,
                   out_dtype: torch.dtype, grad_dtype: torch.dtype = E5M2,
                   weight_column_major: torch.Tensor | None = None,
                   rowwise: bool = False) -> torch.Tensor:
    """grad_out @ (weight * w_scale): the input-gradient of a frozen linear, with
    grad_out quantised (per tensor, or per row with `rowwise`) to `grad_dtype` (e5m2
    by default: gradients need range more than mantissa). The weight is transposed
    into a column-major operand (one pass over the float8 weight, no bf16 copy)
    unless a kept copy `weight_column_major` is given."""
    g2, m = _as_2d(grad_out)
    gq, sg = quantize(g2, grad_dtype, rowwise)
    w_cm = column_major(weight) if weight_column_major is None else weight_column_major
    dx = torch._scaled_mm(gq, w_cm, scale_a=sg, scale_b=_b_scale(w_scale, weight.shape[1], rowwise),
                          out_dtype=out_dtype, use_fast_accum=False)
    if dx.shape[0] != m:
        dx = dx[:m]
    return dx.reshape(*grad_out.shape[:-1], weight.shape[1])


_ROWWISE: dict[tuple, bool] = {}   # (device, first operand dtype) -> per-row scales work


def rowwise_supported(device, first: torch.dtype = E4M3) -> bool:
    """Whether the device's `_scaled_mm` takes per-row scales with a `first` (e4m3: the
    forward; e5m2: the input-gradient) times e4m3 product. Builds and devices differ
    (torch ships per-row kernels only for some architectures, CUDA versions and
    operand types); a 16 x 16 product is tried once per device and dtype."""
    key = (str(torch.device(device)), first)
    if key not in _ROWWISE:
        a = torch.zeros(16, 16, device=device, dtype=first)
        b = torch.zeros(16, 16, device=device, dtype=E4M3).t()
        try:
            torch._scaled_mm(a, b, scale_a=torch.ones(16, 1, device=device),
                             scale_b=torch.ones(1, 16, device=device), out_dtype=torch.bfloat16)
            _ROWWISE[key] = True
        except (RuntimeError, NotImplementedError) as e:
            log.info("fluxtrain: per-row float8 scales unavailable for %s operands on %s (%s); "
                     "per-tensor scales are used there", first, device, str(e).splitlines()[0])
            _ROWWISE[key] = False
    return _ROWWISE[key]
