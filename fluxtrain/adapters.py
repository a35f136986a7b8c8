"""Adapters for FrozenLinear's slot beyond LoRA: LoKr, LoHa and DoRA, and their files.

`ADAPTERS` maps the `adapter` setting to its class (LoRA's own class lives in
fluxtrain.lora). Every adapter holds float32 master weights, maps the layer input x
[..., in] to a delta [..., out] in x's dtype (FrozenLinear adds it to the base output),
starts as an exact no-op (one factor is zero), and names its tensors as LyCORIS does,
under kohya's module names (`lora_unet_double_blocks_0_img_attn_qkv.lokr_w1`).

Each trains the formula ComfyUI applies when it merges the file into the weight
(comfy/weight_adapter/lokr.py, loha.py, lora.py and weight_decompose in base.py), at
strength 1, W the frozen weight [out, in]:

- lokr: W + s * kron(w1, w2), w1 [out_l, in_m] and w2 [out_k, in_n] with out = out_l * out_k
  and in = in_m * in_n split by `lokr_factor` (see `factorization`). w2 is a full matrix
  (`lokr_w2`, s = 1: ComfyUI and LyCORIS ignore alpha then) or `lokr_w2_a @ lokr_w2_b`
  of rank `rank` (s = alpha / rank).
- loha: W + s * (w1_a @ w1_b) * (w2_a @ w2_b), a Hadamard product, s = alpha / rank.
- dora: V = W + s * up @ down as LoRA, then each input column j of V rescaled to the
  trained magnitude m_j: W' = V * m / (||V[:, j]|| + eps), m stored as `dora_scale` [1, in].
  ComfyUI reads a [1, in] dora_scale this way (the norm of the merged weight, as
  LyCORIS and the DoRA paper do); a [out, 1] one it divides by the norm of the frozen
  weight alone, which no other loader does, so files that reproduce everywhere put the
  magnitude on the input axis. The norm is treated as a constant in backward (the DoRA
  paper's memory saving): the forward is exact, the gradient that of the paper.

Fused Flux layers (qkv, linear1) are single modules in BFL layout, so one kohya name
targets the whole fused weight, as ComfyUI maps it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .files import atomic_write_safetensors
from .layers import FrozenLinear, materialize_weight
from .lora import (LoRAAdapter, LoRAConfig, LoRAConfigError, LoRAFileError, _module_seed,
                   check_file_dtype, file_metadata, kohya_name, save_lora_file, target_modules, targeted_layers)
from .params import FluxParams, expected_shapes

# ComfyUI adds its LoRA compute dtype's epsilon to DoRA's norm: float32's on the CPU
# (on a GPU it merges in float16, whose epsilon is about fp16 round-off of the norm).
DORA_EPS = torch.finfo(torch.float32).eps


@dataclass(frozen=True)
class AdapterConfig(LoRAConfig):
    """LoRAConfig (rank, alpha, dropout, targets, blocks) plus the adapter kind and LoKr's
    shape: `lokr_factor` splits each dimension (-1: the most balanced split), and
    `lokr_full_matrix` keeps the second Kronecker factor a full matrix (else rank `rank`)."""
    adapter: str = "lora"
    lokr_factor: int = 16
    lokr_full_matrix: bool = True

    def __post_init__(self):
        super().__post_init__()
        if self.adapter not in ADAPTERS:
            raise LoRAConfigError(f"unknown adapter {self.adapter!r}; expected one of {', '.join(ADAPTERS)}")
        if int(self.lokr_factor) != self.lokr_factor or self.lokr_factor == 0 or self.lokr_factor < -1:
            raise LoRAConfigError(f"lokr_factor must be -1 (the most balanced split) or a whole number "
                                  f">= 1, got {self.lokr_factor}")
        object.__setattr__(self, "lokr_factor", int(self.lokr_factor))

    def lora_config(self) -> LoRAConfig:
        return LoRAConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout,
                          targets=self.targets, blocks=self.blocks)


def factorization(dimension: int, factor: int = -1) -> tuple[int, int]:
    """(m, n) with m <= n and m * n = dimension, m the largest divisor of `dimension` that is
    at most its square root and at most `factor` (-1: no limit). LyCORIS' rule for LoKr's
    shapes: 3072 -> (16, 192) with factor 16, (48, 64) with -1; a prime -> (1, prime)."""
    limit = math.isqrt(dimension) if factor < 0 else min(math.isqrt(dimension), factor)
    m = max(d for d in range(1, limit + 1) if dimension % d == 0)
    return m, dimension // m


def _kaiming_(tensor: Tensor, generator: torch.Generator | None) -> Tensor:
    """Kaiming-uniform with a = sqrt(5) (uniform in +-1/sqrt(fan_in)), drawn on the CPU so
    the same seed gives the same weights on any device."""
    cpu = torch.empty(tensor.shape, dtype=torch.float32)
    nn.init.kaiming_uniform_(cpu, a=math.sqrt(5), generator=generator)
    return tensor.copy_(cpu)


def _normal_(tensor: Tensor, std: float, generator: torch.Generator | None) -> Tensor:
    return tensor.copy_(torch.randn(tensor.shape, generator=generator) * std)


class _LyCORISAdapter(nn.Module):
    """What LoKr, LoHa and DoRA share: float32 parameters named as in the file (their
    `FILE_NAMES`), alpha, dropout on the adapter's input while training."""
    FILE_NAMES: dict[str, str] = {}   # parameter -> file suffix

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.dropout = config.rank, float(config.alpha), config.dropout

    def _param(self, *shape, device=None) -> nn.Parameter:
        return nn.Parameter(torch.zeros(*shape, device=device, dtype=torch.float32))

    def _dropped(self, x: Tensor) -> Tensor:
        return F.dropout(x, self.dropout) if self.dropout and self.training else x

    def file_tensors(self) -> dict[str, Tensor]:
        """{file suffix: tensor}: views of the parameters (load_adapter_state_dict copies
        into them) and alpha."""
        out = {suffix: self.get_parameter(name).detach() for name, suffix in self.FILE_NAMES.items()}
        out["alpha"] = torch.tensor(self.alpha, dtype=torch.float32)
        return out

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}")


