"""The standard Flux-dev sampling graph runs in a real ComfyUI on the generated models.

This is what every LoRA A/B test builds on: if it fails, the harness or the random
models are broken, not the pack."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from scripts import demo_models as models
from scripts.comfy_server import ComfyInterrupted, flux_dev_graph, lora_keys_not_loaded


def test_flux_dev_graph_samples_a_finite_nonconstant_image(comfy_server, comfy_models):
    graph = flux_dev_graph(comfy_models.flux, comfy_models.clip_l, comfy_models.vae,
                           steps=3, size=128, prefix="standard")
    mark = comfy_server.log_mark()
    started = time.monotonic()
    entry = comfy_server.wait(comfy_server.queue(graph), timeout=400)
    print(f"\n[comfyui] standard Flux graph, 128x128, 3 steps: {time.monotonic() - started:.1f} s")

    images = comfy_server.output_images(entry)
    assert len(images) == 1 and images[0].is_file(), entry["outputs"]
    assert images[0].parent == comfy_server.output_dir
    pixels = np.asarray(Image.open(images[0])).astype(np.float32)
    assert pixels.shape == (128, 128, 3)
    assert pixels.std() > 1.0, "the decoded image is constant: a model produced no signal"

    log = comfy_server.log_since(mark)
    for sign in ("missing", "unexpected", "NaN", "invalid value", "Traceback"):
        assert sign.lower() not in log.lower(), f"ComfyUI's log mentions {sign!r}:\n{log}"


def test_progress_reaches_the_websocket_and_interrupt_stops_sampling(comfy_server, comfy_models):
    graph = flux_dev_graph(comfy_models.flux, comfy_models.clip_l, comfy_models.vae,
                           steps=200, size=64, seed=1, prefix="interrupted")
    prompt_id = comfy_server.queue(graph)
    comfy_server.events.wait_for(
        lambda kind, data: kind == "progress" and data.get("prompt_id") == prompt_id and data["value"] >= 1,
        timeout=120)
    comfy_server.interrupt()
    with pytest.raises(ComfyInterrupted):
        comfy_server.wait(prompt_id, timeout=60)
    steps = [d["value"] for d in comfy_server.events.of_type("progress") if d.get("prompt_id") == prompt_id]
    assert 1 <= max(steps) < 200


def _sample(server, models, name, loras=()):
    graph = flux_dev_graph(models.flux, models.clip_l, models.vae, seed=3, steps=2, size=64,
                           loras=loras, prefix=name)
    mark = server.log_mark()
    images = server.output_images(server.run(graph, timeout=300))
    return np.asarray(Image.open(images[0])).astype(np.float32), server.log_since(mark)


def test_lora_files_in_both_comfyui_key_styles_load_fully_and_act_alike(comfy_server, comfy_models):
    """The ground the LoRA A/B tests stand on: LoraLoaderModelOnly maps every key of a
    kohya-style and of a lora_A-style file onto the test Flux, the LoRA changes the
    image, and both styles of the same tensors give the same image."""
    loras = comfy_server.models_dir / "loras"
    for style in ("kohya", "lora_A"):
        models.write_raw_lora(loras / f"raw-{style}.safetensors", style)
    base, _ = _sample(comfy_server, comfy_models, "lora-base")
    kohya, log_k = _sample(comfy_server, comfy_models, "lora-kohya", (("raw-kohya.safetensors", 1.0),))
    lora_a, log_a = _sample(comfy_server, comfy_models, "lora-a", (("raw-lora_A.safetensors", 1.0),))

    assert lora_keys_not_loaded(log_k) == [] and lora_keys_not_loaded(log_a) == []
    assert np.abs(kohya - base).mean() > 1.0, "the LoRA did not change the image"
    assert np.abs(kohya - lora_a).max() <= 2.0, "the same LoRA in two key styles sampled differently"


def test_a_lora_key_comfyui_cannot_map_shows_in_its_log(comfy_server, comfy_models):
    name = "raw-with-stray-key.safetensors"
    stray = "lora_unet_double_blocks_7_img_attn_qkv.lora_down.weight"  # the test Flux has 1 block
    models.write_raw_lora(comfy_server.models_dir / "loras" / name, "kohya",
                          extra={stray: torch.zeros(4, 3072)})
    _, log = _sample(comfy_server, comfy_models, "lora-stray", ((name, 1.0),))
    assert stray in lora_keys_not_loaded(log)
