"""Nothing read from outside ComfyUI's folders, nothing lost, through a real ComfyUI's
HTTP API as an attacker or a careless user would use it: forged handles typed into an
API-format prompt, settings out of range, links the user placed, a LoRA file the pack
did not write."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from PIL import Image
from safetensors.torch import save_file
import torch

from scripts.comfy_server import ComfyError
from scripts.demo_ab import write_demo_images

FOLDER = "safety"          # training images under input/
TRAIN = dict(steps=1, rank=4, alpha=4.0, memory="fast", compute_dtype="float32", checkpoint_every=0)
TIMEOUT = 600


@pytest.fixture(scope="module")
def server(comfy_server, comfy_models):
    write_demo_images(comfy_server.input_dir / FOLDER)
    return comfy_server


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    """A private image and folder outside every ComfyUI folder."""
    folder = tmp_path_factory.mktemp("private")
    Image.fromarray(np.full((64, 64, 3), 200, np.uint8)).save(folder / "secret.png")
    (folder / "secret.txt").write_text("a secret")
    return folder


def show(value) -> dict:
    """ComfyUI's "Preview as Text": an output node, so a graph without one of ours runs."""
    return {"class_type": "PreviewAny", "inputs": {"source": value}}


def graph(server, models, *, images=None, dataset=None, base=None, train: dict | None = None,
          folder: str = FOLDER, repeats: int = 1) -> dict:
    """Folder -> Encode -> Train, where images / dataset / base may be replaced by literals."""
    spec = server.object_info("Dev2ProTrainLoRA")["input"]["required"]
    settings = {k: v[1]["default"] for k, v in spec.items() if isinstance(v[1], dict) and "default" in v[1]}
    settings.update({**TRAIN, "name": "safety/run", "resume": False, "base": base or ["base", 0],
                     "dataset": dataset or ["encode", 0], **(train or {})})
    return {
        "base": {"class_type": "Dev2ProLoadTrainingBase", "inputs": {"base_name": models.flux, "variant": "auto"}},
        "images": {"class_type": "Dev2ProImagesFromFolder",
                   "inputs": {"folder": folder, "trigger_word": "", "default_repeats": repeats}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models.vae}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": models.clip_l, "type": "stable_diffusion"}},
        "encode": {"class_type": "Dev2ProEncodeDataset",
                   "inputs": {"images": images or ["images", 0], "vae": ["vae", 0], "clip": ["clip", 0],
                              "resolution": 64, "flip": False}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": settings},
    }


def datasets(server) -> set[str]:
    root = server.output_dir / "dev2pro" / "datasets"
    return set(os.listdir(root)) if root.is_dir() else set()


# ---------------------------------------------------------------- item 7: forged handles

def forged_base(secret) -> dict:
    """What Load Training Base used to output, pointing at a file outside every folder."""
    return {"name": "flux-dev2pro.safetensors", "format": "bfl", "dtype": "bfloat16",
            "variant": "dev2pro", "blocks": "1+1", "hidden_size": 3072, "guidance_embed": True,
            "path": str(secret / "flux.safetensors"), "summary": "forged"}


def forged_dataset(secret) -> dict:
    return {"path": str(secret / "dataset"), "key": "forged", "reused": True, "samples": 1,
            "buckets": {}, "resolution": 64, "summary": "forged"}


def forged_images(secret) -> dict:
    return {"kind": "folder", "source": "x", "problems": [],
            "items": [{"path": str(secret / "secret.png"), "caption": "a secret", "repeats": 1,
                       "source": str(secret / "secret.png")}]}


def forged_run(secret) -> dict:
    return {"name": "x", "lora": "../../" + str(secret / "x.safetensors"), "base": "b",
            "variant": "dev", "guidance": 1.0, "settings": {}, "losses": [1.0], "steps": 1,
            "dataset": "k"}


@pytest.mark.parametrize("kind", ["base", "dataset", "images", "run"])
@pytest.mark.parametrize("wrapped", [False, True], ids=["literal", "__value__"])
def test_a_forged_handle_typed_into_an_api_prompt_is_refused(server, comfy_models, secret, kind,
                                                              wrapped):
    forged = {"base": forged_base, "dataset": forged_dataset, "images": forged_images,
              "run": forged_run}[kind](secret)
    value = {"__value__": forged} if wrapped else forged     # ComfyUI unwraps __value__
    if kind == "run":
        prompt = {"chart": {"class_type": "Dev2ProLossChart",
                            "inputs": {"run_a": value, "smoothing": 0.9}}}
    else:
        prompt = graph(server, comfy_models, **{kind: value})
    before = datasets(server)
    with pytest.raises(ComfyError) as refused:
        server.wait(server.queue(prompt), timeout=TIMEOUT)
    message = str(refused.value)
    handle = {"base": "BaseHandle", "dataset": "DatasetHandle", "images": "ImagesHandle",
              "run": "RunHandle"}[kind]
    assert f"not a {handle} made by" in message and "ForgedHandleError" in message, message
    if kind == "images":
        assert datasets(server) == before, "the forged images were encoded"
    assert not (server.models_dir / "loras" / "safety" / "run.safetensors").exists()


# ---------------------------------------------------------------- item 9: ComfyUI's own checks

@pytest.mark.parametrize("repeats", [5000, 10 ** 12, 0])
def test_out_of_range_repeats_are_refused_at_queue_time(server, comfy_models, repeats):
    with pytest.raises(ComfyError) as refused:
        server.queue(graph(server, comfy_models, repeats=repeats))
    message = str(refused.value)
    assert "default_repeats" in message and ("bigger than max" in message or "smaller than min" in message)
    assert "MemoryError" not in message


@pytest.mark.parametrize("setting, value", [("steps", 0), ("learning_rate", 5.0), ("rank", 100000),
                                            ("optimizer", "sgd")])
def test_out_of_range_train_settings_are_refused_at_queue_time(server, comfy_models, setting, value):
    before = datasets(server)
    with pytest.raises(ComfyError) as refused:
        server.queue(graph(server, comfy_models, train={setting: value}))
    assert setting in str(refused.value)
    assert datasets(server) == before


def test_a_refused_name_is_reported_once(server, comfy_models):
    with pytest.raises(ComfyError) as refused:
        server.queue(graph(server, comfy_models, train={"name": "../escape"}))
    message = str(refused.value)
    reply = json.loads(message[message.index("{"):])
    errors = reply["node_errors"]["train"]["errors"]
    assert len(errors) == 1 and "leaves the folder" in errors[0]["details"], errors
    assert len(message) < 4000


@pytest.mark.parametrize("name, why", [("a/" * 2000 + "x", "folders deep"), ("x" * 300, "bytes")],
                         ids=["2000 levels", "300 characters"])
def test_a_name_no_file_system_can_hold_is_refused_at_queue_time(server, comfy_models, name, why):
    """Not a RecursionError or a raw OSError once the training is done."""
    with pytest.raises(ComfyError) as refused:
        server.queue(graph(server, comfy_models, train={"name": name}))
    message = str(refused.value)
    assert why in message and "LoRA name" in message and len(message) < 4000, message[:2000]


# ---------------------------------------------------------------- item 8: bounded errors

def test_a_file_claiming_a_huge_block_number_gives_a_short_error(server, comfy_models):
    """It was a 16.9 MB error in /history and over the websocket."""
    from fluxtrain.params import TINY
    from fluxtrain.synthetic import random_state_dict

    claims = server.model_path("diffusion_models", "claims-99999999-blocks.safetensors")
    save_file({**random_state_dict(TINY),
               **{f"double_blocks.99999999.x{i:04d}" + "_" * 400: torch.zeros(1) for i in range(5000)}},
              str(claims))
    try:
        prompt_id = server.queue({"base": {"class_type": "Dev2ProLoadTrainingBase",
                                           "inputs": {"base_name": claims.name, "variant": "auto"}},
                                  "show": show(["base", 1])})
        with pytest.raises(ComfyError) as refused:
            server.wait(prompt_id, timeout=TIMEOUT)
        assert "99999992 more are missing" in str(refused.value)
        assert len(json.dumps(server.history(prompt_id))) < 20_000, "the error in /history is not bounded"
    finally:
        claims.unlink()


# ---------------------------------------------------------------- item 10: links the user placed

def test_a_model_file_linked_into_diffusion_models_is_a_training_base(server, comfy_models, model_cache):
    link = server.model_path("diffusion_models", "other_disk/linked-flux.safetensors")
    link.parent.mkdir(exist_ok=True)
    if not link.is_symlink():
        link.symlink_to(model_cache / comfy_models.flux)      # a file outside ComfyUI's folders
    options = server.object_info("Dev2ProLoadTrainingBase")["input"]["required"]["base_name"][1]["options"]
    assert "other_disk/linked-flux.safetensors" in options
    entry = server.wait(server.queue({
        "base": {"class_type": "Dev2ProLoadTrainingBase",
                 "inputs": {"base_name": "other_disk/linked-flux.safetensors", "variant": "auto"}},
        "show": show(["base", 1])}), timeout=TIMEOUT)
    assert "linked-flux.safetensors" in entry["outputs"]["show"]["text"][0]


def test_an_image_folder_linked_into_input_is_read(server, tmp_path):
    elsewhere = tmp_path / "photos"
    write_demo_images(elsewhere)
    link = server.input_dir / "linked_photos"
    if not link.is_symlink():
        link.symlink_to(elsewhere, target_is_directory=True)
    entry = server.wait(server.queue({
        "images": {"class_type": "Dev2ProImagesFromFolder",
                   "inputs": {"folder": "linked_photos", "trigger_word": "", "default_repeats": 1}},
        "show": show(["images", 1])}), timeout=TIMEOUT)
    assert entry["outputs"]["show"]["text"][0].startswith("3 images from input/linked_photos")


# ---------------------------------------------------------------- item 2: a LoRA the pack did not write

def test_a_lora_file_the_run_did_not_write_is_kept(server, comfy_models):
    precious = server.models_dir / "loras" / "safety" / "precious.safetensors"
    precious.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_txt_in.lora_down.weight": torch.ones(1, 4)}, str(precious))
    kept = precious.read_bytes()
    with pytest.raises(ComfyError) as refused:
        server.wait(server.queue(graph(server, comfy_models, train={"name": "safety/precious"})),
                    timeout=TIMEOUT)
    assert "precious.safetensors already exists" in str(refused.value)
    assert "overwrite_lora" in str(refused.value)
    assert precious.read_bytes() == kept

    entry = server.wait(server.queue(graph(server, comfy_models, train={
        "name": "safety/precious", "overwrite_lora": True})), timeout=TIMEOUT)
    assert entry["outputs"]["train"]["dev2pro_losses"][0]["losses"]
    with open(precious, "rb") as f:
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "fluxtrain_run_id" in header["__metadata__"]