class LoKrAdapter(_LyCORISAdapter):
    """delta(x) = x @ (s * kron(w1, w2)).T, without building the [out, in] product: x is
    viewed as [in_m, in_n] and multiplied by w1 and w2 on either side, in the order whose
    intermediate (kept for backward) is smaller."""

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, device=None):
        super().__init__(in_features, out_features, config)
        self.out_l, self.out_k = factorization(out_features, config.lokr_factor)
        self.in_m, self.in_n = factorization(in_features, config.lokr_factor)
        self.full_matrix = config.lokr_full_matrix
        self.w1 = self._param(self.out_l, self.in_m, device=device)
        if self.full_matrix:
            self.w2 = self._param(self.out_k, self.in_n, device=device)
            self.FILE_NAMES = {"w1": "lokr_w1", "w2": "lokr_w2"}
        else:
            self.w2_a = self._param(self.out_k, self.rank, device=device)
            self.w2_b = self._param(self.rank, self.in_n, device=device)
            self.FILE_NAMES = {"w1": "lokr_w1", "w2_a": "lokr_w2_a", "w2_b": "lokr_w2_b"}

    @property
    def scale(self) -> float:
        return 1.0 if self.full_matrix else self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """w1 kaiming-uniform; w2 zero (or w2_a zero, w2_b kaiming-uniform)."""
        with torch.no_grad():
            _kaiming_(self.w1, generator)
            if self.full_matrix:
                self.w2.zero_()
            else:
                _kaiming_(self.w2_b, generator)
                self.w2_a.zero_()

    def second_factor(self) -> Tensor:
        return self.w2 if self.full_matrix else self.w2_a @ self.w2_b

    def forward(self, x: Tensor) -> Tensor:
        x = self._dropped(x)
        w1, w2 = self.w1.to(x.dtype), (self.second_factor() * self.scale).to(x.dtype)
        grid = x.reshape(*x.shape[:-1], self.in_m, self.in_n)
        if self.out_l * self.in_n <= self.in_m * self.out_k:      # w1 first: [.., out_l, in_n]
            mixed = F.linear(grid.transpose(-1, -2), w1).transpose(-1, -2)
            out = F.linear(mixed, w2)
        else:                                                     # w2 first: [.., in_m, out_k]
            mixed = F.linear(grid, w2)
            out = F.linear(mixed.transpose(-1, -2), w1).transpose(-1, -2)
        return out.reshape(*x.shape[:-1], self.out_features)

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        return torch.kron(self.w1, self.second_factor() * self.scale).detach()

    @staticmethod
    def parameter_count(in_features: int, out_features: int, config: AdapterConfig) -> int:
        out_l, out_k = factorization(out_features, config.lokr_factor)
        in_m, in_n = factorization(in_features, config.lokr_factor)
        second = out_k * in_n if config.lokr_full_matrix else config.rank * (out_k + in_n)
        return out_l * in_m + second

    @staticmethod
    def saved_per_token(in_features: int, out_features: int, config: AdapterConfig) -> int:
        out_l, out_k = factorization(out_features, config.lokr_factor)
        in_m, in_n = factorization(in_features, config.lokr_factor)
        return min(out_l * in_n, in_m * out_k)


