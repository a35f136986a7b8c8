"""LoRA for Flux: which layers get one, the adapter module, and LoRA files.

Target sets name BFL modules (one table, TARGET_SETS). The single-stream blocks
fuse attention and MLP into two Linears: `linear1` = (q, k, v, mlp-in) and
`linear2` = (attention-out, mlp-out) concatenated. So "attention" and "mlp" both
include the single blocks' linear1 and linear2 (the only place their attention
and MLP live) and differ only on the double blocks; neither includes modulation.

Files are written with kohya names, the form every Flux LoRA loader reads:
`lora_unet_<bfl module, '.' -> '_'>.lora_down.weight / .lora_up.weight / .alpha`.
Reading also accepts the other names ComfyUI (v0.8.0, comfy/lora.py
model_lora_keys_unet and comfy/utils.py flux_to_diffusers) maps for Flux:
`diffusion_model.<bfl module>`, `diffusion_model.single_blocks.N.linear1_qkv`,
and diffusers names under `transformer.` (also `lycoris_` / `lora_transformer_`
with '.' -> '_'), whose q/k/v (and single blocks' proj_mlp) land in row slices of
the fused BFL weight, each with lora_down/lora_up, lora_A/lora_B, lora.down/lora.up
or lora_linear_layer.down/up factors and an optional `.alpha` (none: scale 1).
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from .checkpoint import SWAP_HALVES, diffusers_key_map
from .files import atomic_write_safetensors
from .layers import FrozenLinear
from .params import FluxParams, expected_shapes, linear_modules

# ---------------------------------------------------------------- which layers

DOUBLE_LAYERS = tuple(f"{s}_{layer}" for s in ("img", "txt")
                      for layer in ("mod.lin", "attn.qkv", "attn.proj", "mlp.0", "mlp.2"))
SINGLE_LAYERS = ("linear1", "linear2", "modulation.lin")

# name: (layers in each double block, layers in each single block)
TARGET_SETS: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "all": (DOUBLE_LAYERS, SINGLE_LAYERS),
    "attention": (("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"),
                  ("linear1", "linear2")),
    "mlp": (("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"), ("linear1", "linear2")),
    "double_blocks": (DOUBLE_LAYERS, ()),
    "single_blocks": ((), SINGLE_LAYERS),
}
BLOCK_KINDS = {"double": "double_blocks", "single": "single_blocks"}


class LoRAConfigError(ValueError):
    """A LoRA setting is invalid; the message says what was given and what is accepted."""


class LoRAFileError(ValueError):
    """A LoRA file cannot be read as a LoRA for this Flux model."""


def parse_blocks(spec: str) -> dict[str, tuple[tuple[int, int], ...]]:
    """'double:0-7,single:10-20,single:30' -> {'double_blocks': ((0, 7),), 'single_blocks':
    ((10, 20), (30, 30))}, inclusive ranges. A kind not named gets no LoRA; '' = every block."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    for item in filter(None, (s.strip() for s in spec.split(","))):
        kind, sep, rng = (s.strip() for s in item.partition(":"))
        if not sep or kind not in BLOCK_KINDS:
            raise LoRAConfigError(
                f"block range {item!r} in {spec!r}: expected '<kind>:<first>-<last>' with kind "
                f"'double' or 'single', e.g. 'double:0-7,single:10-20'")
        first, _, last = rng.partition("-")
        try:
            lo, hi = int(first), int(last or first)
        except ValueError:
            raise LoRAConfigError(f"block range {item!r} in {spec!r}: {rng!r} is not a number or "
                                  "a range 'first-last' of block numbers, e.g. 'double:0-7'") from None
        if lo < 0 or hi < lo:
            raise LoRAConfigError(f"block range {item!r} in {spec!r}: first block {lo} must be "
                                  f">= 0 and <= last block {hi}")
        ranges.setdefault(BLOCK_KINDS[kind], []).append((lo, hi))
    return {k: tuple(v) for k, v in ranges.items()}


