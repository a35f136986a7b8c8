"""Every adapter's file, trained a few steps on the test Flux, loads in ComfyUI's standard
LoraLoaderModelOnly with no "lora key not loaded", and the diffusion model ComfyUI
patches with it gives the output of the engine's own model with the adapter attached,
to float32 round-off, on identical inputs. ComfyUI runs in its own Python
(comfy_patched_forward.py); no server is needed.
"""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
from safetensors.torch import load_file, save_file

from fluxtrain.adapters import load_adapter_state_dict
from fluxtrain.checkpoint import load_flux
from fluxtrain.dataset import EncodedDatasetWriter, EncodedDataset
from fluxtrain.flux import pack_latents, text_ids, unpack_latents
from fluxtrain.train import TrainConfig, train

from scripts.comfy_server import comfyui_python
from scripts.demo_models import COMFY_TEST_FLUX

from .conftest import COMFYUI, HERE, ModelNames

# name: (settings, what the file must hold)
ADAPTERS = {
    "lora": (dict(adapter="lora"), "lora_up.weight"),
    "lokr": (dict(adapter="lokr", lokr_factor=16), "lokr_w2"),
    "lokr_low_rank": (dict(adapter="lokr", lokr_factor=-1, lokr_full_matrix=False), "lokr_w2_a"),
    "loha": (dict(adapter="loha"), "hada_w2_a"),
    "dora": (dict(adapter="dora"), "dora_scale"),
}
TRAIN = dict(steps=3, rank=4, alpha=4.0, learning_rate=0.02, memory="fast", compute_dtype="float32",
             checkpoint_every=0, targets="all", seed=1)
# Round-off of two float32 computations of the same merged weights (measured ~1e-6 of an
# output of size ~1; the adapters move the output by more than 1e-2).
TOLERANCE = 2e-5
TIMEOUT = 900


def small_dataset(folder) -> EncodedDataset:
    g = torch.Generator().manual_seed(0)
    p = COMFY_TEST_FLUX
    with EncodedDatasetWriter(folder, resolution=64, encoders={"vae": "random", "text": "random"}) as w:
        w.set_empty_caption(torch.randn(4, p.context_in_dim, generator=g), torch.randn(p.vec_in_dim, generator=g))
        for i in range(2):
            w.add(torch.randn(16, 8, 8, generator=g), torch.randn(4, p.context_in_dim, generator=g),
                  torch.randn(p.vec_in_dim, generator=g), f"sample {i}")
    return EncodedDataset.open(folder)


def same_inputs() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    p = COMFY_TEST_FLUX
    return {"x": torch.randn(2, 16, 8, 6, generator=g), "timesteps": torch.tensor([0.3, 0.8]),
            "context": torch.randn(2, 5, p.context_in_dim, generator=g),
            "y": torch.randn(2, p.vec_in_dim, generator=g), "guidance": torch.tensor([1.0, 3.5])}


def engine_output(model, inputs) -> torch.Tensor:
    img, img_ids = pack_latents(inputs["x"])
    with torch.no_grad():
        out = model(img=img, img_ids=img_ids, txt=inputs["context"],
                    txt_ids=text_ids(2, inputs["context"].shape[1]), timesteps=inputs["timesteps"],
                    y=inputs["y"], guidance=inputs["guidance"])
    return unpack_latents(out, *inputs["x"].shape[2:])


@pytest.fixture(scope="module")
def trained(model_cache, tmp_path_factory):
    """{name: (file, engine output with the file's tensors in the attached adapters)}."""
    work = tmp_path_factory.mktemp("adapters")
    model, _ = load_flux(model_cache / ModelNames().flux)
    dataset = small_dataset(work / "data")
    inputs = same_inputs()
    save_file(inputs, str(work / "inputs.safetensors"))
    out = {"base": engine_output(model, inputs)}
    for name, (settings, _) in ADAPTERS.items():
        path = work / "loras" / f"{name}.safetensors"
        train(model, dataset, TrainConfig(**{**TRAIN, **settings}), work / "runs" / name, lora_path=path,
              log=lambda _: None)
        # the file is bf16 (alpha and dora_scale float32): run the engine on its exact values
        adapters = {n: m.lora for n, m in model.named_modules() if getattr(m, "lora", None) is not None}
        load_adapter_state_dict(adapters, {k: v.float() for k, v in load_file(str(path)).items()})
        out[name] = engine_output(model, inputs)
    return work, out


