"""The standard Flux-dev sampling graph runs in a real ComfyUI on the generated models.

This is what every LoRA A/B test builds on: if it fails, the harness or the random
models are broken, not the pack."""

import time

import numpy as np
import pytest
from PIL import Image

from .harness import ComfyInterrupted, flux_dev_graph


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