@dataclass(frozen=True)
class LoRAConfig:
    """rank, alpha (scale = alpha / rank), dropout on the LoRA input while training, and
    the layers: `targets` is a set name of TARGET_SETS, a block range such as
    'double:0-7,single:10-20' (every layer of those blocks), or a sequence of layer names
    inside a block ('img_attn.qkv', 'linear1') or full BFL module names ('txt_in').
    `blocks` (same range syntax) restricts the set to those blocks; '' = every block."""
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    targets: str | tuple[str, ...] = "all"
    blocks: str = ""
    _ranges: dict = field(init=False, repr=False, compare=False)

    def __post_init__(self):
        if int(self.rank) != self.rank or self.rank < 1:
            raise LoRAConfigError(f"rank must be a whole number >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise LoRAConfigError(f"alpha must be > 0 (the update is scaled by alpha / rank, so "
                                  f"alpha {self.alpha} would never train); alpha = rank gives scale 1")
        if not 0 <= self.dropout < 1:
            raise LoRAConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        object.__setattr__(self, "rank", int(self.rank))
        object.__setattr__(self, "alpha", float(self.alpha))
        targets, blocks = self.targets, self.blocks
        if isinstance(targets, str) and ":" in targets:     # 'double:0-7' alone: every layer there
            if blocks:
                raise LoRAConfigError(f"block ranges given twice: targets={targets!r} and "
                                      f"blocks={blocks!r}; put them in one of the two")
            targets, blocks = "all", targets
        elif isinstance(targets, str) and targets not in TARGET_SETS:
            raise LoRAConfigError(f"unknown LoRA target set {targets!r}; expected one of "
                                  f"{', '.join(TARGET_SETS)}, a block range like "
                                  "'double:0-7,single:10-20', or a list of layer names")
        elif not isinstance(targets, str):
            targets = tuple(targets)
            if not targets:
                raise LoRAConfigError("targets is an empty list: name at least one layer")
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "blocks", blocks)
        object.__setattr__(self, "_ranges", parse_blocks(blocks))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def to_dict(self) -> dict:
        d = asdict(self)
        d.pop("_ranges")
        d["targets"] = d["targets"] if isinstance(d["targets"], str) else list(d["targets"])
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "LoRAConfig":
        d = dict(d)
        if not isinstance(d.get("targets", "all"), str):
            d["targets"] = tuple(d["targets"])
        return cls(**d)


def target_modules(config: LoRAConfig, params: FluxParams) -> list[str]:
    """BFL module names (no '.weight') that get a LoRA, in model order."""
    counts = {"double_blocks": params.depth, "single_blocks": params.depth_single_blocks}
    for kind, ranges in config._ranges.items():
        for lo, hi in ranges:
            if hi >= counts[kind]:
                raise LoRAConfigError(
                    f"block range {kind} {lo}-{hi} goes past the model: it has {counts[kind]} "
                    f"{kind} (numbered 0-{counts[kind] - 1})")
    linears = linear_modules(params)

    def block_selected(kind: str, index: int) -> bool:
        if not config._ranges:
            return True
        return any(lo <= index <= hi for lo, hi in config._ranges.get(kind, ()))

    if isinstance(config.targets, str):
        double, single = TARGET_SETS[config.targets]
        wanted = {"double_blocks": set(double), "single_blocks": set(single)}
        explicit: set[str] = set()
    else:
        layers = set(config.targets)
        known_layers = set(DOUBLE_LAYERS) | set(SINGLE_LAYERS)
        unknown = sorted(layers - known_layers - set(linears))
        if unknown:
            raise LoRAConfigError(
                f"unknown LoRA target layers {unknown}; expected layer names inside a block "
                f"({', '.join(DOUBLE_LAYERS + SINGLE_LAYERS)}) or Linear module names of the "
                f"model such as 'txt_in', 'double_blocks.0.img_attn.qkv'")
        wanted = {"double_blocks": layers & set(DOUBLE_LAYERS),
                  "single_blocks": layers & set(SINGLE_LAYERS)}
        explicit = layers & set(linears)

    chosen = []
    for name in linears:
        kind, _, rest = name.partition(".")
        if name in explicit:
            chosen.append(name)
        elif kind in wanted:
            index, _, layer = rest.partition(".")
            if layer in wanted[kind] and block_selected(kind, int(index)):
                chosen.append(name)
    if not chosen:
        raise LoRAConfigError(f"LoRA targets {config.targets!r} with blocks {config.blocks!r} "
                              "select no layer of this model; widen the targets or the ranges")
    return chosen


