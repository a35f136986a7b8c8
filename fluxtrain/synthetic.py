"""Random Flux checkpoints with the real key layout, written in every released format.

No machine of this project can download real weights, so tests, the smoke demo and
the GPU benchmark use these. Every tensor is generated on its own from (seed, key):
a full-size float8 model never needs a float32 copy of the whole thing, and a model
with fewer blocks shares its tensors with a bigger one of the same seed.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path

import torch

from .checkpoint import DIFFUSERS_INDEX, SCALE_WEIGHT, SCALED_FP8_MARKER, bfl_to_diffusers
from .files import atomic_write_json, atomic_write_safetensors
from .fp8 import quantize
from .params import FluxParams, expected_shapes

# Weights ~ N(0, (GAIN / sqrt(fan_in))^2): activations stay near unit scale through
# every block, and modulation (shift, scale, gate) stays small, as in a trained Flux.
WEIGHT_GAIN = 0.5
BIAS_STD = 0.02


def random_tensor(key: str, shape: tuple[int, ...], seed: int = 0,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The tensor `key` of a random Flux: weights scaled by fan-in, small biases, norm scales 1."""
    if key.endswith(".scale"):
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(key.encode()))
    t = torch.randn(shape, generator=g)
    t *= WEIGHT_GAIN / shape[1] ** 0.5 if len(shape) == 2 else BIAS_STD
    return t.to(dtype)


def random_state_dict(params: FluxParams, seed: int = 0,
                      dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """A deterministic random Flux in BFL keys, every tensor in `dtype`."""
    return {k: random_tensor(k, shape, seed, dtype) for k, shape in expected_shapes(params).items()}


def _cast(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return (t if dtype is None else t.to(dtype)).contiguous()


def write_bfl(sd: dict[str, torch.Tensor], path: str | os.PathLike,
              dtype: torch.dtype | None = None, prefix: str = "") -> None:
    """A single .safetensors in the original layout; `prefix` "model.diffusion_model."
    gives the all-in-one layout. Every tensor is cast to `dtype` (float8 included)."""
    atomic_write_safetensors({prefix + k: _cast(v, dtype) for k, v in sd.items()}, path,
                             {"format": "pt"})


def write_scaled_fp8(sd: dict[str, torch.Tensor], path: str | os.PathLike, prefix: str = "",
                     other_dtype: torch.dtype = torch.bfloat16) -> None:
    """ComfyUI's scaled fp8 format: every Linear weight as float8_e4m3fn plus a float32
    `<layer>.scale_weight`, other tensors in `other_dtype`, and the `scaled_fp8` marker
    (an empty float8_e4m3fn tensor; ComfyUI's convert_old_quants reads it). The scale
    maps each weight's absolute maximum onto the largest float8 value (fp8.quantize)."""
    out = {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            w, scale = quantize(v)
            out[prefix + k] = w
            out[prefix + k[:-len(".weight")] + SCALE_WEIGHT] = scale
        else:
            out[prefix + k] = _cast(v, other_dtype)
    out[prefix + SCALED_FP8_MARKER] = torch.empty(0, dtype=torch.float8_e4m3fn)
    atomic_write_safetensors(out, path, {"format": "pt"})


def diffusers_config(params: FluxParams) -> dict:
    """transformer/config.json of diffusers' FluxTransformer2DModel for these shapes."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "_diffusers_version": "0.30.0",
        "patch_size": 1,
        "in_channels": params.in_channels,
        "out_channels": params.out_channels,
        "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": list(params.axes_dim),
    }


def write_diffusers(sd: dict[str, torch.Tensor], folder: str | os.PathLike,
                    dtype: torch.dtype | None = None, shard_size: int = 10 * 10**9) -> Path:
    """A diffusers model folder: `folder/transformer/` with config.json, shards of at most
    `shard_size` bytes (a larger tensor gets a shard of its own) named
    diffusion_pytorch_model-0000i-of-0000n.safetensors, and their index. Returns the
    transformer folder."""
    d = Path(folder) / "transformer"
    params = FluxParams.from_state_dict({k: tuple(v.shape) for k, v in sd.items()})
    tensors = {k: _cast(v, dtype) for k, v in bfl_to_diffusers(sd).items()}
    shards, size = [[]], 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > shard_size:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += nbytes
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"diffusion_pytorch_model-{i:05d}-of-{len(shards):05d}.safetensors"
        atomic_write_safetensors({k: tensors[k] for k in keys}, d / name, {"format": "pt"})
        weight_map.update((k, name) for k in keys)
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    atomic_write_json(d / DIFFUSERS_INDEX, index)
    atomic_write_json(d / "config.json", diffusers_config(params))
    return d
