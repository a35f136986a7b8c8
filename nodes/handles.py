"""The handles the pack's nodes pass to each other, and what each holds.

    Load Training Base / Training Base from MODEL --BaseHandle--> Train LoRA
    Training Images from Folder / from IMAGE Batch --ImagesHandle--> Encode Dataset
    Encode Dataset --DatasetHandle--> Train LoRA
    Train LoRA --RunHandle--> Apply LoRA, Compare Grid, Loss Chart

Light values (names, paths, numbers; a MODEL reference; an IMAGE batch), never weights.
Only the pack's nodes make them. ComfyUI passes a literal typed into an API-format
workflow (POST /prompt, a shared workflow_api.json) straight to a node input of a custom
type, so a node that receives a handle refuses anything that is not an instance of its
class (`require`): JSON can never be one. Every path a handle carries is checked again
against ComfyUI's folders where it is used (nodes.common), in case a handle ever comes
from somewhere else.

Frozen dataclasses: ComfyUI caches node outputs by their inputs' signature, never by
the value, and shows only a node's `ui` dict, so a handle needs no JSON form.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from comfy_api.latest import io


class ForgedHandleError(TypeError):
    """A node input of a handle type got something no node of the pack made."""


@dataclass(frozen=True, eq=False)
class BaseHandle:
    """A training base: a file or folder in ComfyUI's model folders, or a loaded MODEL."""
    MADE_BY: ClassVar[str] = "Load Training Base or Training Base from MODEL"
    name: str                   # file or model folder name (no folders), or "MODEL input"
    format: str                 # bfl | scaled_fp8 | diffusers | MODEL
    dtype: str                  # storage dtype of the Linear weights
    variant: str                # dev2pro | dev
    blocks: str                 # "19+38"
    hidden_size: int
    guidance_embed: bool
    summary: str                # one line for the console and the node's info output
    path: str | None = None     # the file or folder, inside ComfyUI's model folders
    model: object = field(default=None, repr=False)   # a MODEL base's ModelPatcher (shared)
    size: int = 0               # bytes of a MODEL base's tensors


@dataclass(frozen=True)
class ImageFile:
    """One training image of a folder under ComfyUI's input folder."""
    path: str                   # the file, inside the input folder
    caption: str
    repeats: int
    source: str                 # the path relative to the input folder, for messages


@dataclass(frozen=True, eq=False)
class ImagesHandle:
    """Training images before encoding: the files of a folder, or an IMAGE batch."""
    MADE_BY: ClassVar[str] = "Training Images from Folder or from IMAGE Batch"
    files: tuple[ImageFile, ...] = ()
    batch: torch.Tensor | None = field(default=None, repr=False)   # [B, H, W, C] in [0, 1]
    captions: tuple[str, ...] = ()      # one per batch image
    repeats: int = 1                    # of each batch image
    problems: tuple[str, ...] = ()      # what reading the folder reported


@dataclass(frozen=True, eq=False)
class DatasetHandle:
    """An encoded dataset in the pack's cache (output/dev2pro/datasets/<key>)."""
    MADE_BY: ClassVar[str] = "Encode Training Dataset"
    path: str                   # the dataset folder, inside the datasets cache
    key: str                    # its content key (the folder name)
    reused: bool                # True when the cache already held it
    samples: int
    buckets: dict               # {"<w>x<h>": samples}
    resolution: int
    summary: str


@dataclass(frozen=True, eq=False)
class RunHandle:
    """What a training run made."""
    MADE_BY: ClassVar[str] = "Train LoRA"
    name: str                   # the run name
    lora: str                   # the LoRA file as LoraLoaderModelOnly lists it
    base: str                   # the base's name
    variant: str
    guidance: float
    settings: dict              # TrainConfig.to_dict()
    losses: tuple[float, ...]   # per step
    steps: int
    dataset: str                # the dataset's content key


# ComfyUI socket types: a link carries a handle only between sockets of the same type.
BaseType = io.Custom("DEV2PRO_BASE")
ImagesType = io.Custom("DEV2PRO_IMAGES")
DatasetType = io.Custom("DEV2PRO_DATASET")
RunType = io.Custom("DEV2PRO_RUN")


def require(value, kind: type, node_input: str, optional: bool = False):
    """`value` if it is a `kind` a node of the pack made (or None for an optional input);
    else ForgedHandleError."""
    if isinstance(value, kind) or (optional and value is None):
        return value
    got = type(value).__name__
    raise ForgedHandleError(
        f"input '{node_input}' got a {got}, not a {kind.__name__} made by {kind.MADE_BY}: "
        f"connect that node's output. A value typed into an API-format workflow is refused "
        f"here, since it could name any file on this machine.")
