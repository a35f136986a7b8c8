"""Reading every released Flux transformer format into BFL keys.

Formats: a single .safetensors in the original (BFL) layout in any float dtype
including float8, with or without an all-in-one prefix; ComfyUI's scaled fp8
(`<layer>.scale_weight` + a `scaled_fp8` marker); and the diffusers layout, as a
folder (`transformer/` with sharded safetensors and an index) or as one file. Tensors are read one by
one from memory-mapped files and keep their stored dtype: a float8 model stays
float8 in memory, and no bf16 copy of the whole model is ever built. Where the
weights must end up in a buffer of their own (offloading's page-locked host
memory), `stored_bytes` says where each tensor's bytes lie and `read_into` reads
them there without mapping the file, so they are not held twice.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections import Counter
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import torch
from safetensors import SafetensorError, safe_open

from .files import atomic_write_json
from .params import CheckpointError, FluxParams, count_blocks, expected_shapes, listed

# Prefixes under which all-in-one checkpoints (and some exports) store the transformer.
TRANSFORMER_PREFIXES = ("model.diffusion_model.", "diffusion_model.")
SCALED_FP8_MARKER = "scaled_fp8"
SCALE_WEIGHT = ".scale_weight"
SCALE_INPUT = ".scale_input"  # fp8 activation scale of some scaled files; unused for training
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_SINGLE = "diffusion_pytorch_model.safetensors"
DIFFUSERS_MARKER = "x_embedder.weight"   # a key only the diffusers layout has
_FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)


@dataclass
class CheckpointInfo:
    path: str                 # as given
    name: str                 # file or model folder name, no directories
    format: str               # "bfl" | "scaled_fp8" | "diffusers"
    dtype: torch.dtype        # storage dtype of the Linear weights
    params: FluxParams
    is_schnell: bool          # no guidance_in: the model takes no guidance input
    variant: str              # "dev2pro" | "dev" | "schnell" (a guess from name and keys)
    files: list[str] = field(default_factory=list)  # the safetensors holding the weights
    # Scaled fp8: {BFL layer name: float32 scale}; real weight = stored weight * scale.
    weight_scales: dict[str, torch.Tensor] = field(default_factory=dict)


# ---------------------------------------------------------------- diffusers keys

# BFL's final adaLN holds (shift, scale); diffusers' norm_out.linear holds (scale, shift).
SWAP_HALVES = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")


def diffusers_key_map(depth: int, single: int, guidance: bool) -> list[tuple[str, tuple[str, ...]]]:
    """(BFL key, the diffusers keys it is split into along dim 0) for every tensor
    a Flux transformer may have. Fused keys: qkv -> q, k, v; linear1 -> q, k, v, mlp."""
    pairs: list[tuple[str, tuple[str, ...]]] = []

    def lin(bfl, *parts):
        for s in ("weight", "bias"):
            pairs.append((f"{bfl}.{s}", tuple(f"{p}.{s}" for p in parts)))

    def norm(bfl, part):
        pairs.append((f"{bfl}.scale", (f"{part}.weight",)))

    lin("img_in", "x_embedder")
    lin("txt_in", "context_embedder")
    embedders = [("time_in", "timestep_embedder"), ("vector_in", "text_embedder")]
    if guidance:
        embedders.append(("guidance_in", "guidance_embedder"))
    for bfl, d in embedders:
        lin(f"{bfl}.in_layer", f"time_text_embed.{d}.linear_1")
        lin(f"{bfl}.out_layer", f"time_text_embed.{d}.linear_2")
    for i in range(depth):
        b, t = f"double_blocks.{i}", f"transformer_blocks.{i}"
        lin(f"{b}.img_mod.lin", f"{t}.norm1.linear")
        lin(f"{b}.txt_mod.lin", f"{t}.norm1_context.linear")
        lin(f"{b}.img_attn.qkv", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v")
        lin(f"{b}.txt_attn.qkv", f"{t}.attn.add_q_proj", f"{t}.attn.add_k_proj",
            f"{t}.attn.add_v_proj")
        norm(f"{b}.img_attn.norm.query_norm", f"{t}.attn.norm_q")
        norm(f"{b}.img_attn.norm.key_norm", f"{t}.attn.norm_k")
        norm(f"{b}.txt_attn.norm.query_norm", f"{t}.attn.norm_added_q")
        norm(f"{b}.txt_attn.norm.key_norm", f"{t}.attn.norm_added_k")
        lin(f"{b}.img_attn.proj", f"{t}.attn.to_out.0")
        lin(f"{b}.txt_attn.proj", f"{t}.attn.to_add_out")
        lin(f"{b}.img_mlp.0", f"{t}.ff.net.0.proj")
        lin(f"{b}.img_mlp.2", f"{t}.ff.net.2")
        lin(f"{b}.txt_mlp.0", f"{t}.ff_context.net.0.proj")
        lin(f"{b}.txt_mlp.2", f"{t}.ff_context.net.2")
    for i in range(single):
        b, t = f"single_blocks.{i}", f"single_transformer_blocks.{i}"
        lin(f"{b}.linear1", f"{t}.attn.to_q", f"{t}.attn.to_k", f"{t}.attn.to_v", f"{t}.proj_mlp")
        lin(f"{b}.linear2", f"{t}.proj_out")
        lin(f"{b}.modulation.lin", f"{t}.norm.linear")
        norm(f"{b}.norm.query_norm", f"{t}.attn.norm_q")
        norm(f"{b}.norm.key_norm", f"{t}.attn.norm_k")
    lin("final_layer.linear", "proj_out")
    lin("final_layer.adaLN_modulation.1", "norm_out.linear")
    return pairs


def _swap_halves(t: torch.Tensor) -> torch.Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def bfl_to_diffusers(sd: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BFL keys -> diffusers keys (split fused projections, swap the final adaLN halves)."""
    hidden = sd["img_in.weight"].shape[0]
    key_map = diffusers_key_map(count_blocks(sd, "double_blocks."),
                                count_blocks(sd, "single_blocks."),
                                "guidance_in.in_layer.weight" in sd)
    out, used = {}, set()
    for bfl, parts in key_map:
        if bfl not in sd:
            continue
        t, used = sd[bfl], used | {bfl}
        if bfl in SWAP_HALVES:
            t = _swap_halves(t)
        if len(parts) == 4:  # single block linear1: q, k, v of width hidden, then the MLP
            pieces = t.split([hidden, hidden, hidden, t.shape[0] - 3 * hidden], dim=0)
        else:
            pieces = t.chunk(len(parts), dim=0)
        out.update((p, x.contiguous()) for p, x in zip(parts, pieces))
    extra = sorted(set(sd) - used)
    if extra:
        raise CheckpointError(f"{len(extra)} BFL keys have no diffusers name: {listed(extra, 3)}; "
                              "expected only keys of a Flux transformer (see expected_shapes)")
    return out


