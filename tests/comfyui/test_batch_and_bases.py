"""Datasets from an IMAGE batch of the graph, a diffusers-folder training base, and
LoRA files without the graph when ComfyUI runs with --disable-metadata: each
through a real ComfyUI, on the small generated models, with the fewest steps."""

from __future__ import annotations

import json
import time

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from fluxtrain.checkpoint import load_state_dict
from fluxtrain.synthetic import write_diffusers

from scripts.comfy_server import ComfyError, ComfyServer, copy_into, find_comfyui, lora_keys_not_loaded

RED, BLUE, GREEN = 0xFF0000, 0x0000FF, 0x00FF00
DIFFUSERS_BASE = "test-flux-dev2pro-diffusers"   # a folder under models/diffusion_models
TRAIN = dict(steps=2, rank=4, alpha=4.0, learning_rate=0.02, memory="fast",
             compute_dtype="float32", checkpoint_every=0)
TIMEOUT = 600


# ---------------------------------------------------------------- graph pieces

def loaders(models) -> dict:
    return {"vae": {"class_type": "VAELoader", "inputs": {"vae_name": models.vae}},
            "clip": {"class_type": "CLIPLoader",
                     "inputs": {"clip_name": models.clip_l, "type": "stable_diffusion"}}}


def empty_image(color: int, batch: int = 1, width: int = 64, height: int = 48) -> dict:
    return {"class_type": "EmptyImage",
            "inputs": {"width": width, "height": height, "batch_size": batch, "color": color}}


def from_batch(images, captions: str, trigger: str = "", repeats: int = 1) -> dict:
    return {"class_type": "Dev2ProImagesFromBatch",
            "inputs": {"images": images, "captions": captions, "trigger_word": trigger,
                       "repeats": repeats}}


def encode(images) -> dict:
    return {"class_type": "Dev2ProEncodeDataset",
            "inputs": {"images": images, "vae": ["vae", 0], "clip": ["clip", 0],
                       "resolution": 64, "flip": False}}


def show(value) -> dict:
    """ComfyUI's "Preview as Text": an output node, so a graph that only encodes runs."""
    return {"class_type": "PreviewAny", "inputs": {"source": value}}


def train_node(server, base, dataset, name: str) -> dict:
    """Dev2ProTrainLoRA with every widget at its default, then TRAIN."""
    spec = server.object_info("Dev2ProTrainLoRA")["input"]["required"]
    inputs = {k: v[1]["default"] for k, v in spec.items()
              if isinstance(v[1], dict) and "default" in v[1]}
    inputs.update(TRAIN, base=base, dataset=dataset, name=name, resume=False)
    return {"class_type": "Dev2ProTrainLoRA", "inputs": inputs}


def dataset_of(server, entry: dict, node: str) -> tuple[list[dict], dict]:
    """(samples of dataset.json, {caption: latent}) of the dataset an encode node reported."""
    key = entry["outputs"][node]["dev2pro_dataset"][0]["key"]
    folder = server.output_dir / "dev2pro" / "datasets" / key
    samples = json.loads((folder / "dataset.json").read_text())["samples"]
    return samples, {s["caption"]: load_file(str(folder / s["file"]))["latent"] for s in samples}


def lora_metadata(server, name: str) -> dict:
    with safe_open(str(server.models_dir / "loras" / f"{name}.safetensors"), "pt") as f:
        return f.metadata(), list(f.keys())


# ---------------------------------------------------------------- IMAGE batch

