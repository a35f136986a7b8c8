"""Random model files that a real ComfyUI (v0.8.0) loads with its standard nodes.

No machine here can download weights, so the integration suite writes its own:

- a CLIP-L text encoder in the Hugging Face layout (`text_model.` prefix kept:
  without it ComfyUI silently leaves every weight empty and encodes NaN),
  loaded by CLIPLoader with type `stable_diffusion`;
- a 16-channel VAE in the layout of the original Flux `ae.safetensors`
  (`encoder.down.N.block.M...`, no `quant_conv`): ComfyUI's VAE detection then
  builds its Flux VAE (ch 128, ch_mult 1,2,4,4, two res blocks, z 16);
- a Flux transformer (fluxtrain.synthetic's random weights) with ComfyUI's fixed hidden size 3072 (24 heads of 128) but
  one double and one single block and 768-wide text and pooled inputs, so the
  CLIP-L above feeds both `txt_in` and `vector_in`.

The encoder and VAE keys are written out here rather than borrowed from
transformers or ComfyUI, so the files do not depend on either library's version.
Scales are 1/sqrt(fan_in) with unit norms, which keeps every activation finite.
"""

from __future__ import annotations

from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from fluxtrain.params import FluxParams, expected_shapes
from fluxtrain.synthetic import random_state_dict

# The smallest Flux ComfyUI accepts: its detection fixes 24 heads and RoPE axes (16, 56, 56).
COMFY_TEST_FLUX = FluxParams(hidden_size=3072, num_heads=24, depth=1, depth_single_blocks=1,
                             context_in_dim=768, vec_in_dim=768)

Shapes = dict[str, tuple[int, ...]]


def clip_l_shapes(layers: int = 12, width: int = 768, vocab: int = 49408, positions: int = 77) -> Shapes:
    """openai/clip-vit-large-patch14's text tower, Hugging Face key names."""
    s: Shapes = {
        "text_model.embeddings.token_embedding.weight": (vocab, width),
        "text_model.embeddings.position_embedding.weight": (positions, width),
        "text_model.final_layer_norm.weight": (width,),
        "text_model.final_layer_norm.bias": (width,),
        "text_projection.weight": (width, width),
    }
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            s[f"{p}.self_attn.{proj}.weight"] = (width, width)
            s[f"{p}.self_attn.{proj}.bias"] = (width,)
        for norm in ("layer_norm1", "layer_norm2"):
            s[f"{p}.{norm}.weight"] = (width,)
            s[f"{p}.{norm}.bias"] = (width,)
        s[f"{p}.mlp.fc1.weight"] = (4 * width, width)
        s[f"{p}.mlp.fc1.bias"] = (4 * width,)
        s[f"{p}.mlp.fc2.weight"] = (width, 4 * width)
        s[f"{p}.mlp.fc2.bias"] = (width,)
    return s


def flux_vae_shapes(z_channels: int = 16, ch: int = 128, ch_mult=(1, 2, 4, 4), res_blocks: int = 2) -> Shapes:
    """The original Flux autoencoder (`ae.safetensors`): LDM Encoder/Decoder, no quant convs."""
    s: Shapes = {}

    def conv(name, out_c, in_c, k=3):
        s[f"{name}.weight"] = (out_c, in_c, k, k)
        s[f"{name}.bias"] = (out_c,)

    def norm(name, c):
        s[f"{name}.weight"] = (c,)
        s[f"{name}.bias"] = (c,)

    def resnet(name, in_c, out_c):
        norm(f"{name}.norm1", in_c)
        conv(f"{name}.conv1", out_c, in_c)
        norm(f"{name}.norm2", out_c)
        conv(f"{name}.conv2", out_c, out_c)
        if in_c != out_c:
            conv(f"{name}.nin_shortcut", out_c, in_c, k=1)

    def mid(prefix, c):
        resnet(f"{prefix}.mid.block_1", c, c)
        norm(f"{prefix}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{prefix}.mid.attn_1.{proj}", c, c, k=1)
        resnet(f"{prefix}.mid.block_2", c, c)

    levels = len(ch_mult)
    conv("encoder.conv_in", ch, 3)
    block_in = ch
    for i, mult in enumerate(ch_mult):
        block_in = ch * ((1,) + tuple(ch_mult))[i]
        for j in range(res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, ch * mult)
            block_in = ch * mult
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in)
    conv("encoder.conv_out", 2 * z_channels, block_in)

    block_in = ch * ch_mult[-1]
    conv("decoder.conv_in", block_in, z_channels)
    mid("decoder", block_in)
    for i in reversed(range(levels)):
        for j in range(res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, ch * ch_mult[i])
            block_in = ch * ch_mult[i]
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_in, block_in)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", 3, block_in)
    return s


