"""Dev2ProLoadTrainingBase: pick the model to train on, get a light handle.
Dev2ProBaseFromModel: the same handle for a Flux MODEL ComfyUI already loaded.

The node reads only the safetensors headers (keys, shapes, dtypes; no tensor
data), and passes on a path and a description. Train loads the weights itself
and releases them when done, so no 12 GB model stays in ComfyUI's output cache.
A MODEL handle holds a reference to the ModelPatcher (which ComfyUI caches anyway);
Train builds its Flux around that model's tensors, never a copy of them.
"""

from __future__ import annotations

import os
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..fluxtrain.checkpoint import DIFFUSERS_INDEX, DIFFUSERS_SINGLE, describe_checkpoint
from ..fluxtrain.files import UnsafePathError, safe_join
from ..fluxtrain.params import CheckpointError
from .common import CATEGORY
from .handles import BaseHandle, BaseType

CHECKPOINTS_TAG = "[checkpoints] "   # a file from models/checkpoints (all-in-one files)
DIFFUSERS_TAG = " [diffusers]"       # a diffusers model folder under models/diffusion_models
WEIGHT_SUFFIXES = (".safetensors", ".sft")
VARIANTS = ("auto", "dev2pro", "dev")


def _diffusers_folders(root: Path, depth: int = 2) -> list[str]:
    """Sub-folders of `root` holding a diffusers transformer (in them or in transformer/)."""
    found = []
    for dirpath, dirnames, _ in os.walk(root, followlinks=True):
        here = Path(dirpath)
        level = len(here.relative_to(root).parts)
        if level >= depth:
            dirnames[:] = []
        for d in (here, here / "transformer"):
            if level > 0 and ((d / DIFFUSERS_INDEX).is_file() or (d / DIFFUSERS_SINGLE).is_file()):
                found.append(here.relative_to(root).as_posix())
                dirnames[:] = []
                break
    return found


def base_choices() -> list[str]:
    """Every training base ComfyUI's folders hold, named as the node lists them."""
    files = [n for n in folder_paths.get_filename_list("diffusion_models")
             if n.lower().endswith(WEIGHT_SUFFIXES)]
    folders = sorted({f + DIFFUSERS_TAG for root in folder_paths.get_folder_paths("diffusion_models")
                      for f in _diffusers_folders(Path(root))})
    checkpoints = [CHECKPOINTS_TAG + n for n in folder_paths.get_filename_list("checkpoints")
                   if n.lower().endswith(WEIGHT_SUFFIXES)]
    return files + folders + checkpoints


def resolve_base(choice: str) -> Path:
    """The file or folder a listed name stands for, inside ComfyUI's model folders."""
    folder, name = "diffusion_models", choice
    if choice.startswith(CHECKPOINTS_TAG):
        folder, name = "checkpoints", choice[len(CHECKPOINTS_TAG):]
    elif choice.endswith(DIFFUSERS_TAG):
        name = choice[: -len(DIFFUSERS_TAG)]
    for root in folder_paths.get_folder_paths(folder):
        # Links placed in a model folder are followed, as ComfyUI's loaders do; the name
        # itself may not climb out of the folder.
        path = safe_join(root, name, what="model name", example="flux-dev2pro-fp8.safetensors",
                         follow_links=True)
        if path.exists():
            return path
    raise CheckpointError(f"{name!r} is not in ComfyUI's {folder} folders "
                          f"({', '.join(folder_paths.get_folder_paths(folder))}); put the model "
                          "there and refresh (press R), then pick it from the list")


def describe(path: Path, variant: str = "auto") -> BaseHandle:
    """The handle: where the base is and what it is, from the file headers alone."""
    info = describe_checkpoint(path, require_guidance=True)
    return _handle(info, variant, f"{info.format} {_dtype(info)}", path=str(path))


def _dtype(info) -> str:
    return str(info.dtype).replace("torch.", "")


def _handle(info, variant: str, storage: str, **extra) -> BaseHandle:
    """The fields every base handle carries, whatever the base came from."""
    p = info.params
    variant = info.variant if variant == "auto" else variant
    blocks = f"{p.depth}+{p.depth_single_blocks}"
    return BaseHandle(name=info.name, format=info.format, dtype=_dtype(info), variant=variant,
                      blocks=blocks, hidden_size=p.hidden_size, guidance_embed=p.guidance_embed,
                      summary=f"{info.name}: {variant}, {storage}, {blocks} blocks of {p.hidden_size}",
                      **extra)