def trainable_parameters(config: LoRAConfig, params: FluxParams) -> int:
    """How many parameters the adapters of `config` train on a model of `params`
    (the memory planner counts their optimizer state)."""
    shapes = expected_shapes(params)
    return sum(config.rank * sum(shapes[f"{name}.weight"]) for name in target_modules(config, params))


# ---------------------------------------------------------------- the adapter

class LoRAAdapter(nn.Module):
    """delta(x) = up(down(dropout(x))) * alpha / rank, in x's dtype.

    `down` [rank, in] and `up` [out, rank] are float32 master weights, cast to x's dtype
    per call: a bf16 forward stays bf16 and the gradients still land in float32.
    `up` starts at zero, so a freshly attached LoRA leaves the model unchanged."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 dropout: float = 0.0, device=None):
        super().__init__()
        self.rank, self.alpha, self.dropout = rank, float(alpha), dropout
        self.down = nn.Parameter(torch.empty(rank, in_features, device=device, dtype=torch.float32))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=device, dtype=torch.float32))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """down: kaiming-uniform with a = sqrt(5) (uniform in +-1/sqrt(in), as kohya and peft);
        up: zeros. Drawn on the CPU so the same seed gives the same weights on any device."""
        down = torch.empty(self.down.shape, dtype=torch.float32)
        nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)
        with torch.no_grad():
            self.down.copy_(down)
            self.up.zero_()

    def forward(self, x: Tensor) -> Tensor:
        if self.dropout and self.training:
            x = F.dropout(x, self.dropout)
        return F.linear(F.linear(x, self.down.to(x.dtype)), (self.up * self.scale).to(x.dtype))

    def delta_weight(self) -> Tensor:
        """The [out, in] float32 weight update this adapter adds."""
        return (self.up @ self.down).detach() * self.scale

    def extra_repr(self) -> str:
        return (f"in={self.down.shape[1]}, out={self.up.shape[0]}, rank={self.rank}, "
                f"alpha={self.alpha}, dropout={self.dropout}")


def _module_seed(seed: int, name: str) -> int:
    """Each module's init depends only on the seed and its name, not on what else is targeted."""
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def targeted_layers(model: nn.Module, config: LoRAConfig) -> list[tuple[str, FrozenLinear]]:
    """(BFL name, FrozenLinear) of every layer of `model` (a Flux in BFL names) that `config`
    targets, after emptying every adapter slot of the model."""
    detach_lora(model)
    params = getattr(model, "params", None)
    if params is None:  # a bare module tree in BFL names: read the shapes off it
        params = FluxParams.from_state_dict({k: tuple(v.shape) for k, v in model.state_dict().items()})
    modules = dict(model.named_modules())
    layers = []
    for name in target_modules(config, params):
        layer = modules.get(name)
        if not isinstance(layer, FrozenLinear):
            raise LoRAConfigError(f"model has no FrozenLinear named {name!r} (found "
                                  f"{type(layer).__name__}); adapters need a fluxtrain Flux")
        layers.append((name, layer))
    return layers