def _is_norm(key: str) -> bool:
    return any(n in key for n in ("norm", "scale")) and key.endswith((".weight", ".scale"))


def random_tensors(shapes: Mapping[str, tuple[int, ...]], seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Unit norms, zero biases, weights ~ N(0, 1/fan_in): activations stay O(1) and finite."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for key in sorted(shapes):
        shape = shapes[key]
        if _is_norm(key) and len(shape) == 1:
            t = torch.ones(shape)
        elif key.endswith(".bias"):
            t = torch.zeros(shape)
        else:
            fan_in = shape[1] * (shape[2] * shape[3] if len(shape) == 4 else 1)
            if "embedding" in key:  # embeddings are looked up, not multiplied: unit-ish rows
                fan_in = 1 if "position" not in key else 4
            t = torch.randn(shape, generator=gen) / fan_in ** 0.5
        out[key] = t.to(dtype)
    return out


def write_clip_l(path: Path, seed: int = 1, dtype: torch.dtype = torch.float16) -> Path:
    return _write(path, random_tensors(clip_l_shapes(), seed, dtype))


def write_flux_vae(path: Path, seed: int = 2, dtype: torch.dtype = torch.float16) -> Path:
    return _write(path, random_tensors(flux_vae_shapes(), seed, dtype))


def write_flux(path: Path, seed: int = 0, dtype: torch.dtype = torch.float8_e4m3fn,
               params: FluxParams = COMFY_TEST_FLUX) -> Path:
    """The engine's random Flux (plain float8 like the released Dev2Pro file):
    about 0.54 B parameters, 0.54 GB as float8, twice that as bf16."""
    return _write(path, random_state_dict(params, seed, dtype))


def _write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    save_file(tensors, str(tmp))
    tmp.replace(path)
    return path


def write_raw_lora(path: Path, style: str, seed: int = 3, rank: int = 4,
                   modules=("double_blocks.0.img_attn.qkv", "single_blocks.0.linear1", "final_layer.linear"),
                   extra: Mapping[str, torch.Tensor] | None = None,
                   params: FluxParams = COMFY_TEST_FLUX) -> Path:
    """A LoRA for the test Flux written by hand in one of the two key styles ComfyUI
    reads for Flux: "kohya" (`lora_unet_<name_with_underscores>.lora_down/lora_up/alpha`)
    or "lora_A" (`diffusion_model.<bfl name>.lora_A/lora_B/alpha`). The same seed gives
    the same tensors in both styles. Independent of the engine's lora.py on purpose."""
    shapes = expected_shapes(params)
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for module in modules:
        out_f, in_f = shapes[f"{module}.weight"]
        down = torch.randn(rank, in_f, generator=gen) / in_f ** 0.5
        up = torch.randn(out_f, rank, generator=gen)  # strong: gates of a random Flux are small
        if style == "kohya":
            name = "lora_unet_" + module.replace(".", "_")
            out[f"{name}.lora_down.weight"], out[f"{name}.lora_up.weight"] = down, up
        elif style == "lora_A":
            name = f"diffusion_model.{module}"
            out[f"{name}.lora_A.weight"], out[f"{name}.lora_B.weight"] = down, up
        else:
            raise ValueError(f"unknown LoRA key style {style!r}: use 'kohya' or 'lora_A'")
        out[f"{name}.alpha"] = torch.tensor(float(rank))
    out.update(extra or {})
    return _write(path, {k: v.to(torch.bfloat16) for k, v in out.items()})