def _diffusers_sources(keys, where: str) -> dict[str, tuple[str, ...]]:
    """{BFL key: the diffusers keys concatenated (dim 0) into it} for the keys of a
    diffusers transformer; raises for incomplete fused groups and foreign keys."""
    keys = set(keys)
    try:
        blocks = (count_blocks(keys, "transformer_blocks."),
                  count_blocks(keys, "single_transformer_blocks."))
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    key_map = diffusers_key_map(*blocks,
                                "time_text_embed.guidance_embedder.linear_1.weight" in keys)
    out, used = {}, set()
    for bfl, parts in key_map:
        present = [p for p in parts if p in keys]
        if not present:
            continue
        if len(present) != len(parts):
            missing = sorted(set(parts) - keys)
            raise CheckpointError(
                f"{where}: {missing} are missing while {present} are present; the file set is "
                "incomplete or not a Flux transformer. Re-download the model.")
        out[bfl] = parts
        used.update(parts)
    extra = sorted(keys - used)
    if extra:
        raise CheckpointError(
            f"{where}: {len(extra)} tensors have no place in a Flux transformer: {listed(extra, 3)}. "
            "Expected a FLUX.1 diffusers transformer (x_embedder, transformer_blocks.N, "
            "single_transformer_blocks.N, ...); check that this is the Flux model folder.")
    return out