def attach_lora(model: nn.Module, config: LoRAConfig, seed: int = 0) -> dict[str, LoRAAdapter]:
    """Put a fresh LoRAAdapter in the `.lora` slot of every targeted FrozenLinear of `model`
    (a Flux in BFL names), after emptying every slot. Returns {bfl module name: adapter}.
    Note: while attached, model.state_dict() also holds '<module>.lora.down/up'."""
    adapters = {}
    for name, layer in targeted_layers(model, config):
        device = layer.weight.device
        adapter = LoRAAdapter(layer.in_features, layer.out_features, config.rank, config.alpha,
                              config.dropout, device=device)
        if device.type != "meta":
            adapter.reset_parameters(torch.Generator().manual_seed(_module_seed(seed, name)))
        layer.lora = adapter
        adapters[name] = adapter
    return adapters


def detach_lora(model: nn.Module) -> int:
    """Empty every FrozenLinear's LoRA slot; returns how many were filled."""
    count = 0
    for module in model.modules():
        if isinstance(module, FrozenLinear) and module.lora is not None:
            module.lora = None
            count += 1
    return count


def adapter_deltas(adapters: Mapping[str, LoRAAdapter]) -> dict[str, Tensor]:
    """{bfl weight key: [out, in] float32 delta}, comparable with lora_deltas()."""
    return {f"{name}.weight": a.delta_weight() for name, a in adapters.items()}


# ---------------------------------------------------------------- state dict and files

def kohya_name(module: str) -> str:
    """'double_blocks.0.img_attn.qkv' -> 'lora_unet_double_blocks_0_img_attn_qkv'."""
    return "lora_unet_" + module.replace(".", "_")


def lora_state_dict(adapters: Mapping[str, LoRAAdapter]) -> dict[str, Tensor]:
    """float32 tensors under kohya names (the names of the LoRA file), for resuming."""
    out = {}
    for name, a in adapters.items():
        k = kohya_name(name)
        out[f"{k}.lora_down.weight"] = a.down.detach()
        out[f"{k}.lora_up.weight"] = a.up.detach()
        out[f"{k}.alpha"] = torch.tensor(a.alpha, dtype=torch.float32)
    return out


def load_lora_state_dict(adapters: Mapping[str, LoRAAdapter], tensors: Mapping[str, Tensor]) -> None:
    """Copy lora_state_dict() tensors (or a LoRA file of ours) back into the adapters.
    Every adapter must be present with the same shapes and alpha, and nothing else."""
    expected = lora_state_dict(adapters)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    if missing or extra:
        raise LoRAFileError(
            f"LoRA weights do not match the attached LoRA: {len(missing)} missing (e.g. "
            f"{missing[:3]}), {len(extra)} unexpected (e.g. {extra[:3]}). Resume with the same "
            "rank, alpha and targets the run was started with.")
    for name, a in adapters.items():
        k = kohya_name(name)
        alpha = float(tensors[f"{k}.alpha"])
        if not math.isclose(alpha, a.alpha, rel_tol=1e-6):
            raise LoRAFileError(f"{k}: saved alpha {alpha} but the attached LoRA has alpha "
                                f"{a.alpha}; resume with the alpha the run was started with")
        for part, param in (("lora_down", a.down), ("lora_up", a.up)):
            t = tensors[f"{k}.{part}.weight"]
            if tuple(t.shape) != tuple(param.shape):
                raise LoRAFileError(f"{k}.{part}.weight has shape {tuple(t.shape)}, the attached "
                                    f"LoRA needs {tuple(param.shape)} (different rank or model?)")
            with torch.no_grad():
                param.copy_(t)


def _metadata_str(value) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def save_lora_file(path, adapters: Mapping[str, LoRAAdapter], config: LoRAConfig,
                   metadata: Mapping | None = None, dtype: torch.dtype = torch.bfloat16) -> Path:
    """Write the LoRA as kohya-named safetensors, atomically. Default bf16: the common size
    for shared Flux LoRAs (half of float32), and ComfyUI adds it to a bf16/fp8 base anyway;
    float32 is exact (resume uses lora_state_dict, never this file). `metadata` values that
    are not strings are JSON-encoded; pass names and hashes, never paths: this function adds
    none (the file name is not recorded)."""
    check_file_dtype(dtype)
    tensors = {k: (v if k.endswith(".alpha") else v.to(dtype)) for k, v in lora_state_dict(adapters).items()}
    return atomic_write_safetensors(tensors, path, file_metadata(metadata, config, len(adapters),
                                                                 "networks.lora_flux"))