@pytest.fixture(scope="module")
def comfy(trained, model_cache):
    work, _ = trained
    result = work / "comfy.safetensors"
    cmd = [comfyui_python(COMFYUI), str(HERE / "comfy_patched_forward.py"), str(COMFYUI),
           str(model_cache / ModelNames().flux), str(work / "loras"), str(work / "inputs.safetensors"),
           str(result), *(f"{name}.safetensors" for name in ADAPTERS)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return load_file(str(result)), json.loads((work / "comfy.safetensors.json").read_text())


def test_comfyui_loads_the_test_flux_as_float32_and_unpatches(comfy, trained):
    outputs, info = comfy
    _, ours = trained
    assert info["weight_dtype"] == "torch.float32"
    # (v0.8.0 restores the weights to within round-off, not bit for bit)
    torch.testing.assert_close(outputs["base_again"], outputs["base"], rtol=0, atol=TOLERANCE,
                               msg="a LoRA stayed patched in after it was unloaded")
    torch.testing.assert_close(outputs["base"], ours["base"], rtol=0, atol=TOLERANCE)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_file_has_lycoris_names_and_every_key_loads(trained, comfy, name):
    work, _ = trained
    tensors = load_file(str(work / "loras" / f"{name}.safetensors"))
    suffix = ADAPTERS[name][1]
    assert f"lora_unet_single_blocks_0_linear1.{suffix}" in tensors
    assert f"lora_unet_double_blocks_0_img_attn_qkv.{suffix}" in tensors
    assert all(k.startswith("lora_unet_") for k in tensors)
    assert comfy[1]["not_loaded"][f"{name}.safetensors"] == []


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_comfyui_patched_model_matches_the_engine(trained, comfy, name):
    _, ours = trained
    theirs = comfy[0][f"{name}.safetensors"]
    moved = (ours[name] - ours["base"]).abs().max().item()
    assert moved > 100 * TOLERANCE, f"{name} barely changes the output ({moved:.2e}): the check would be empty"
    print(f"\n[comfyui] {name}: output moved {moved:.2e}, ComfyUI vs engine {(theirs - ours[name]).abs().max().item():.2e}")
    torch.testing.assert_close(theirs, ours[name], rtol=0, atol=TOLERANCE)


def test_diffusers_loads_the_lora_file_and_matches_the_engine(trained, model_cache):
    """diffusers reads the LoRA file (FluxPipeline's loader, peft) onto the same weights and
    gives the engine's output to float32 round-off. It cannot load the other adapters
    (tests/test_adapters.py checks what it does with them)."""
    pytest.importorskip("peft")
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    from tests.test_flux import diffusers_flux
    work, ours = trained
    model, _ = load_flux(model_cache / ModelNames().flux)
    reference = diffusers_flux(model)
    del model
    state = FluxLoraLoaderMixin.lora_state_dict(str(work / "loras" / "lora.safetensors"))
    reference.load_lora_adapter(state, adapter_name="trained", prefix="transformer")
    x = same_inputs()
    img, img_ids = pack_latents(x["x"])
    with torch.no_grad():
        theirs = reference(hidden_states=img, encoder_hidden_states=x["context"], pooled_projections=x["y"],
                           timestep=x["timesteps"], img_ids=img_ids[0],
                           txt_ids=text_ids(1, x["context"].shape[1])[0], guidance=x["guidance"],
                           return_dict=False)[0]
    theirs = unpack_latents(theirs, *x["x"].shape[2:])
    moved = (ours["lora"] - ours["base"]).abs().max().item()
    error = (theirs - ours["lora"]).abs().max().item()
    print(f"\n[diffusers] lora: output moved {moved:.2e}, diffusers vs engine {error:.2e}")
    assert moved > 100 * TOLERANCE
    assert error <= TOLERANCE, f"diffusers' output differs by {error:.2e}"
