"""The shipped example workflows, converted to API format and run in a real ComfyUI
on the small generated models: what a user gets when they load and queue them.

The tests of this module share one sequence of runs (each builds on the files the
one before wrote), so they run in file order: the A/B first (one encode, two
trainings), then the standard loader on its LoRA, the with/without workflow after a
cache reset (the dataset must come from the disk cache), and Cancel + resume.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from scripts.demo_ab import SMOKE_TRAIN, for_small_models, write_demo_images

from scripts.comfy_server import ComfyInterrupted, copy_into, flux_dev_graph, lora_keys_not_loaded
from scripts.workflow_format import ui_to_api

EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"
AB = "dev2pro_vs_dev_lora_ab"
WITH_WITHOUT = "dev2pro_train_then_sample_with_and_without_lora"
TRAIN_ONLY = "dev2pro_train_lora_only"
DEV2PRO_NAME = "test-flux-dev2pro.safetensors"   # the test Flux under a Dev2Pro-like name
SIZE, SAMPLE_STEPS = 64, 2
# Small and fast on 2 CPU cores; a large learning rate so two steps visibly move the image.
TRAIN = {**SMOKE_TRAIN, "steps": 2}
TIMEOUT = 600


def load_workflow(name: str) -> dict:
    return json.loads((EXAMPLES / f"{name}.json").read_text())


def for_test_models(prompt: dict, models, **train) -> dict:
    """The API prompt moved onto the generated models, as the smoke demo does it."""
    return for_small_models(prompt, models.flux, DEV2PRO_NAME, models.clip_l, models.vae,
                            size=SIZE, sample_steps=SAMPLE_STEPS, **{**TRAIN, **train})


def nodes_of(prompt: dict, kind: str) -> list[str]:
    return [key for key, node in prompt.items() if node["class_type"] == kind]


def run_workflow(server, prompt: dict, workflow: dict, timeout: float = TIMEOUT) -> tuple[str, dict]:
    """Queue as the frontend does (the UI graph in extra_pnginfo), wait, return (id, history)."""
    prompt_id = server.queue(prompt, extra_data={"extra_pnginfo": {"workflow": workflow}})
    return prompt_id, server.wait(prompt_id, timeout=timeout)


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.float32)


def view_path(server, ref: dict) -> Path:
    roots = {"output": server.output_dir, "temp": server.base_dir / "temp"}
    return roots[ref["type"]] / ref["subfolder"] / ref["filename"]


def find_in(grid: np.ndarray, tile: np.ndarray, tolerance: float = 1.0) -> list[tuple[int, int]]:
    """Every (y, x) where `tile` sits in `grid`, each pixel within `tolerance` (ComfyUI
    truncates to 8 bits where the grid rounds)."""
    h, w = tile.shape[:2]
    corner = grid[: grid.shape[0] - h + 1, : grid.shape[1] - w + 1]
    ys, xs = np.nonzero(np.all(np.abs(corner - tile[0, 0]) <= tolerance, axis=-1))
    return [(int(y), int(x)) for y, x in zip(ys, xs)
            if np.abs(grid[y:y + h, x:x + w] - tile).max() <= tolerance]


@pytest.fixture(scope="module")
def setup(comfy_server, comfy_models):
    copy_into(comfy_server.model_path("diffusion_models", comfy_models.flux),
              comfy_server.model_path("diffusion_models", DEV2PRO_NAME))
    write_demo_images(comfy_server.input_dir / "training" / "my_subject")
    return comfy_server, comfy_models, comfy_server.object_info()


@pytest.fixture(scope="module")
def ab_run(setup):
    """Workflow 2 run once: one dataset, one encode, Dev2Pro @ guidance 1.0 vs dev @ 3.5."""
    server, models, info = setup
    workflow = load_workflow(AB)
    prompt = for_test_models(ui_to_api(workflow, info), models)
    train_b = [k for k in nodes_of(prompt, "Dev2ProTrainLoRA") if prompt[k]["inputs"]["name"] == "ab/dev"]
    prompt[train_b[0]]["inputs"]["guidance"] = 3.5   # dev "as chosen"
    mark = server.log_mark()
    started = time.monotonic()
    prompt_id, entry = run_workflow(server, prompt, workflow)
    print(f"\n[comfyui] A/B workflow: {time.monotonic() - started:.1f} s")
    return {"prompt": prompt, "id": prompt_id, "entry": entry, "log": server.log_since(mark)}


def test_ab_workflow_writes_both_loras_where_the_standard_loader_lists_them(setup, ab_run):
    server, _, _ = setup
    loras = server.models_dir / "loras"
    for name in ("ab/dev2pro_g1.safetensors", "ab/dev.safetensors"):
        assert (loras / name).is_file(), f"{name} not written under models/loras"
    listed = server.object_info("LoraLoaderModelOnly")["input"]["required"]["lora_name"]
    options = listed[1]["options"] if listed[0] == "COMBO" else listed[0]
    assert {"ab/dev2pro_g1.safetensors", "ab/dev.safetensors"} <= set(options)
    assert lora_keys_not_loaded(ab_run["log"]) == []
    assert "Traceback" not in ab_run["log"]


def test_ab_lora_files_carry_the_recipe_without_local_paths(setup, ab_run):
    server, _, _ = setup
    with safe_open(str(server.models_dir / "loras" / "ab" / "dev2pro_g1.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["base_variant"] == "dev2pro" and float(meta["guidance"]) == 1.0
    assert json.loads(meta["training"])["seed"] == 0
    assert json.loads(meta["workflow"])["nodes"], "the UI workflow is not embedded"
    assert json.loads(meta["prompt"]), "the API prompt is not embedded"
    for value in meta.values():
        assert str(server.base_dir) not in value and "/tmp/" not in value, "a local path leaked"
    with safe_open(str(server.models_dir / "loras" / "ab" / "dev.safetensors"), "pt") as f:
        meta_b = f.metadata()
    assert meta_b["base_variant"] == "dev" and float(meta_b["guidance"]) == 3.5


def test_ab_grid_shows_both_columns_and_the_chart_both_runs(setup, ab_run):
    server, _, _ = setup
    outputs, prompt = ab_run["entry"]["outputs"], ab_run["prompt"]
    grid_node = nodes_of(prompt, "Dev2ProCompareGrid")[0]
    compare = outputs[grid_node]["dev2pro_compare"]
    assert len(compare) == 1
    row = compare[0]
    assert "dev2pro" in row["label_a"] and "1" in row["label_a"]
    assert "dev" in row["label_b"] and "3.5" in row["label_b"]
    grid = pixels(view_path(server, outputs[grid_node]["images"][0]))
    a, b = pixels(view_path(server, row["a"])), pixels(view_path(server, row["b"]))
    factor = -(-256 // SIZE)      # the grid enlarges small images by a whole factor, nearest neighbour
    a, b = (im.repeat(factor, 0).repeat(factor, 1) for im in (a, b))
    assert np.abs(a - b).max() > 1.0, "A and B sampled alike: their columns cannot be told apart"
    xs_a, xs_b = ([x for _, x in find_in(grid, im)] for im in (a, b))
    assert xs_a and xs_b, f"A found at x {xs_a}, B at x {xs_b}: an image is missing from the grid"
    assert max(xs_a) < min(xs_b), f"A (x {xs_a}) is not left of B (x {xs_b})"

    chart_node = nodes_of(prompt, "Dev2ProLossChart")[0]
    runs = {r["run"]: r for r in outputs[chart_node]["dev2pro_losses"]}
    assert set(runs) == {"ab/dev2pro_g1", "ab/dev"}
    assert all(len(r["losses"]) == TRAIN["steps"] for r in runs.values())
    assert pixels(view_path(server, outputs[chart_node]["images"][0])).std() > 1.0


def test_training_reports_progress_per_step_on_the_websocket(setup, ab_run):
    server, _, _ = setup
    events = [e for e in server.events.of_type("dev2pro.progress") if e["run"].startswith("ab/")]
    for run in ("ab/dev2pro_g1", "ab/dev"):
        steps = [e["step"] for e in events if e["run"] == run]
        assert steps == list(range(1, TRAIN["steps"] + 1)), (run, steps)
    assert all(e["total"] == TRAIN["steps"] and np.isfinite(e["loss"]) for e in events)


def test_image_folder_problems_are_reported_by_name(setup, ab_run):
    outputs, prompt = ab_run["entry"]["outputs"], ab_run["prompt"]
    report = " ".join(outputs[nodes_of(prompt, "Dev2ProImagesFromFolder")[0]]["text"])
    assert "broken.png" in report and "uncaptioned.png" in report


def test_trained_lora_changes_the_image_through_the_standard_loader_and_strength_0_does_not(setup, ab_run):
    server, models, _ = setup

    def sample(name, loras=()):
        graph = flux_dev_graph(models.flux, models.clip_l, models.vae, seed=3, steps=SAMPLE_STEPS,
                               size=SIZE, loras=loras, prefix=name)
        mark = server.log_mark()
        image = pixels(server.output_images(server.run(graph, timeout=TIMEOUT))[0])
        return image, server.log_since(mark)

    base, _ = sample("std-base")
    full, log = sample("std-lora", (("ab/dev2pro_g1.safetensors", 1.0),))
    zero, _ = sample("std-zero", (("ab/dev2pro_g1.safetensors", 0.0),))
    assert lora_keys_not_loaded(log) == []
    change = np.abs(full - base).mean()
    print(f"\n[comfyui] trained LoRA moved pixels by {change:.2f}/255 on average")
    assert change > 0.5, f"the trained LoRA barely changed the image ({change:.3f}/255)"
    assert np.array_equal(zero, base), "strength 0 changed the image"


def test_with_without_workflow_reuses_the_dataset_cache_and_differs_with_the_lora(setup, ab_run):
    server, models, info = setup
    server.post("/free", {"free_memory": True, "unload_models": True})   # forget ComfyUI's node cache
    time.sleep(1.5)
    workflow = load_workflow(WITH_WITHOUT)
    # The A/B's Dev2Pro run name and settings: the finished run is reopened, not retrained.
    prompt = for_test_models(ui_to_api(workflow, info), models, name="ab/dev2pro_g1")
    mark, seen = server.log_mark(), len(server.events.of_type("dev2pro.progress"))
    _, entry = run_workflow(server, prompt, workflow)
    log = server.log_since(mark)

    encode = entry["outputs"][nodes_of(prompt, "Dev2ProEncodeDataset")[0]]["dev2pro_dataset"][0]
    assert encode["reused"] is True, "the second run encoded the images again"
    first = ab_run["entry"]["outputs"][nodes_of(ab_run["prompt"], "Dev2ProEncodeDataset")[0]]
    assert first["dev2pro_dataset"][0]["reused"] is False
    assert encode["key"] == first["dev2pro_dataset"][0]["key"]
    assert not [e for e in server.events.of_type("dev2pro.progress")[seen:]
                if e["run"] == "ab/dev2pro_g1"], "a finished run trained again"
    row = entry["outputs"][nodes_of(prompt, "Dev2ProCompareGrid")[0]]["dev2pro_compare"][0]
    without, with_lora = pixels(view_path(server, row["a"])), pixels(view_path(server, row["b"]))
    assert np.abs(with_lora - without).mean() > 0.5, "the LoRA did not change the sampled image"
    assert "without LoRA" in row["label_a"]
    assert lora_keys_not_loaded(log) == []


def test_cancel_mid_run_leaves_a_state_that_resumes(setup, ab_run):
    server, models, info = setup
    workflow = load_workflow(TRAIN_ONLY)
    prompt = for_test_models(ui_to_api(workflow, info), models, name="cancel/run", steps=3)
    run_dir = server.output_dir / "dev2pro" / "runs" / "cancel" / "run.run"
    prompt_id = server.queue(prompt)
    server.events.wait_for(lambda kind, data: kind == "dev2pro.progress" and data["run"] == "cancel/run"
                           and data["step"] >= 1, timeout=TIMEOUT)
    server.interrupt()
    with pytest.raises(ComfyInterrupted):
        server.wait(prompt_id, timeout=TIMEOUT)
    latest = json.loads((run_dir / "latest.json").read_text())
    assert 1 <= latest["step"] < 3, latest
    assert not (server.models_dir / "loras" / "cancel" / "run.safetensors").exists()

    mark = server.log_mark()
    seen = len(server.events.of_type("dev2pro.progress"))
    entry = server.run(prompt, timeout=TIMEOUT)
    assert f"resuming run at step {latest['step']}" in server.log_since(mark)
    resumed = [e["step"] for e in server.events.of_type("dev2pro.progress")[seen:] if e["run"] == "cancel/run"]
    assert resumed == list(range(latest["step"] + 1, 4)), resumed
    assert (server.models_dir / "loras" / "cancel" / "run.safetensors").is_file()
    losses = entry["outputs"][nodes_of(prompt, "Dev2ProTrainLoRA")[0]]["dev2pro_losses"][0]["losses"]
    assert len(losses) == 3
