"""A MODEL from ComfyUI's standard UNETLoader as the training base (Dev2ProBaseFromModel):
the LoRA trains on the loaded model's own tensors, loads into the standard loader with
every key mapped, and the MODEL samples exactly as before training (ComfyUI's model is
untouched). Runs in file order: sample, train, sample again, then the LoRA and refusals.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from fluxtrain.checkpoint import load_state_dict
from fluxtrain.synthetic import write_bfl

from scripts.comfy_server import ComfyError, flux_dev_graph, lora_keys_not_loaded

TRAIN = dict(steps=2, rank=4, alpha=4.0, learning_rate=0.02, memory="fast",
             compute_dtype="float32", checkpoint_every=0)
SIZE, SAMPLE_STEPS, SEED = 64, 2, 3
RUN = "from_model/run"
SCHNELL = "test-flux-schnell.safetensors"
TIMEOUT = 600


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


def sample_graph(models, prefix: str, advanced: bool = False, loras=()) -> dict:
    """The standard Flux-dev graph. `advanced` swaps KSampler for KSamplerAdvanced over the
    whole schedule: the same arithmetic, but a node ComfyUI has not cached, so the MODEL
    really samples again (the UNETLoader's output stays cached: the same ModelPatcher)."""
    g = flux_dev_graph(models.flux, models.clip_l, models.vae, seed=SEED, steps=SAMPLE_STEPS,
                       size=SIZE, loras=loras, prefix=prefix)
    if advanced:
        k = g["sampler"]["inputs"]
        g["sampler"] = {"class_type": "KSamplerAdvanced", "inputs": {
            "model": k["model"], "add_noise": "enable", "noise_seed": k["seed"], "steps": k["steps"],
            "cfg": k["cfg"], "sampler_name": k["sampler_name"], "scheduler": k["scheduler"],
            "positive": k["positive"], "negative": k["negative"], "latent_image": k["latent_image"],
            "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    return g


def train_graph(server, models, unet_name: str | None = None) -> dict:
    """UNETLoader -> Dev2ProBaseFromModel -> Dev2ProTrainLoRA on one encoded image."""
    spec = server.object_info("Dev2ProTrainLoRA")["input"]["required"]
    train = {k: v[1]["default"] for k, v in spec.items() if isinstance(v[1], dict) and "default" in v[1]}
    train.update(TRAIN, base=["base", 0], dataset=["enc", 0], name=RUN, resume=False)
    return {
        "unet": {"class_type": "UNETLoader",
                 "inputs": {"unet_name": unet_name or models.flux, "weight_dtype": "default"}},
        "clip": {"class_type": "CLIPLoader",
                 "inputs": {"clip_name": models.clip_l, "type": "stable_diffusion"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models.vae}},
        "base": {"class_type": "Dev2ProBaseFromModel", "inputs": {"model": ["unet", 0], "variant": "auto"}},
        "img": {"class_type": "EmptyImage",
                "inputs": {"width": 64, "height": 64, "batch_size": 1, "color": 0x00FF00}},
        "items": {"class_type": "Dev2ProImagesFromBatch",
                  "inputs": {"images": ["img", 0], "captions": "a green square", "trigger_word": "",
                             "repeats": 1}},
        "enc": {"class_type": "Dev2ProEncodeDataset",
                "inputs": {"images": ["items", 0], "vae": ["vae", 0], "clip": ["clip", 0],
                           "resolution": 64, "flip": False}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": train},
    }


def cached_nodes(entry: dict) -> set[str]:
    return {n for event, data in entry["status"]["messages"] if event == "execution_cached"
            for n in data["nodes"]}


@pytest.fixture(scope="module")
def runs(comfy_server, comfy_models):
    """Sample with the UNETLoader's MODEL, train on that MODEL, sample with it again."""
    server, models = comfy_server, comfy_models
    before = server.run(sample_graph(models, "bfm-before"), timeout=TIMEOUT)
    mark = server.log_mark()
    trained = server.run(train_graph(server, models), timeout=TIMEOUT)
    train_log = server.log_since(mark)
    after = server.run(sample_graph(models, "bfm-after", advanced=True), timeout=TIMEOUT)
    return {"before": before, "trained": trained, "train_log": train_log, "after": after}


def test_training_on_the_unetloader_model_writes_a_lora(comfy_server, comfy_models, runs):
    entry, log = runs["trained"], runs["train_log"]
    assert "unet" in cached_nodes(entry), "the UNETLoader loaded again: not the sampled MODEL"
    info = " ".join(entry["outputs"]["base"]["text"])
    assert f"{comfy_models.flux}: dev, MODEL input float32" in info, info
    assert "weights shared with" in log and "(not copied)" in log, log[-2000:]
    assert "copied there for training" not in log and "dequantised" not in log
    losses = entry["outputs"]["train"]["dev2pro_losses"][0]["losses"]
    assert len(losses) == TRAIN["steps"] and all(np.isfinite(losses))
    path = comfy_server.models_dir / "loras" / f"{RUN}.safetensors"
    assert path.is_file()
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["base_model"] == comfy_models.flux and meta["base_variant"] == "dev"
    assert json.loads(meta["training"])["steps"] == TRAIN["steps"]
    assert "Traceback" not in log


def test_the_unetloader_model_samples_identically_after_training(comfy_server, runs):
    """ComfyUI's model is untouched: the same MODEL object (UNETLoader cached through all
    three prompts) gives the identical image before and after training on it."""
    assert "unet" in cached_nodes(runs["after"]), "the UNETLoader loaded again: not the trained-on MODEL"
    assert "sampler" not in cached_nodes(runs["after"]), "the image after training was not sampled"
    before = pixels(comfy_server.output_images(runs["before"])[0])
    after = pixels(comfy_server.output_images(runs["after"])[0])
    assert before.std() > 1.0
    assert np.array_equal(before, after), \
        f"training changed ComfyUI's model: images differ by {np.abs(before - after).mean():.4f}/255"


def test_the_lora_loads_in_the_standard_loader_with_every_key(comfy_server, comfy_models, runs):
    mark = comfy_server.log_mark()
    entry = comfy_server.run(sample_graph(comfy_models, "bfm-lora", loras=((f"{RUN}.safetensors", 1.0),)),
                             timeout=TIMEOUT)
    assert lora_keys_not_loaded(comfy_server.log_since(mark)) == []
    with_lora = pixels(comfy_server.output_images(entry)[0])
    before = pixels(comfy_server.output_images(runs["before"])[0])
    assert not np.array_equal(with_lora, before), "the LoRA trained on the MODEL changed nothing"


def test_schnell_model_is_refused_clearly(comfy_server, comfy_models, model_cache, runs):
    sd, _ = load_state_dict(model_cache / comfy_models.flux)
    write_bfl({k: v for k, v in sd.items() if not k.startswith("guidance_in.")},
              comfy_server.model_path("diffusion_models", SCHNELL), dtype=torch.float8_e4m3fn)
    del sd
    graph = {k: v for k, v in train_graph(comfy_server, comfy_models, SCHNELL).items()
             if k in ("unet", "base")}
    graph["show"] = {"class_type": "PreviewAny", "inputs": {"source": ["base", 1]}}
    try:
        with pytest.raises(ComfyError, match="no guidance_in layers: it is a schnell-type model"):
            comfy_server.run(graph, timeout=TIMEOUT)
    finally:
        comfy_server.model_path("diffusion_models", SCHNELL).unlink(missing_ok=True)
