"""The shipped example workflows, described once, written as UI-format JSON.

    COMFYUI_PATH=/path/to/ComfyUI python scripts/example_workflows.py

starts a throwaway headless ComfyUI with this pack, reads every node's definition
(object_info) so widget values land in the order the frontend expects, and writes
example_workflows/*.json. Model names are as ComfyUI's folders list them; the
images are read from input/training/my_subject (kohya layout).
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from scripts.comfy_server import ComfyServer, find_comfyui  # noqa: E402
from scripts.workflow_format import Node, build_ui_workflow  # noqa: E402

DEV2PRO = "flux-dev2pro-fp8.safetensors"
DEV = "flux1-dev.safetensors"
VAE = "ae.safetensors"
T5, CLIP_L = "t5xxl_fp16.safetensors", "clip_l.safetensors"
FOLDER, TRIGGER = "training/my_subject", "ohwx"
PROMPT = "a photo of ohwx dog sitting on a wooden bench in a park, golden hour"
SEED = 42
TRAIN = dict(steps=1000, learning_rate=1e-4, rank=16, alpha=16.0, seed=0, guidance=1.0)


def dataset_nodes(col: int = 0) -> list[Node]:
    return [
        Node("images", "Dev2ProImagesFromFolder", {"folder": FOLDER, "trigger_word": TRIGGER}, col),
        Node("vae", "VAELoader", {"vae_name": VAE}, col),
        Node("clip", "DualCLIPLoader", {"clip_name1": T5, "clip_name2": CLIP_L, "type": "flux"}, col),
        Node("encode", "Dev2ProEncodeDataset", {"images": ("images", 0), "vae": ("vae", 0),
                                                "clip": ("clip", 0), "resolution": 512}, col + 1),
    ]


def sampler_nodes(tag: str, model: tuple, col: int, batch: int = 1) -> list[Node]:
    """ModelSamplingFlux -> KSampler (cfg 1, the guidance is FluxGuidance's) -> VAEDecode."""
    shared = [] if tag != "a" else [
        Node("text", "CLIPTextEncode", {"text": PROMPT, "clip": ("clip", 0)}, col - 1, "Prompt"),
        Node("guidance", "FluxGuidance", {"conditioning": ("text", 0), "guidance": 3.5}, col - 1),
        Node("negative", "ConditioningZeroOut", {"conditioning": ("text", 0)}, col - 1),
        Node("latent", "EmptySD3LatentImage", {"width": 1024, "height": 1024, "batch_size": batch}, col - 1),
    ]
    return shared + [
        Node(f"shift_{tag}", "ModelSamplingFlux", {"model": model, "max_shift": 1.15, "base_shift": 0.5,
                                                   "width": 1024, "height": 1024}, col),
        Node(f"sampler_{tag}", "KSampler", {
            "model": (f"shift_{tag}", 0), "seed": SEED, "steps": 20, "cfg": 1.0, "sampler_name": "euler",
            "scheduler": "simple", "positive": ("guidance", 0), "negative": ("negative", 0),
            "latent_image": ("latent", 0), "denoise": 1.0}, col),
        Node(f"decode_{tag}", "VAEDecode", {"samples": (f"sampler_{tag}", 0), "vae": ("vae", 0)}, col),
    ]


def train_only() -> list[Node]:
    return dataset_nodes() + [
        Node("base", "Dev2ProLoadTrainingBase", {"base_name": DEV2PRO}, 1),
        Node("train", "Dev2ProTrainLoRA", {"base": ("base", 0), "dataset": ("encode", 0),
                                           "name": "dev2pro/my_subject", **TRAIN}, 2,
             "Train LoRA on Dev2Pro (guidance 1.0)"),
        Node("chart", "Dev2ProLossChart", {"run_a": ("train", 1)}, 3),
    ]


def train_then_sample() -> list[Node]:
    return train_only()[:-1] + [
        Node("unet", "UNETLoader", {"unet_name": DEV, "weight_dtype": "default"}, 3, "Flux-dev (sampling)"),
        Node("apply", "Dev2ProApplyLoRA", {"model": ("unet", 0), "strength": 1.0, "run": ("train", 1)}, 3),
        *sampler_nodes("a", ("unet", 0), 5),
        *sampler_nodes("b", ("apply", 0), 6),
        Node("grid", "Dev2ProCompareGrid", {
            "images_a": ("decode_a", 0), "images_b": ("decode_b", 0), "prompts": PROMPT, "seed": SEED,
            "strength": 1.0, "run_b": ("train", 1), "label_a": "Flux-dev without LoRA"}, 7),
        Node("save_grid", "SaveImage", {"images": ("grid", 0), "filename_prefix": "dev2pro/with_without"}, 7),
    ]


def ab() -> list[Node]:
    same = {k: v for k, v in TRAIN.items() if k != "guidance"}
    return dataset_nodes() + [
        Node("base_a", "Dev2ProLoadTrainingBase", {"base_name": DEV2PRO}, 1, "A: Flux-Dev2Pro"),
        Node("base_b", "Dev2ProLoadTrainingBase", {"base_name": DEV}, 1, "B: FLUX.1-dev"),
        Node("train_a", "Dev2ProTrainLoRA", {"base": ("base_a", 0), "dataset": ("encode", 0),
                                             "name": "ab/dev2pro_g1", "guidance": 1.0, **same}, 2,
             "A: train on Dev2Pro at guidance 1.0"),
        Node("train_b", "Dev2ProTrainLoRA", {"base": ("base_b", 0), "dataset": ("encode", 0),
                                             "name": "ab/dev", "guidance": 1.0, **same}, 3,
             "B: train on dev (same settings, guidance as chosen)"),
        Node("unet", "UNETLoader", {"unet_name": DEV, "weight_dtype": "default"}, 4, "Flux-dev (sampling)"),
        Node("apply_a", "Dev2ProApplyLoRA", {"model": ("unet", 0), "strength": 1.0, "run": ("train_a", 1)}, 4),
        Node("apply_b", "Dev2ProApplyLoRA", {"model": ("unet", 0), "strength": 1.0, "run": ("train_b", 1)}, 4),
        *sampler_nodes("a", ("apply_a", 0), 6, batch=2),
        *sampler_nodes("b", ("apply_b", 0), 7, batch=2),
        Node("grid", "Dev2ProCompareGrid", {
            "images_a": ("decode_a", 0), "images_b": ("decode_b", 0), "prompts": PROMPT, "seed": SEED,
            "strength": 1.0, "run_a": ("train_a", 1), "run_b": ("train_b", 1)}, 8),
        Node("save_grid", "SaveImage", {"images": ("grid", 0), "filename_prefix": "dev2pro/ab_grid"}, 8),
        Node("chart", "Dev2ProLossChart", {"run_a": ("train_a", 1), "run_b": ("train_b", 1)}, 9),
        Node("save_chart", "SaveImage", {"images": ("chart", 0), "filename_prefix": "dev2pro/ab_loss"}, 9),
    ]


WORKFLOWS = {
    "dev2pro_train_then_sample_with_and_without_lora": train_then_sample,
    "dev2pro_vs_dev_lora_ab": ab,
    "dev2pro_train_lora_only": train_only,
}


def write_all(object_info: dict, folder: Path = REPO / "example_workflows") -> list[Path]:
    folder.mkdir(exist_ok=True)
    written = []
    for name, make in WORKFLOWS.items():
        path = folder / f"{name}.json"
        path.write_text(json.dumps(build_ui_workflow(make(), object_info), indent=1) + "\n")
        written.append(path)
    return written


def main() -> int:
    comfyui = find_comfyui()
    if comfyui is None:
        print("ComfyUI not found: set COMFYUI_PATH", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as base, ComfyServer(comfyui, Path(base)) as server:
        for path in write_all(server.object_info()):
            print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