def _assemble(tensors: Mapping[str, torch.Tensor], bfl: str, parts: tuple[str, ...],
              from_diffusers: bool) -> torch.Tensor:
    """The BFL tensor `bfl` from its stored pieces (one key, or diffusers' split parts)."""
    t = torch.cat([tensors[p] for p in parts], dim=0) if len(parts) > 1 else tensors[parts[0]]
    return _swap_halves(t) if from_diffusers and bfl in SWAP_HALVES else t


def diffusers_to_bfl(tensors: Mapping[str, torch.Tensor],
                     where: str = "diffusers weights") -> dict[str, torch.Tensor]:
    """diffusers keys -> BFL keys. Reads one layer at a time from `tensors` (which may
    be lazy), so only the result and one layer's pieces are in memory."""
    return {bfl: _assemble(tensors, bfl, parts, True)
            for bfl, parts in _diffusers_sources(tensors.keys(), where).items()}


# ---------------------------------------------------------------- files

class _LazyTensors(Mapping):
    """{key: tensor} over open safetensors files; a tensor is read when indexed."""

    def __init__(self, handles: dict[str, object], where: str):
        self._handles, self._where = handles, where

    def __getitem__(self, key):
        try:
            return self._handles[key].get_tensor(key)
        except SafetensorError as e:
            raise _corrupt(self._where, e) from e

    def __iter__(self) -> Iterator[str]:
        return iter(self._handles)

    def __len__(self):
        return len(self._handles)


def _corrupt(path, err) -> CheckpointError:
    return CheckpointError(
        f"{path} could not be read as a safetensors file ({err}): the file is truncated or "
        "corrupt (an interrupted download or copy?), or not a .safetensors file at all. "
        "Re-download it and check that its size matches the source.")


def _open_all(files: list[Path], stack: ExitStack) -> dict[str, object]:
    handles = {}
    for f in files:
        try:
            h = stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
        except SafetensorError as e:
            raise _corrupt(f, e) from e
        handles.update((k, h) for k in h.keys())
    return handles


@dataclass(frozen=True)
class TensorMeta:
    """What a safetensors header says about one tensor, and where its bytes lie."""
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: str = ""
    start: int = 0            # absolute offset of the first byte in `file`

    @property
    def nbytes(self) -> int:
        return self.dtype.itemsize * math.prod(self.shape)


