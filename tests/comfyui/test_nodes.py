"""The pack's nodes as ComfyUI sees them: registered, with the engine's settings as
inputs, example workflows that open without a missing node or a broken link, and
untrusted names and folders that cannot leave ComfyUI's folders."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from fluxtrain.train import TrainConfig

from scripts.comfy_server import ComfyError

NODES = ("Dev2ProLoadTrainingBase", "Dev2ProBaseFromModel", "Dev2ProImagesFromFolder", "Dev2ProImagesFromBatch",
         "Dev2ProEncodeDataset", "Dev2ProTrainLoRA", "Dev2ProApplyLoRA", "Dev2ProCompareGrid",
         "Dev2ProLossChart")
EXAMPLES = Path(__file__).resolve().parents[2] / "example_workflows"


@pytest.fixture(scope="module")
def object_info(comfy_server):
    assert comfy_server.pack_import_failure() is None, comfy_server.pack_import_failure()
    return comfy_server.object_info()


def test_every_node_is_registered_in_its_category(object_info):
    for node in NODES:
        assert node in object_info, f"{node} is not registered"
        assert object_info[node]["category"] == "training/dev2pro"


def test_train_node_offers_every_engine_setting_with_the_engine_defaults(object_info):
    inputs = object_info["Dev2ProTrainLoRA"]["input"]["required"]
    for f in fields(TrainConfig):
        assert f.name in inputs, f"TrainConfig.{f.name} is not an input of the Train node"
        spec = inputs[f.name][1]
        assert spec["default"] == f.default, (f.name, spec["default"], f.default)
        if "min" in f.metadata:
            assert (spec["min"], spec["max"]) == (f.metadata["min"], f.metadata["max"]), f.name
        if "choices" in f.metadata:
            assert spec["options"] == list(f.metadata["choices"]), f.name
    assert inputs["guidance"][1]["default"] == 1.0
    assert "Dev2Pro" in inputs["guidance"][1]["tooltip"]
    assert inputs["seed"][1].get("control_after_generate") is False, \
        "a training seed that randomises itself after each queue would break resume"
    outputs = object_info["Dev2ProTrainLoRA"]["output"]
    assert outputs[0] == "LORA_MODEL" and outputs[2] == "LOSS_MAP" and outputs[3] == "STRING"


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.json")), ids=lambda p: p.stem)
def test_example_workflow_has_no_missing_node_and_no_broken_link(object_info, path):
    workflow = json.loads(path.read_text())
    nodes = {n["id"]: n for n in workflow["nodes"]}
    for node in nodes.values():
        assert node["type"] in object_info, f"{path.name}: node type {node['type']} is missing"
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        out = nodes[origin]["outputs"][slot]
        assert link_id in out["links"] and out["type"] == kind, (path.name, link_id)
        assert nodes[origin]["type"] and object_info[nodes[origin]["type"]]["output"][slot] == kind
        socket = nodes[target]["inputs"][target_slot]
        assert socket["link"] == link_id and socket["type"] == kind, (path.name, link_id)
    text = path.read_text()
    assert "/home/" not in text and "/tmp/" not in text and ":\\\\" not in text, "absolute path"


def _train_prompt(object_info, models, name: str = "tests/ok", folder: str = "training") -> dict:
    """Folder -> encode -> train with every Train widget at its default."""
    inputs = {k: v[1]["default"] for k, v in object_info["Dev2ProTrainLoRA"]["input"]["required"].items()
              if isinstance(v[1], dict) and "default" in v[1]}
    inputs.update(base=["base", 0], dataset=["encode", 0], name=name)
    return {
        "base": {"class_type": "Dev2ProLoadTrainingBase", "inputs": {"base_name": models.flux, "variant": "auto"}},
        "images": {"class_type": "Dev2ProImagesFromFolder",
                   "inputs": {"folder": folder, "trigger_word": "", "default_repeats": 1}},
        "encode": {"class_type": "Dev2ProEncodeDataset",
                   "inputs": {"images": ["images", 0], "vae": ["vae", 0], "clip": ["clip", 0],
                              "resolution": 64, "flip": False}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": models.vae}},
        "clip": {"class_type": "CLIPLoader", "inputs": {"clip_name": models.clip_l, "type": "stable_diffusion"}},
        "train": {"class_type": "Dev2ProTrainLoRA", "inputs": inputs},
    }


@pytest.mark.parametrize("name", ["../escape", "a/../../escape", "/tmp/abs_lora", "C:\\loras\\x"])
def test_train_refuses_output_names_that_leave_the_loras_folder(comfy_server, comfy_models, object_info, name):
    with pytest.raises(ComfyError) as refused:
        comfy_server.queue(_train_prompt(object_info, comfy_models, name=name))
    message = str(refused.value)
    assert "leaves the folder" in message and "LoRA name" in message, message
    assert not (comfy_server.models_dir / "escape.safetensors").exists()


@pytest.mark.parametrize("folder", ["../", "../../etc", "/etc", "a/" * 40 + "x"])
def test_image_folder_refuses_paths_outside_the_input_folder(comfy_server, comfy_models, object_info,
                                                             folder):
    # A link the user placed in input/ is followed instead (test_safety).
    with pytest.raises(ComfyError) as refused:
        comfy_server.queue(_train_prompt(object_info, comfy_models, folder=folder))
    message = str(refused.value)
    assert ("leaves the folder" in message or "folders deep" in message) and "image folder" in message, message
