"""What every node of the pack shares: socket types, ComfyUI's folders behind
path checks, and the recipe metadata a saved file carries.

Names typed in a node (a LoRA name, a run name, a dataset folder) come from
shared workflow JSON and are untrusted: every one goes through
`fluxtrain.files.safe_join` against the ComfyUI folder it names a file in, so
`..`, absolute paths and links that leave the folder are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import folder_paths
from comfy_api.latest import io

from ..fluxtrain import state
from ..fluxtrain.files import safe_join

CATEGORY = "training/dev2pro"

# Light handles passed between the pack's nodes: paths, names and numbers, never weights.
BaseType = io.Custom("DEV2PRO_BASE")        # a training base on disk + what it is
ImagesType = io.Custom("DEV2PRO_IMAGES")    # images (or their files) + captions + repeats, not encoded
DatasetType = io.Custom("DEV2PRO_DATASET")  # an encoded dataset folder + summary
RunType = io.Custom("DEV2PRO_RUN")          # what a training run produced (LoRA file, base, guidance, losses)

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
    """A folder under ComfyUI's input folder (for image datasets)."""
    return safe_join(input_root(), str(name).strip(), what="image folder")


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


def run_label(run: dict | None, fallback: str) -> str:
    """'dev2pro LoRA (trained at guidance 1.0)' for a run, else the fallback text."""
    if not run:
        return fallback
    return f"{run['variant']} LoRA (trained at guidance {run['guidance']:g})"