_ST_DTYPES = {name: getattr(torch, attr) for name, attr in (
    ("BOOL", "bool"), ("U8", "uint8"), ("I8", "int8"), ("I16", "int16"), ("U16", "uint16"),
    ("I32", "int32"), ("U32", "uint32"), ("I64", "int64"), ("U64", "uint64"),
    ("F16", "float16"), ("BF16", "bfloat16"), ("F32", "float32"), ("F64", "float64"),
    ("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
) if hasattr(torch, attr)}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


def read_header(path: str | os.PathLike) -> dict[str, TensorMeta]:
    """{key: TensorMeta} from a safetensors file's header (8-byte little-endian length,
    then JSON), reading only those bytes. Checks what safe_open checks before it maps
    the file (offsets consistent with dtype and shape, data covering exactly the rest
    of the file), so a truncated or corrupt file fails here with the same error."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if not 2 <= n <= min(_MAX_HEADER, size - 8):
                raise ValueError("the header is longer than the file" if len(head) == 8
                                 else "the file is shorter than a header")
            header = json.loads(fh.read(n))
        if not isinstance(header, dict):
            raise ValueError("the header is not a JSON object")
        metas, end = {}, 0
        for key, entry in header.items():
            if key == "__metadata__":
                continue
            begin, stop = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(d) for d in entry["shape"])
            dtype = _ST_DTYPES.get(entry["dtype"])
            if dtype is None:
                raise ValueError(f"tensor {key!r} has dtype {entry['dtype']!r}, which this "
                                 f"reader does not know (known: {sorted(_ST_DTYPES)})")
            if not 0 <= begin <= stop or stop - begin != math.prod(shape) * dtype.itemsize:
                raise ValueError(f"tensor {key!r}: data_offsets {[begin, stop]} do not fit "
                                 f"{entry['dtype']} {list(shape)}")
            metas[key] = TensorMeta(dtype, shape, str(path), 8 + n + begin)
            end = max(end, stop)
        if 8 + n + end != size:
            raise ValueError(f"the header describes {8 + n + end} bytes, the file has {size}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _corrupt(path, e) from e
    return metas


def _read_headers(files: list[Path]) -> dict[str, TensorMeta]:
    metas = {}
    for f in files:
        metas.update(read_header(f))
    return metas


def _diffusers_folder(path: Path) -> Path | None:
    """The folder holding the diffusers shards: `path` or `path/transformer`, else None."""
    for d in (path, path / "transformer"):
        if (d / DIFFUSERS_INDEX).is_file() or (d / DIFFUSERS_SINGLE).is_file():
            return d
    return None


def weight_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files holding a model's weights, in shard order.
    Raises CheckpointError for a missing path, an empty folder or a missing shard."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(
            f"model path {str(path)!r} does not exist (resolved: {p.absolute()}). Expected a "
            ".safetensors file or a diffusers model folder; check the name and folder.")
    if p.is_file():
        return [p]
    d = _diffusers_folder(p)
    if d is None:
        found = sorted(x.name for x in p.iterdir())[:10]
        raise CheckpointError(
            f"{p} is a folder but holds no diffusers transformer: expected {DIFFUSERS_INDEX} "
            f"(with its shards and config.json) or {DIFFUSERS_SINGLE}, in it or in its "
            f"transformer/ subfolder; found {found or 'nothing'}. Point to the model folder "
            "or to a single .safetensors file.")
    index = d / DIFFUSERS_INDEX
    if not index.is_file():
        return [d / DIFFUSERS_SINGLE]
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{index} is not a valid diffusers index (no readable weight_map: "
                              f"{e}); re-download it.") from e
    shards = sorted(set(weight_map.values()))
    missing = [s for s in shards if not (d / s).is_file()]
    if missing:
        raise CheckpointError(
            f"{index} names shard(s) {missing} that are not in {d}: the download is incomplete. "
            "Download the missing shard(s) into that folder.")
    return [d / s for s in shards]


def checkpoint_size(path: str | os.PathLike) -> int:
    """Bytes in a model's weight files (all shards)."""
    return sum(f.stat().st_size for f in weight_files(path))


def _model_name(p: Path) -> str:
    # A diffusers model is named by its folder, not by its "transformer" subfolder.
    if p.is_dir() and p.name == "transformer":
        return p.resolve().parent.name
    return p.name


def _bfl_sources(keys, where: str):
    """Pick the transformer part of a single file: strip an all-in-one prefix, drop other
    models (VAE, text encoders), separate scaled-fp8 scales.
    Returns ({BFL key: (stored key,)}, {BFL layer: stored key of its scale}, scaled)."""
    keys = list(keys)
    prefix = next((pre for pre in TRANSFORMER_PREFIXES if any(k.startswith(pre) for k in keys)), "")
    sources, scales, scaled = {}, {}, False
    for k in keys:
        if not k.startswith(prefix):
            continue  # another model of an all-in-one checkpoint
        name = k[len(prefix):]
        if name == SCALED_FP8_MARKER:
            scaled = True
        elif name.endswith(SCALE_WEIGHT):
            scales[name[:-len(SCALE_WEIGHT)]] = k
        elif not name.endswith(SCALE_INPUT):
            sources[name] = (k,)
    orphans = sorted(layer for layer in scales if f"{layer}.weight" not in sources)
    if orphans:
        raise CheckpointError(f"{where}: scale_weight for layers {listed(orphans, 3)} that have no "
                              "weight; the file is damaged or not a Flux transformer.")
    return sources, scales, scaled or bool(scales)


@dataclass
class _Layout:
    """Where each BFL tensor of a checkpoint is stored: everything known from headers."""
    info: CheckpointInfo
    sources: dict[str, tuple[str, ...]]   # BFL key -> stored keys, concatenated on dim 0
    scales: dict[str, str]                # BFL layer -> stored key of its scale_weight
    metas: dict[str, TensorMeta]          # stored key -> its header entry


def _check_keys(shapes: Mapping[str, tuple[int, ...]], params: FluxParams, where: str):
    want = expected_shapes(params)
    missing = sorted(set(want) - set(shapes))
    extra = sorted(set(shapes) - set(want))
    wrong = [f"{k}: {shapes[k]} (expected {want[k]})"
             for k in sorted(set(want) & set(shapes)) if shapes[k] != want[k]]
    if missing or extra or wrong:
        raise CheckpointError(
            f"{where} does not match the Flux shapes inferred from it ({params}): "
            f"missing {listed(missing)}, unexpected {listed(extra)}, wrong shapes {listed(wrong)}. "
            "The file is incomplete or a Flux variant this trainer does not support.")


def _layout(path: str | os.PathLike, require_guidance: bool) -> _Layout:
    """Read the headers of a checkpoint's files (no tensor data), map its keys onto BFL
    keys, infer and check the shapes, and describe it."""
    files = weight_files(path)
    p = Path(path)
    metas = _read_headers(files)
    if p.is_dir() or DIFFUSERS_MARKER in metas:   # a folder, or one file in diffusers names
        sources, scales, fmt = _diffusers_sources(metas, str(path)), {}, "diffusers"
    else:
        sources, scales, scaled = _bfl_sources(metas, str(path))
        fmt = "scaled_fp8" if scaled else "bfl"
    parts = {bfl: [metas[k] for k in keys] for bfl, keys in sources.items()}
    shapes = {bfl: (sum(m.shape[0] for m in ms), *ms[0].shape[1:]) if len(ms) > 1 else ms[0].shape
              for bfl, ms in parts.items()}
    name = _model_name(p)
    params, is_schnell, variant = _identify(shapes, name, str(path), require_guidance)
    dtype = _weight_dtype((ms[0].dtype, shapes[bfl]) for bfl, ms in parts.items())
    info = CheckpointInfo(path=str(path), name=name, format=fmt, dtype=dtype, params=params,
                          is_schnell=is_schnell, variant=variant, files=[str(f) for f in files])
    return _Layout(info, sources, scales, metas)


def _weight_dtype(dtypes_and_shapes) -> torch.dtype:
    """Storage dtype of the Linear weights: the most common dtype of the 2-D tensors."""
    return Counter(dtype for dtype, shape in dtypes_and_shapes
                   if len(shape) == 2).most_common(1)[0][0]


def _identify(shapes, name: str, where: str, require_guidance: bool):
    """(FluxParams, is_schnell, variant guess) of a Flux from its tensor shapes, with the
    key check and the schnell refusal that every way of reading a base shares."""
    try:
        params = FluxParams.from_state_dict(shapes)
    except CheckpointError as e:
        raise CheckpointError(f"{where}: {e}") from e
    _check_keys(shapes, params, where)
    is_schnell = not params.guidance_embed
    if require_guidance and is_schnell:
        raise CheckpointError(
            f"{name} has no guidance_in layers: it is a schnell-type model that takes no "
            "guidance input, and this trainer trains only models that do (the guidance input "
            "is what Dev2Pro training feeds 1.0). Pick FLUX.1-dev or Flux-Dev2Pro as the base.")
    variant = ("dev2pro" if "dev2pro" in name.lower() else "schnell" if is_schnell else "dev")
    return params, is_schnell, variant


def describe_checkpoint(path: str | os.PathLike, require_guidance: bool = False) -> CheckpointInfo:
    """What load_state_dict would say about a checkpoint (format, dtype, params, variant,
    name, files), from the safetensors headers alone: no tensor data is read and no
    diffusers shard is concatenated, so describing a 12 GB model takes milliseconds.
    Raises the same CheckpointErrors as load_state_dict (non-Flux files, missing or
    foreign tensors, truncated files, missing shards, schnell with `require_guidance`).
    `weight_scales` stays empty: scaled-fp8 scales are tensor data (format says
    "scaled_fp8" all the same)."""
    return _layout(path, require_guidance).info


def stored_bytes(path: str | os.PathLike) -> dict[str, TensorMeta]:
    """{BFL key: where its bytes lie} for the tensors a checkpoint stores exactly as the
    model holds them (one stored tensor, no concatenation or reordering); headers only.
    Diffusers' fused projections and the reordered final layer are not in it."""
    layout = _layout(path, require_guidance=False)
    return {bfl: layout.metas[keys[0]] for bfl, keys in layout.sources.items()
            if len(keys) == 1 and not (layout.info.format == "diffusers" and bfl in SWAP_HALVES)}


def read_into(meta: TensorMeta, out: torch.Tensor) -> None:
    """Read one stored tensor's bytes from its file straight into `out` (a contiguous
    CPU tensor of the same dtype and shape) with plain reads: the file is never mapped,
    so its pages stay in the page cache instead of counting in this process's memory."""
    if out.dtype != meta.dtype or tuple(out.shape) != meta.shape or not out.is_contiguous() \
            or out.device.type != "cpu":
        raise ValueError(f"read_into: {meta.file} holds {meta.dtype} {list(meta.shape)} at byte "
                         f"{meta.start}, the destination is {out.dtype} {list(out.shape)} on "
                         f"{out.device} (contiguous: {out.is_contiguous()})")
    view = memoryview(out.view(-1).view(torch.uint8).numpy())
    try:
        with open(meta.file, "rb") as fh:
            fh.seek(meta.start)
            done = 0
            while done < meta.nbytes:
                got = fh.readinto(view[done:])
                if not got:
                    raise ValueError(f"the file ended {meta.nbytes - done} bytes early")
                done += got
    except (OSError, ValueError) as e:
        raise _corrupt(meta.file, e) from e


def load_state_dict(path: str | os.PathLike, require_guidance: bool = False
                    ) -> tuple[dict[str, torch.Tensor], CheckpointInfo]:
    """Read a Flux transformer (single .safetensors or diffusers folder) into BFL keys,
    tensors in their stored dtype. `require_guidance` rejects schnell-type models.
    Everything is checked from the headers (describe_checkpoint) before any tensor is read."""
    layout = _layout(path, require_guidance)
    info = layout.info
    diffusers = info.format == "diffusers"
    with ExitStack() as stack:
        tensors = _LazyTensors(_open_all([Path(f) for f in info.files], stack), str(path))
        sd = {bfl: _assemble(tensors, bfl, keys, diffusers) for bfl, keys in layout.sources.items()}
        info.weight_scales = {layer: tensors[k].float() for layer, k in layout.scales.items()}
    return sd, info


def load_flux(path: str | os.PathLike, device: str | torch.device = "cpu",
              require_guidance: bool = False):
    """(Flux model with the checkpoint's weights, CheckpointInfo). Linear weights keep
    their stored dtype (float8 stays float8) with scaled-fp8 scales set on their
    FrozenLinear; float8 biases and norm scales are upcast to bf16 (exactly). The
    model is frozen: no parameter requires grad."""
    sd, info = load_state_dict(path, require_guidance=require_guidance)
    return flux_from_state_dict(sd, info.params, info.weight_scales, device), info


def flux_from_state_dict(sd: Mapping[str, torch.Tensor], params: FluxParams,
                         weight_scales: Mapping[str, torch.Tensor] | None = None,
                         device: str | torch.device = "cpu"):
    """A frozen Flux built around the tensors of `sd` (BFL keys): the model's parameters
    *are* those tensors (load_state_dict(assign=True) on a meta-built model), not copies,
    wherever a tensor already has its final dtype and sits on `device`. Only float8
    biases and norm scales (upcast to bf16) and tensors on another device are copied.
    `sd` itself is not modified."""
    from .flux import Flux  # the model is only needed here, not to read files

    tensors = {}
    for k, t in sd.items():
        if t.ndim != 2 and t.dtype in _FLOAT8:
            t = t.to(torch.bfloat16)
        tensors[k] = t.to(device)
    model = Flux(params, device="meta")
    model.load_state_dict(tensors, assign=True, strict=True)
    for layer, scale in (weight_scales or {}).items():
        model.get_submodule(layer).weight_scale = scale.to(device)
    _clone_inference_tensors_autograd_saves(model)
    model.requires_grad_(False)
    return model


def _clone_inference_tensors_autograd_saves(model) -> None:
    """Tensors made under torch.inference_mode (ComfyUI loads its models so) cannot be
    saved for backward. FrozenLinear weights and biases never are (its autograd Function
    fetches them again in backward), so they stay shared; the few other parameters (norm
    scales, a few KB a block) get a normal copy when they are inference tensors."""
    from .layers import FrozenLinear

    for module in model.modules():
        if isinstance(module, FrozenLinear):
            continue
        for name, p in list(module._parameters.items()):
            if p is not None and p.is_inference():
                module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)