def check_file_dtype(dtype: torch.dtype) -> None:
    if dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise LoRAConfigError(f"LoRA file dtype {dtype} unsupported; use bfloat16, float16 or float32")


def file_metadata(metadata: Mapping | None, config: LoRAConfig, modules: int, network_module: str,
                  **network) -> dict[str, str]:
    """`metadata` as strings plus kohya's network keys (ss_*, and any `network` ones) and
    the config (fluxtrain_lora), as every adapter file of ours carries them."""
    meta = {_metadata_str(k): _metadata_str(v) for k, v in (metadata or {}).items()}
    meta.update({
        "ss_network_module": network_module,
        **{f"ss_network_{k}": json.dumps(v, sort_keys=True) for k, v in network.items()},
        "ss_network_dim": str(config.rank),
        "ss_network_alpha": _metadata_str(config.alpha),
        "ss_network_dropout": _metadata_str(config.dropout),
        "ss_base_model_version": "flux1",
        "fluxtrain_lora": json.dumps(config.to_dict(), sort_keys=True),
        "fluxtrain_modules": str(modules),
    })
    return meta


RUN_ID_KEY = "fluxtrain_run_id"   # metadata: the identity of the run that wrote the file


def lora_run_id(path) -> str | None:
    """The run identity a LoRA file's metadata names; None for a file no run of ours wrote
    (another trainer's, an older version's, or not a safetensors file at all)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return (f.metadata() or {}).get(RUN_ID_KEY)
    except (SafetensorError, OSError):
        return None


def check_lora_replaceable(path, run_id: str | None, overwrite: bool = False) -> None:
    """A run writes over an existing LoRA file only when the file is its own earlier output
    (its metadata names `run_id`), or when asked to with `overwrite`."""
    path = Path(path)
    if overwrite or not (path.exists() or path.is_symlink()):
        return
    owner = lora_run_id(path)
    if owner is None or owner != run_id:
        whose = ("another training run's output" if owner else
                 "not the output of a training run of this pack (or of one before it kept "
                 "run identities)")
        raise LoRAFileError(
            f"the LoRA file {path.name} already exists and is {whose}: it is left as it is. "
            "Give this run another name, or turn on overwrite_lora (--overwrite-lora on the "
            "command line) to replace that file.")


def load_lora_file(path) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors as stored, metadata str -> str). Use lora_deltas() to read any supported
    naming into BFL weight deltas, or load_lora_state_dict() to continue from our own file."""
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


# ---------------------------------------------------------------- reading other trainers' names

class Target(NamedTuple):
    module: str                              # BFL module, e.g. 'single_blocks.0.linear1'
    rows: tuple[int, int] | None = None      # (first row, count) inside the fused weight
    swap_halves: bool = False                # diffusers norm_out (scale, shift) vs BFL (shift, scale)


def _diffusers_names(p: FluxParams) -> dict[str, Target]:
    """diffusers module name -> where it lives in the BFL layout, from the checkpoint key
    map: the parts a fused BFL weight is split into (q, k, v; single blocks' linear1 also
    proj_mlp) are consecutive row slices of it."""
    widths = (p.hidden_size,) * 3 + (p.mlp_hidden_dim,)
    names = {}
    for bfl, parts in diffusers_key_map(p.depth, p.depth_single_blocks, p.guidance_embed):
        if not bfl.endswith(".weight"):  # biases and norm scales get no LoRA
            continue
        module = bfl[:-len(".weight")]
        if len(parts) == 1:
            names[parts[0][:-len(".weight")]] = Target(module, None, bfl in SWAP_HALVES)
            continue
        first = 0
        for part, width in zip(parts, widths):
            names[part[:-len(".weight")]] = Target(module, (first, width))
            first += width
    return names


