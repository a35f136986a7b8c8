"""What every node of the pack shares: ComfyUI's folders behind path checks, and the
recipe metadata a saved file carries (the handles between nodes: nodes.handles).

Names typed in a node (a LoRA name, a run name, a dataset folder) come from
shared workflow JSON and are untrusted: every one goes through
`fluxtrain.files.safe_join` against the ComfyUI folder it names a file in, so
`..` and absolute paths are refused; a name written to may not lead through a link
out of its folder, while links the user placed in the model and input folders are
followed for reading, as ComfyUI does.
"""

from __future__ import annotations

import json
from pathlib import Path

import folder_paths

from ..fluxtrain import state
from ..fluxtrain.files import inside_roots, safe_join
from .handles import BaseHandle, DatasetHandle, ImageFile, RunHandle

CATEGORY = "training/dev2pro"

LORA_SUFFIX = ".safetensors"
RUNS_FOLDER = "dev2pro/runs"          # under ComfyUI's output folder
DATASETS_FOLDER = "dev2pro/datasets"  # under ComfyUI's output folder
BASE_HASHES_FILE = "dev2pro/base_hashes.json"  # content hashes of bases, kept across restarts


def loras_root() -> Path:
    """The first `loras` folder: where LoraLoaderModelOnly lists files from."""
    return Path(folder_paths.get_folder_paths("loras")[0])


def output_root() -> Path:
    return Path(folder_paths.get_output_directory())


def input_root() -> Path:
    return Path(folder_paths.get_input_directory())


def clean_name(name: str) -> str:
    """A run / LoRA name as typed, without surrounding blanks or a .safetensors suffix."""
    name = str(name).strip()
    if name.lower().endswith(LORA_SUFFIX):
        name = name[: -len(LORA_SUFFIX)]
    return name


def lora_file(name: str) -> tuple[Path, str]:
    """(absolute path under models/loras, the name LoraLoaderModelOnly lists) for a run name."""
    relative = clean_name(name) + LORA_SUFFIX
    path = safe_join(loras_root(), relative, what="LoRA name")
    return path, path.relative_to(loras_root()).as_posix()


def runs_root() -> Path:
    return output_root() / RUNS_FOLDER


def run_folder(name: str) -> Path:
    """The run's resumable-state folder, output/dev2pro/runs/<name>.run (never inside
    another run's: fluxtrain.state.run_folder)."""
    return state.run_folder(runs_root(), clean_name(name))


def base_hashes_file() -> Path:
    return output_root() / BASE_HASHES_FILE


def datasets_root() -> Path:
    return output_root() / DATASETS_FOLDER


def input_folder(name: str) -> Path:
    """A folder under ComfyUI's input folder (for image datasets); links placed there are
    followed for reading, as ComfyUI's LoadImage does."""
    return safe_join(input_root(), str(name).strip(), what="image folder",
                     example="training/my_subject", follow_links=True)


def model_roots() -> list[str]:
    """Every folder a training base may come from (unet is an alias of diffusion_models)."""
    return [*folder_paths.get_folder_paths("diffusion_models"),
            *folder_paths.get_folder_paths("checkpoints")]


# Paths carried by handles, checked again where they are used (nodes.handles says why).
def base_path(base: BaseHandle) -> Path | None:
    """The base's file or folder (None for a MODEL without one), inside the model folders."""
    if base.path is None:
        return None
    return inside_roots(base.path, model_roots(), what="training base", follow_links=True)


def dataset_path(dataset: DatasetHandle) -> Path:
    return inside_roots(dataset.path, [datasets_root()], what="encoded dataset", follow_links=False)


def image_path(image: ImageFile) -> Path:
    return inside_roots(image.path, [input_root()], what="training image", follow_links=True)


def forget_lora_list() -> None:
    """Make the next LoRA listing rescan the folder (the cache is keyed by folder mtimes,
    which a new file in an existing sub-folder does not always change in time)."""
    folder_paths.filename_list_cache.pop("loras", None)


def recipe_metadata(prompt, extra_pnginfo) -> dict[str, str]:
    """The graph that produced a file: the API prompt and the UI workflow, as SaveImage
    embeds them, unless ComfyUI runs with --disable-metadata."""
    from comfy.cli_args import args

    if args.disable_metadata:
        return {}
    meta = {}
    if prompt is not None:
        meta["prompt"] = json.dumps(prompt)
    for key, value in (extra_pnginfo or {}).items():
        meta[str(key)] = json.dumps(value)
    return meta


def run_label(run: RunHandle | None, fallback: str) -> str:
    """'dev2pro LoRA (trained at guidance 1.0)' for a run, else the fallback text."""
    if run is None:
        return fallback
    return f"{run.variant} LoRA (trained at guidance {run.guidance:g})"
