"""The main job in one command: the Dev2Pro-vs-dev A/B workflow, end to end, through
a ComfyUI server, writing the comparison grid and the loss chart.

    # with real weights, against your running ComfyUI (images in input/training/my_subject):
    python scripts/demo_ab.py --url http://127.0.0.1:8188 --out ab_results

    # no Flux weights? a SMOKE DEMO on small random models, on a CPU, in a few minutes:
    COMFYUI_PATH=/path/to/ComfyUI python scripts/demo_ab.py --out ab_results

The smoke demo starts a throwaway headless ComfyUI (loopback only) with this pack,
writes random Flux (hidden 3072, 1+1 blocks), CLIP-L and Flux VAE files and a few
synthetic training images, and runs example_workflows/dev2pro_vs_dev_lora_ab.json
with tiny sizes. Its pictures are noise from random weights: it shows the graph
working, not the quality of a LoRA.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

AB_WORKFLOW = REPO / "example_workflows" / "dev2pro_vs_dev_lora_ab.json"
SMOKE_NAMES = {"flux": "demo-flux-dev.safetensors", "dev2pro": "demo-flux-dev2pro.safetensors",
               "clip_l": "demo-clip-l.safetensors", "vae": "demo-flux-ae.safetensors"}
SMOKE_SIZE, SMOKE_SAMPLE_STEPS = 64, 2
SMOKE_TRAIN = dict(steps=8, rank=4, alpha=4.0, learning_rate=0.02, memory="fast",
                   compute_dtype="float32", checkpoint_every=0)


def for_small_models(prompt: dict, flux: str, dev2pro: str, clip_l: str, vae: str, *,
                     size: int = SMOKE_SIZE, sample_steps: int = SMOKE_SAMPLE_STEPS, **train) -> dict:
    """An API prompt of a shipped workflow, moved onto small models: the shipped model
    names replaced, the two-encoder Flux CLIP replaced by one CLIP-L, sizes and step
    counts shrunk, `train` settings set on every Train node."""
    names = {"flux1-dev.safetensors": flux, "flux-dev2pro-fp8.safetensors": dev2pro}
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "Dev2ProLoadTrainingBase":
            inputs["base_name"] = names[inputs["base_name"]]
        elif kind == "UNETLoader":
            inputs["unet_name"] = names[inputs["unet_name"]]
        elif kind == "VAELoader":
            inputs["vae_name"] = vae
        elif kind == "DualCLIPLoader":
            node["class_type"] = "CLIPLoader"
            node["inputs"] = {"clip_name": clip_l, "type": "stable_diffusion", "device": "default"}
        elif kind == "EmptySD3LatentImage":
            inputs.update(width=size, height=size, batch_size=1)
        elif kind == "ModelSamplingFlux":
            inputs.update(width=size, height=size)
        elif kind == "KSampler":
            inputs["steps"] = sample_steps
        elif kind == "Dev2ProEncodeDataset":
            inputs["resolution"] = size
        elif kind == "Dev2ProTrainLoRA":
            inputs.update(train)
    return prompt


def write_demo_images(root: Path) -> None:
    """A kohya folder: two captioned images repeated twice, one RGBA image without a
    caption and one unreadable file (both reported by name, not fatal)."""
    folder = root / "2_dog"
    folder.mkdir(parents=True, exist_ok=True)
    ramp = np.linspace(0, 255, 96, dtype=np.uint8)
    for i, caption in enumerate(["a dog on grass", "a dog on a bench"]):
        rgb = np.stack([np.tile(ramp, (80, 1)), np.tile(ramp[::-1], (80, 1)),
                        np.full((80, 96), 60 + 90 * i, np.uint8)], axis=-1)
        Image.fromarray(rgb).save(folder / f"dog{i}.png")
        (folder / f"dog{i}.txt").write_text(caption)
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:48, 16:48] = (200, 40, 40, 255)
    Image.fromarray(rgba, "RGBA").save(root / "uncaptioned.png")
    (root / "broken.png").write_bytes(b"not an image")


def _saved(entry: dict, prefix: str) -> list[dict]:
    return [img for out in entry["outputs"].values() for img in out.get("images", [])
            if img["type"] == "output" and img["filename"].startswith(prefix.rsplit("/", 1)[-1])]


def run_ab(server, prompt: dict, workflow: dict, out: Path, timeout: float) -> list[Path]:
    """Queue the A/B as the frontend would, wait, fetch the grid and chart through /view."""
    started = time.monotonic()
    prompt_id = server.queue(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}})
    print(f"queued A/B prompt {prompt_id}; waiting (training twice, then sampling)...", flush=True)
    entry = server.wait(prompt_id, timeout=timeout)
    print(f"done in {time.monotonic() - started:.0f} s")
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for prefix, name in (("dev2pro/ab_grid", "ab_grid.png"), ("dev2pro/ab_loss", "ab_loss.png")):
        for img in _saved(entry, prefix)[:1]:
            query = urllib.parse.urlencode(img)
            (out / name).write_bytes(server.get(f"/view?{query}", timeout=60))
            written.append(out / name)
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="a running ComfyUI with the real models and this pack installed")
    parser.add_argument("--out", type=Path, default=Path("ab_results"), help="where the grid and chart go")
    parser.add_argument("--timeout", type=float, default=6 * 3600)
    args = parser.parse_args(argv)

    from scripts.comfy_server import ComfyServer
    from scripts.workflow_format import ui_to_api

    workflow = json.loads(AB_WORKFLOW.read_text())
    if args.url:
        server = ComfyServer.attach(args.url)
        prompt = ui_to_api(workflow, server.object_info())
        written = run_ab(server, prompt, workflow, args.out, args.timeout)
    else:
        written = smoke_demo(workflow, args.out, args.timeout)
    for path in written:
        print(f"wrote {path}")
    return 0 if len(written) == 2 else 1


def smoke_demo(workflow: dict, out: Path, timeout: float) -> list[Path]:
    from scripts import demo_models as models
    from scripts.comfy_server import ComfyServer, find_comfyui
    from scripts.workflow_format import ui_to_api

    comfyui = find_comfyui()
    if comfyui is None:
        raise SystemExit("ComfyUI not found: set COMFYUI_PATH to a ComfyUI checkout, or pass --url")
    print("=" * 72 + "\nSMOKE DEMO on small RANDOM models (no Flux weights used): the images are\n"
          "noise; this shows the whole A/B graph working, not LoRA quality.\n" + "=" * 72, flush=True)
    with tempfile.TemporaryDirectory(prefix="dev2pro-demo-") as tmp:
        base = Path(tmp) / "comfyui"
        server = ComfyServer(comfyui, base)
        server.launch()
        try:
            n = SMOKE_NAMES
            models.write_flux(server.model_path("diffusion_models", n["flux"]))
            # A second random base stands in for Dev2Pro, so the two runs differ.
            models.write_flux(server.model_path("diffusion_models", n["dev2pro"]), seed=1)
            models.write_clip_l(server.model_path("text_encoders", n["clip_l"]))
            models.write_flux_vae(server.model_path("vae", n["vae"]))
            write_demo_images(server.input_dir / "training" / "my_subject")
            server.wait_until_up()
            prompt = for_small_models(ui_to_api(workflow, server.object_info()), n["flux"], n["dev2pro"],
                                      n["clip_l"], n["vae"], **SMOKE_TRAIN)
            written = run_ab(server, prompt, workflow, out, timeout)
        finally:
            server.stop()
        shutil.copy(server.log_path, out / "comfyui.log") if out.exists() else None
    return written


if __name__ == "__main__":
    sys.exit(main())