def describe_state_dict(sd: Mapping[str, torch.Tensor], name: str,
                        require_guidance: bool = False, fmt: str = "memory") -> CheckpointInfo:
    """CheckpointInfo of a Flux transformer already in memory ({BFL key: tensor}, e.g. the
    weights of a model another program loaded): the same shape checks and schnell check
    as describe_checkpoint. `path` is empty and `files` is empty: there is no file."""
    shapes = {k: tuple(t.shape) for k, t in sd.items()}
    params, is_schnell, variant = _identify(shapes, name, name, require_guidance)
    dtype = _weight_dtype((t.dtype, t.shape) for t in sd.values())
    return CheckpointInfo(path="", name=name, format=fmt, dtype=dtype, params=params,
                          is_schnell=is_schnell, variant=variant)


# ---------------------------------------------------------------- content hash

_HASH_CACHE: dict[tuple, str] = {}


def content_hash(path: str | os.PathLike, cache_file: str | os.PathLike | None = None) -> str:
    """sha256 (hex) of the tensor data of a model, headers excluded (like kohya's
    sshs_model_hash), over the shards in order for a diffusers folder. Streams the
    files (~10 s for 12 GB); the answer is cached per (realpath, size, mtime_ns) of
    every file, in memory and, when given, in the JSON `cache_file`, so a restarted
    program does not read the whole base again."""
    files = weight_files(path)
    key = tuple((os.path.realpath(f), st.st_size, st.st_mtime_ns)
                for f in files for st in [f.stat()])
    if key in _HASH_CACHE:
        return _HASH_CACHE[key]
    stored = _read_hash_cache(cache_file)
    name = json.dumps(key)
    if name not in stored:
        h = hashlib.sha256()
        for f in files:
            with open(f, "rb") as fh:
                header = fh.read(8)
                start = 8 + int.from_bytes(header, "little")
                if len(header) < 8 or start > f.stat().st_size:
                    raise _corrupt(f, "the header is longer than the file")
                fh.seek(start)
                while chunk := fh.read(16 << 20):
                    h.update(chunk)
        stored[name] = h.hexdigest()
        if cache_file is not None:
            atomic_write_json(cache_file, stored)
    _HASH_CACHE[key] = stored[name]
    return _HASH_CACHE[key]


def _read_hash_cache(cache_file) -> dict[str, str]:
    """The stored hashes; an unreadable cache is treated as empty (it is rebuilt)."""
    if cache_file is None:
        return {}
    try:
        stored = json.loads(Path(cache_file).read_text())
        return stored if isinstance(stored, dict) else {}
    except (OSError, ValueError):
        return {}