class Dev2ProLoadTrainingBase(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProLoadTrainingBase",
            display_name="Load Training Base (Dev2Pro / Flux-dev)",
            category=CATEGORY,
            description="Picks the Flux transformer to train a LoRA on: Flux-Dev2Pro (recommended: "
                        "dev fine-tuned with guidance held at 1.0, which undoes dev's guidance "
                        "distillation) or FLUX.1-dev for comparison. Passes a light handle (path "
                        "and description); the weights are loaded only while training.",
            inputs=[
                io.Combo.Input("base_name", options=base_choices(),
                               tooltip="From models/diffusion_models (or unet), a diffusers folder "
                                       "there, or models/checkpoints. Float8, scaled fp8, bf16 and "
                                       "diffusers layouts are all read."),
                io.Combo.Input("variant", options=list(VARIANTS), default="auto",
                               tooltip="What this base is, for labels and metadata. auto: 'dev2pro' "
                                       "when the name says so, else 'dev'."),
            ],
            outputs=[
                BaseType.Output(display_name="base", tooltip="Light handle: path + description."),
                io.String.Output(display_name="info", tooltip="What was found in the file."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, base_name, variant):
        try:  # a replaced file under the same name is a new base
            st = resolve_base(base_name).stat()
            return f"{base_name}|{variant}|{st.st_size}|{st.st_mtime_ns}"
        except (CheckpointError, UnsafePathError, OSError):
            return f"{base_name}|{variant}"

    @classmethod
    def execute(cls, base_name, variant) -> io.NodeOutput:
        handle = describe(resolve_base(base_name), variant)
        print(f"[dev2pro] training base {handle.summary}", flush=True)
        return io.NodeOutput(handle, handle.summary, ui={"text": [handle.summary]})


# ---------------------------------------------------------------- a MODEL as the base

MODEL_INPUT = "MODEL input"
# Keys ComfyUI's state dict carries next to a quantised weight; not part of the BFL layout.
COMFY_EXTRA_SUFFIXES = (".comfy_quant", ".weight_scale", ".input_scale", ".scale_weight",
                        ".scale_input")


def flux_module(model):
    """The FLUX.1 transformer (comfy.ldm.flux.model.Flux) of a ModelPatcher, or a clear error."""
    import comfy.model_base

    inner = getattr(model, "model", None)
    dm = getattr(inner, "diffusion_model", None)
    if (not isinstance(inner, comfy.model_base.Flux) or type(dm).__name__ != "Flux"
            or type(dm).__module__ != "comfy.ldm.flux.model"):
        raise CheckpointError(
            f"Dev2Pro Base from MODEL needs a FLUX.1 model (UNETLoader with a Flux-Dev2Pro or "
            f"FLUX.1-dev file); this MODEL is {type(inner).__name__} with a "
            f"{type(dm).__module__}.{type(dm).__name__} transformer. Load a Flux transformer, or "
            "use Load Training Base to pick the file.")
    return dm


def model_tensors(model) -> dict[str, torch.Tensor]:
    """{BFL key: tensor} of a MODEL's Flux transformer: references to ComfyUI's own tensors
    (state_dict() detaches, it does not copy); quantised weights stay QuantizedTensor."""
    return {k: t for k, t in flux_module(model).state_dict().items()
            if isinstance(t, torch.Tensor) and not k.endswith(COMFY_EXTRA_SUFFIXES)}


def model_source_file(prompt, node_id) -> str | None:
    """The file name a UNETLoader wired straight into node `node_id` loaded, else None."""
    try:
        link = prompt[str(node_id)]["inputs"]["model"]
        source = prompt[str(link[0])]
        name = source["inputs"]["unet_name"] if source["class_type"] == "UNETLoader" else None
    except (KeyError, TypeError, IndexError):
        return None
    return name if isinstance(name, str) else None


def describe_model(model, variant: str = "auto", file_name: str | None = None) -> BaseHandle:
    """The handle of a MODEL base: the ModelPatcher itself (a reference; no tensor is
    copied) plus the same description fields as a file handle."""
    from ..fluxtrain.checkpoint import describe_state_dict

    tensors = model_tensors(model)
    name = Path(file_name).name if file_name else MODEL_INPUT
    info = describe_state_dict(tensors, name, require_guidance=True, fmt="MODEL")
    path = folder_paths.get_full_path("diffusion_models", file_name) if file_name else None
    return _handle(info, variant, f"MODEL input {_dtype(info)} (shared with ComfyUI, no copy)",
                   model=model, path=path,
                   size=sum(t.numel() * t.element_size() for t in tensors.values()))


class Dev2ProBaseFromModel(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProBaseFromModel",
            display_name="Training Base from MODEL (Dev2Pro / Flux-dev)",
            category=CATEGORY,
            description="Uses a Flux MODEL from ComfyUI's UNETLoader as the training base, without a "
                        "second copy of the weights: training references the loaded model's tensors "
                        "and never changes them (the MODEL samples exactly as before).",
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 MODEL (Dev2Pro or dev) from UNETLoader. "
                                                "Schnell and non-Flux models are refused."),
                io.Combo.Input("variant", options=list(VARIANTS), default="auto",
                               tooltip="What this base is, for labels and metadata. auto: 'dev2pro' "
                                       "when the UNETLoader's file name says so, else 'dev'."),
            ],
            outputs=[
                BaseType.Output(display_name="base",
                                tooltip="Light handle: a reference to the MODEL + description."),
                io.String.Output(display_name="info", tooltip="What the MODEL holds."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, variant) -> io.NodeOutput:
        file_name = model_source_file(cls.hidden.prompt, cls.hidden.unique_id)
        handle = describe_model(model, variant, file_name)
        print(f"[dev2pro] training base {handle.summary}", flush=True)
        return io.NodeOutput(handle, handle.summary, ui={"text": [handle.summary]})