@pytest.fixture(scope="module")
def red_png(comfy_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "red_64x48.png"
    Image.new("RGB", (64, 48), (255, 0, 0)).save(path)
    return comfy_server.upload_image(path)


def test_batch_captions_one_per_line_follow_their_images(comfy_server, comfy_models, red_png):
    """LoadImage (red) + EmptyImage (blue) batched, one caption per line: each caption is
    stored with its own image's latent (the red one equals red encoded on its own)."""
    g = {**loaders(comfy_models),
         "load": {"class_type": "LoadImage", "inputs": {"image": red_png}},
         "blue": empty_image(BLUE),
         "batch": {"class_type": "ImageBatch", "inputs": {"image1": ["load", 0], "image2": ["blue", 0]}},
         "pair": from_batch(["batch", 0], "a red square\n\na blue square\n", trigger="sks"),
         "alone": from_batch(["load", 0], "a red square", trigger="sks"),
         "enc_pair": encode(["pair", 0]), "enc_alone": encode(["alone", 0]),
         "show_pair": show(["enc_pair", 1]), "show_alone": show(["enc_alone", 1])}
    entry = comfy_server.run(g, timeout=TIMEOUT)
    samples, latents = dataset_of(comfy_server, entry, "enc_pair")
    assert sorted(s["caption"] for s in samples) == ["sks, a blue square", "sks, a red square"]
    assert all(s["repeats"] == 1 for s in samples)
    _, alone = dataset_of(comfy_server, entry, "enc_alone")
    red, blue = latents["sks, a red square"], latents["sks, a blue square"]
    assert torch.equal(red, alone["sks, a red square"]), "the red caption is not on the red image"
    assert (red - blue).abs().mean() > 1e-3, "the two images encoded alike"


def test_batch_single_caption_line_is_used_for_every_image(comfy_server, comfy_models):
    g = {**loaders(comfy_models), "green": empty_image(GREEN, batch=3),
         "items": from_batch(["green", 0], "a green square", repeats=2),
         "enc": encode(["items", 0]), "show": show(["enc", 1])}
    entry = comfy_server.run(g, timeout=TIMEOUT)
    samples, _ = dataset_of(comfy_server, entry, "enc")
    assert [s["caption"] for s in samples] == ["a green square"] * 3
    assert all(s["repeats"] == 2 for s in samples)
    assert entry["outputs"]["enc"]["dev2pro_dataset"][0]["samples"] == 3


def test_batch_with_a_caption_count_that_fits_neither_rule_is_refused(comfy_server, comfy_models):
    g = {**loaders(comfy_models), "green": empty_image(GREEN, batch=3),
         "items": from_batch(["green", 0], "one\ntwo"), "enc": encode(["items", 0]),
         "show": show(["enc", 1])}
    with pytest.raises(ComfyError, match="2 caption lines for 3 images.*one per line"):
        comfy_server.run(g, timeout=TIMEOUT)


# ---------------------------------------------------------------- diffusers base

@pytest.fixture(scope="module")
def diffusers_base(comfy_server, comfy_models, model_cache):
    """The test Flux as a bf16 diffusers folder: models/diffusion_models/<name>/transformer."""
    sd, _ = load_state_dict(model_cache / comfy_models.flux)
    folder = comfy_server.model_path("diffusion_models", DIFFUSERS_BASE)
    write_diffusers(sd, folder, torch.bfloat16, shard_size=400 * 10**6)
    del sd
    yield f"{DIFFUSERS_BASE} [diffusers]"


def test_diffusers_folder_base_is_listed_and_trains(comfy_server, comfy_models, diffusers_base):
    listed = comfy_server.object_info("Dev2ProLoadTrainingBase")["input"]["required"]["base_name"]
    assert diffusers_base in (listed[1]["options"] if listed[0] == "COMBO" else listed[0])
    g = {**loaders(comfy_models),
         "base": {"class_type": "Dev2ProLoadTrainingBase",
                  "inputs": {"base_name": diffusers_base, "variant": "auto"}},
         "img": empty_image(GREEN, width=64, height=64),
         "items": from_batch(["img", 0], "a green square"), "enc": encode(["items", 0]),
         "train": train_node(comfy_server, ["base", 0], ["enc", 0], "diffusers/run")}
    mark = comfy_server.log_mark()
    started = time.monotonic()
    workflow = {"nodes": [], "links": [], "note": "stand-in UI workflow"}
    entry = comfy_server.wait(comfy_server.queue(g, {"extra_pnginfo": {"workflow": workflow}}),
                              timeout=TIMEOUT)
    print(f"\n[comfyui] diffusers base, {TRAIN['steps']} steps: {time.monotonic() - started:.1f} s")
    info = " ".join(entry["outputs"]["base"]["text"])
    assert f"{DIFFUSERS_BASE}: dev2pro, diffusers bfloat16, 1+1 blocks of 3072" in info, info
    losses = entry["outputs"]["train"]["dev2pro_losses"][0]["losses"]
    assert len(losses) == TRAIN["steps"]
    meta, keys = lora_metadata(comfy_server, "diffusers/run")
    assert meta["base_variant"] == "dev2pro"
    assert any("double_blocks_0" in k or "double_blocks.0" in k for k in keys), keys[:5]
    # the control for --disable-metadata below: by default the graph is embedded
    assert json.loads(meta["workflow"]) == workflow and json.loads(meta["prompt"])
    assert lora_keys_not_loaded(comfy_server.log_since(mark)) == []


# ---------------------------------------------------------------- --disable-metadata

@pytest.fixture(scope="module")
def server_without_metadata(comfy_server, comfy_models, model_cache, tmp_path_factory):
    """A second ComfyUI with --disable-metadata, sharing the generated models by hard links
    (about 20 s to boot, nothing regenerated)."""
    server = ComfyServer(find_comfyui(), tmp_path_factory.mktemp("comfyui-nometa"),
                         extra_args=["--disable-metadata"])
    server.launch()
    try:
        for folder, name in (("diffusion_models", comfy_models.flux),
                             ("text_encoders", comfy_models.clip_l), ("vae", comfy_models.vae)):
            copy_into(model_cache / name, server.model_path(folder, name))
        server.wait_until_up()
        yield server
    finally:
        server.stop()


def test_lora_file_carries_no_graph_with_disable_metadata(server_without_metadata, comfy_models):
    server = server_without_metadata
    g = {**loaders(comfy_models),
         "base": {"class_type": "Dev2ProLoadTrainingBase",
                  "inputs": {"base_name": comfy_models.flux, "variant": "auto"}},
         "img": empty_image(RED, width=64, height=64),
         "items": from_batch(["img", 0], "a red square"), "enc": encode(["items", 0]),
         "train": train_node(server, ["base", 0], ["enc", 0], "nometa/run")}
    g["train"]["inputs"]["steps"] = 1
    server.wait(server.queue(g, {"extra_pnginfo": {"workflow": {"nodes": [], "links": []}}}),
                timeout=TIMEOUT)
    meta, _ = lora_metadata(server, "nometa/run")
    assert "workflow" not in meta and "prompt" not in meta, sorted(meta)
    assert json.loads(meta["training"])["steps"] == 1, "the training recipe must still be there"