class LoHaAdapter(_LyCORISAdapter):
    """delta(x) = x @ (s * (w1_a @ w1_b) * (w2_a @ w2_b)).T through the Khatri-Rao identity
    (A1 B1) * (A2 B2) = (A1 . A2)(B1 . B2), with A1 . A2 [out, rank^2] the row-wise and
    B1 . B2 [rank^2, in] the column-wise products: rank^2 intermediates per token instead
    of an [out, in] weight (cheaper while rank^2 < in * out / (in + out), rank < 39 on Flux).
    Initialised as LyCORIS does: w1_a ~ N(0, 0.1^2), w1_b and w2_b ~ N(0, 1), w2_a = 0."""
    FILE_NAMES = {"w1_a": "hada_w1_a", "w1_b": "hada_w1_b", "w2_a": "hada_w2_a", "w2_b": "hada_w2_b"}

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, device=None):
        super().__init__(in_features, out_features, config)
        r = self.rank
        self.w1_a, self.w2_a = self._param(out_features, r, device=device), self._param(out_features, r, device=device)
        self.w1_b, self.w2_b = self._param(r, in_features, device=device), self._param(r, in_features, device=device)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            _normal_(self.w1_a, 0.1, generator)
            _normal_(self.w1_b, 1.0, generator)
            _normal_(self.w2_b, 1.0, generator)
            self.w2_a.zero_()

    def forward(self, x: Tensor) -> Tensor:
        x = self._dropped(x)
        left = (self.w1_a[:, :, None] * self.w2_a[:, None, :]).flatten(1) * self.scale
        right = (self.w1_b[:, None, :] * self.w2_b[None, :, :]).flatten(0, 1)
        return F.linear(F.linear(x, right.to(x.dtype)), left.to(x.dtype))

    def delta_weight(self, weight: Tensor | None = None) -> Tensor:
        return ((self.w1_a @ self.w1_b) * (self.w2_a @ self.w2_b) * self.scale).detach()

    @staticmethod
    def parameter_count(in_features: int, out_features: int, config: AdapterConfig) -> int:
        return 2 * config.rank * (in_features + out_features)

    @staticmethod
    def saved_per_token(in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.rank ** 2

    @staticmethod
    def saved_per_layer(in_features: int, out_features: int, config: AdapterConfig) -> int:
        """The Khatri-Rao factors [out, rank^2] and [rank^2, in], kept for backward (in the
        compute dtype) whatever the token count."""
        return config.rank ** 2 * (in_features + out_features)


class DoRAAdapter(_LyCORISAdapter):
    """A LoRA (down, up, alpha / rank) plus a magnitude per input column.

    FrozenLinear multiplies its input by `input_scale(...)` = m / (||V[:, j]|| + eps) before
    both the base matmul and this module's LoRA path, which together give x @ W'.T. The
    column norms of V = W + s * up @ down come without building V:
    ||V_j||^2 = ||W_j||^2 + 2 s (down * (up.T @ W))_j + s^2 (down * (up.T @ up @ down))_j,
    summed over the rank; ||W_j||^2 is read from the frozen weight once, at attach time
    (`frozen_column_norms`), and up.T @ W is one [rank, out] x [out, in] product per forward."""
    FILE_NAMES = {"down": "lora_down.weight", "up": "lora_up.weight"}

    def __init__(self, in_features: int, out_features: int, config: AdapterConfig, device=None):
        super().__init__(in_features, out_features, config)
        self.down = self._param(self.rank, in_features, device=device)
        self.up = self._param(out_features, self.rank, device=device)
        self.magnitude = self._param(in_features, device=device)
        # ||W[:, j]||^2 of the frozen weight, float32 (not trained, not saved: re-read on attach)
        self.register_buffer("weight_sq", torch.zeros(in_features, device=device), persistent=False)

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """As LoRA (down kaiming-uniform, up zero); m = ||W_j|| + eps, so that input_scale is
        exactly 1 and a fresh DoRA leaves the model unchanged. Needs weight_sq set first."""
        with torch.no_grad():
            _kaiming_(self.down, generator)
            self.up.zero_()
            self.magnitude.copy_(self.weight_sq.sqrt() + DORA_EPS)

    def set_frozen_weight(self, weight: Tensor) -> None:
        """Read ||W[:, j]||^2 from the real frozen weight ([out, in], any dtype, on any device)."""
        with torch.no_grad():
            self.weight_sq.copy_(weight.float().square().sum(0))

    def column_norms(self, weight: Tensor, weight_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
        """||V[:, j]|| + eps, float32 [in], from the stored frozen weight (constant in backward)."""
        up, down = self.up.detach(), self.down.detach()
        s = self.scale
        cross = up.T.to(dtype) @ materialize_weight(weight, weight_scale, dtype)      # [rank, in]
        squared = (self.weight_sq + 2 * s * (down * cross.float()).sum(0)
                   + s * s * (down * ((up.T @ up) @ down)).sum(0))
        return squared.clamp_min(0).sqrt() + DORA_EPS

    def input_scale(self, weight: Tensor, weight_scale: Tensor | None, dtype: torch.dtype) -> Tensor:
        """m / (||V_j|| + eps) - 1 in `dtype` [in]: FrozenLinear computes x + x * this, which
        keeps a scale of 1 + 1e-4 exact in bf16 (a bf16 scale itself would round to 1)."""
        return (self.magnitude / self.column_norms(weight, weight_scale, dtype) - 1).to(dtype)

    def forward(self, x: Tensor) -> Tensor:
        x = self._dropped(x)
        return F.linear(F.linear(x, self.down.to(x.dtype)), (self.up * self.scale).to(x.dtype))

    def delta_weight(self, weight: Tensor) -> Tensor:
        """W' - W for the real frozen weight [out, in], as ComfyUI merges it (float32)."""
        weight = weight.float()
        merged = weight + (self.up @ self.down).detach() * self.scale
        norms = merged.norm(dim=0, keepdim=True) + DORA_EPS
        return merged * (self.magnitude.detach() / norms) - weight

    def file_tensors(self) -> dict[str, Tensor]:
        return {**super().file_tensors(), "dora_scale": self.magnitude.detach().view(1, -1)}

    @staticmethod
    def parameter_count(in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.rank * (in_features + out_features) + in_features

    @staticmethod
    def saved_per_token(in_features: int, out_features: int, config: AdapterConfig) -> int:
        return config.rank + in_features      # the LoRA's rank and the rescaled input


ADAPTERS: dict[str, type[nn.Module]] = {
    "lora": LoRAAdapter, "lokr": LoKrAdapter, "loha": LoHaAdapter, "dora": DoRAAdapter,
}
# Tensors the file keeps in float32 whatever its dtype: alpha (a scalar) and DoRA's
# magnitude, whose trained changes (~1e-3 relative) bf16 (2^-8) would round away.
FLOAT32_SUFFIXES = ("alpha", "dora_scale")


def build_adapter(layer: FrozenLinear, config: AdapterConfig, device=None) -> nn.Module:
    """A fresh (uninitialised) adapter of `config.adapter` for `layer`."""
    if config.adapter == "lora":
        return LoRAAdapter(layer.in_features, layer.out_features, config.rank, config.alpha,
                           config.dropout, device=device)
    return ADAPTERS[config.adapter](layer.in_features, layer.out_features, config, device=device)


def attach_adapters(model: nn.Module, config: AdapterConfig, seed: int = 0,
                    device=None) -> dict[str, nn.Module]:
    """Put a fresh adapter of `config.adapter` in the slot of every targeted FrozenLinear of
    `model` (a Flux in BFL names), after emptying every slot; {bfl module name: adapter}.
    Initial weights depend only on (seed, module name), as attach_lora's (the same numbers
    for 'lora'). Adapters live on `device` (default: the layer weight's device; an offloaded
    layer's weight stays on the host); DoRA reads its frozen weight's column norms there."""
    adapters = {}
    for name, layer in targeted_layers(model, config):
        where = torch.device(device) if device is not None else layer.weight.device
        adapter = build_adapter(layer, config, device=where)
        if where.type != "meta":
            if isinstance(adapter, DoRAAdapter):
                adapter.set_frozen_weight(materialize_weight(layer.weight.to(where), _on(layer.weight_scale, where),
                                                             torch.float32))
            adapter.reset_parameters(torch.Generator().manual_seed(_module_seed(seed, name)))
        layer.lora = adapter
        adapters[name] = adapter
    return adapters


def _on(t: Tensor | None, device) -> Tensor | None:
    return None if t is None else t.to(device)


def adapter_delta(adapter: nn.Module, weight: Tensor) -> Tensor:
    """W' - W, float32 [out, in]: what the adapter adds to the real frozen weight `weight`
    when ComfyUI merges it at strength 1 (only DoRA's depends on the weight)."""
    return adapter.delta_weight() if isinstance(adapter, LoRAAdapter) else adapter.delta_weight(weight)


def _file_tensors(adapter: nn.Module) -> dict[str, Tensor]:
    if isinstance(adapter, LoRAAdapter):
        return {"lora_down.weight": adapter.down.detach(), "lora_up.weight": adapter.up.detach(),
                "alpha": torch.tensor(adapter.alpha, dtype=torch.float32)}
    return adapter.file_tensors()


def adapter_state_dict(adapters: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """float32 tensors under the file's names (kohya module names, LyCORIS suffixes); for
    LoRA exactly fluxtrain.lora.lora_state_dict. What resume saves and the file holds."""
    return {f"{kohya_name(name)}.{suffix}": t for name, a in adapters.items()
            for suffix, t in _file_tensors(a).items()}


def load_adapter_state_dict(adapters: Mapping[str, nn.Module], tensors: Mapping[str, Tensor]) -> None:
    """Copy adapter_state_dict() tensors (or a file of ours) back into the adapters. Every
    tensor must be there with the same shape and alpha, and nothing else."""
    expected = adapter_state_dict(adapters)
    missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LoRAFileError(
            f"saved weights do not match the attached adapters: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}). Resume with the adapter, "
            "rank, LoKr settings and targets the run was started with.")
    for key, target in expected.items():
        source = tensors[key]
        if key.endswith(".alpha"):
            if not math.isclose(float(source), float(target), rel_tol=1e-6):
                raise LoRAFileError(f"{key}: saved alpha {float(source)} but the attached adapter has "
                                    f"alpha {float(target)}; resume with the alpha the run was started with")
        elif tuple(source.shape) != tuple(target.shape):
            raise LoRAFileError(f"{key} has shape {tuple(source.shape)}, the attached adapter needs "
                                f"{tuple(target.shape)} (another rank, LoKr factor or model?)")
        else:
            with torch.no_grad():
                target.copy_(source)


def save_adapter_file(path, adapters: Mapping[str, nn.Module], config: AdapterConfig,
                      metadata: Mapping | None = None, dtype: torch.dtype = torch.bfloat16):
    """Write the adapters atomically. LoRA: fluxtrain.lora.save_lora_file, unchanged. The
    others: LyCORIS tensors (bf16 by default; alpha and dora_scale stay float32) with kohya's
    metadata for LyCORIS networks and the recipe."""
    if config.adapter == "lora":
        return save_lora_file(path, adapters, config.lora_config(), metadata, dtype)
    check_file_dtype(dtype)
    tensors = {k: (v if k.rsplit(".", 1)[-1] in FLOAT32_SUFFIXES else v.to(dtype)).contiguous()
               for k, v in adapter_state_dict(adapters).items()}
    meta = file_metadata(metadata, config, len(adapters), "lycoris.kohya", args=network_args(config))
    return atomic_write_safetensors(tensors, path, meta)


def network_args(config: AdapterConfig) -> dict:
    """LyCORIS' network arguments for this adapter, as kohya-style metadata records them."""
    if config.adapter == "lokr":
        return {"algo": "lokr", "factor": config.lokr_factor, "full_matrix": config.lokr_full_matrix}
    if config.adapter == "dora":
        return {"algo": "lora", "dora_wd": True, "wd_on_output": False}
    return {"algo": config.adapter}


# ---------------------------------------------------------------- what the memory planner counts

@dataclass(frozen=True)
class AdapterCost:
    """What fluxtrain.memory counts for an adapter: trained parameters (float32 weight, gradient and two AdamW states each), the activations per
    token it keeps beyond a LoRA's, in hidden-state rows per (double, single) block, and
    the elements per (double, single) block it keeps whatever the token count."""
    parameters: int
    extra_units: tuple[float, float]
    extra_block_elements: tuple[float, float] = (0.0, 0.0)


def adapter_cost(config: AdapterConfig, p: FluxParams) -> AdapterCost:
    """For fluxtrain.memory.Job. LoRA's activations are in the planner's measured units."""
    return AdapterCost(adapter_parameters(config, p), extra_saved_units(config, p),
                       saved_per_block(config, p))


def saved_per_block(config: AdapterConfig, p: FluxParams) -> tuple[float, float]:
    """(double, single): elements one block of each kind keeps for backward whatever the
    token count (LoHa's Khatri-Rao factors), averaged over the blocks of each kind."""
    per_layer = getattr(ADAPTERS[config.adapter], "saved_per_layer", None)
    if per_layer is None:
        return 0.0, 0.0
    total = {"double_blocks": 0, "single_blocks": 0}
    for name, i, o in _targeted_shapes(config, p):
        kind = name.split(".", 1)[0]
        if kind in total:
            total[kind] += per_layer(i, o, config)
    return total["double_blocks"] / max(1, p.depth), total["single_blocks"] / max(1, p.depth_single_blocks)


def _targeted_shapes(config: AdapterConfig, p: FluxParams) -> list[tuple[str, int, int]]:
    shapes = expected_shapes(p)
    return [(name, *reversed(shapes[f"{name}.weight"])) for name in target_modules(config, p)]


def adapter_parameters(config: AdapterConfig, p: FluxParams) -> int:
    """Trained parameters of the adapters `config` attaches to a Flux of shape `p`."""
    cls = ADAPTERS[config.adapter]
    if cls is LoRAAdapter:
        return sum(config.rank * (i + o) for _, i, o in _targeted_shapes(config, p))
    return sum(cls.parameter_count(i, o, config) for _, i, o in _targeted_shapes(config, p))


def extra_saved_units(config: AdapterConfig, p: FluxParams) -> tuple[float, float]:
    """(double, single): activations per token of one block that this adapter keeps for
    backward beyond a LoRA of the same rank (which the planner's measured units include),
    in hidden-state rows, averaged over the blocks of each kind."""
    cls = ADAPTERS[config.adapter]
    if cls is LoRAAdapter:
        return 0.0, 0.0
    extra = {"double_blocks": 0, "single_blocks": 0}
    for name, i, o in _targeted_shapes(config, p):
        kind = name.split(".", 1)[0]
        if kind in extra and not name.endswith("mod.lin") and not name.endswith("modulation.lin"):
            # (modulation layers see one vector per image, not one per token)
            extra[kind] += cls.saved_per_token(i, o, config) - config.rank
    return (extra["double_blocks"] / max(1, p.depth) / p.hidden_size,
            extra["single_blocks"] / max(1, p.depth_single_blocks) / p.hidden_size)