def lora_key_map(params: FluxParams) -> dict[str, Target]:
    """Every LoRA module name we (and ComfyUI) accept for this model -> its BFL target."""
    key_map: dict[str, Target] = {}
    for module in linear_modules(params):
        key_map[kohya_name(module)] = Target(module)
        key_map[f"diffusion_model.{module}"] = Target(module)
    for i in range(params.depth_single_blocks):
        key_map[f"diffusion_model.single_blocks.{i}.linear1_qkv"] = Target(
            f"single_blocks.{i}.linear1", (0, 3 * params.hidden_size))
    for name, target in _diffusers_names(params).items():
        key_map[f"transformer.{name}"] = target
        key_map[f"lycoris_{name.replace('.', '_')}"] = target
        key_map[f"lora_transformer_{name.replace('.', '_')}"] = target
    return key_map


# (suffix, role): the factor spellings ComfyUI's LoRA loader reads.
FACTOR_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
)
TEXT_ENCODER_PREFIXES = ("lora_te_", "lora_te1_", "lora_te2_", "text_encoder.", "text_encoders.")


def lora_deltas(source: str | Path | Mapping[str, Tensor], params: FluxParams) -> dict[str, Tensor]:
    """{BFL weight key, e.g. 'double_blocks.0.img_attn.qkv.weight': [out, in] float32 delta},
    delta = up @ down * alpha / rank (scale 1 without alpha), for a LoRA file (path) or its
    tensors in any naming this module reads. Text-encoder LoRA keys are skipped (they do not
    touch the transformer); any other unknown key is an error."""
    tensors = load_lora_file(source)[0] if isinstance(source, (str, Path)) else source
    key_map, shapes = lora_key_map(params), expected_shapes(params)
    groups: dict[str, dict[str, Tensor]] = {}
    unknown = []
    for key, tensor in tensors.items():
        if key.startswith(TEXT_ENCODER_PREFIXES):
            continue
        for suffix, role in FACTOR_SUFFIXES:
            if key.endswith(suffix) and key[:-len(suffix)] in key_map:
                groups.setdefault(key[:-len(suffix)], {})[role] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise LoRAFileError(
            f"{len(unknown)} of {len(tensors)} LoRA keys name no layer of this Flux model "
            f"(e.g. {sorted(unknown)[:4]}). Expected kohya names (lora_unet_double_blocks_0_img_"
            "attn_qkv.lora_down.weight), diffusion_model.<layer>.lora_A.weight or diffusers "
            "names (transformer.transformer_blocks.0.attn.to_q.lora_A.weight) with block numbers "
            "inside the model. Is this a LoRA for another model (SDXL, SD3, a different Flux size)?")

    deltas: dict[str, Tensor] = {}
    for name, factors in sorted(groups.items()):
        if "down" not in factors or "up" not in factors:
            raise LoRAFileError(f"LoRA module {name!r} has {sorted(factors)} but needs both the "
                                "down (lora_down / lora_A) and up (lora_up / lora_B) factors")
        target = key_map[name]
        weight_key = f"{target.module}.weight"
        out_f, in_f = shapes[weight_key]
        down, up = factors["down"].float(), factors["up"].float()
        first, count = target.rows or (0, out_f)
        if down.ndim != 2 or up.ndim != 2 or down.shape[1] != in_f or up.shape[0] != count \
                or up.shape[1] != down.shape[0]:
            raise LoRAFileError(
                f"LoRA module {name!r}: down {tuple(down.shape)} and up {tuple(up.shape)} do not "
                f"fit {weight_key} (needs down [rank, {in_f}] and up [{count}, rank]); the LoRA "
                "was made for a Flux of another size")
        alpha = factors.get("alpha")
        scale = float(alpha) / down.shape[0] if alpha is not None else 1.0
        delta = (up @ down) * scale
        if target.swap_halves:
            delta = torch.cat(delta.chunk(2, dim=0)[::-1])
        full = deltas.setdefault(weight_key, torch.zeros(out_f, in_f))
        full[first:first + count] += delta
    return deltas
