"""Placement: the memory mode a training run gets, and that every mode trains alike."""

from __future__ import annotations

import math

import pytest
import torch

from fluxtrain import memory
from fluxtrain.checkpoint import load_state_dict
from fluxtrain.params import CheckpointError, FluxParams
from fluxtrain.placement import (BaseTensors, SharedOffloadError, choose_plan,
                                 load_base_for_training, room_for_transposed_weights)
from fluxtrain.synthetic import write_bfl
from fluxtrain.train import TrainConfig, train

GIB = 2 ** 30
FULL = FluxParams()
JOB = dict(img_tokens=4096, txt_tokens=512, batch=1, rank=16, fp8_compute=False, compiled=False,
           weight_bytes=1.0)


def test_forced_modes_and_cpu_need_no_plan():
    for mode in ("fast", "lean"):
        assert choose_plan(mode, FULL, 80 * GIB, **JOB) is None
    assert choose_plan("auto", FULL, None, **JOB) is None


def test_auto_plan_follows_the_free_vram():
    roomy = choose_plan("auto", FULL, 80 * GIB, **JOB)
    tight = choose_plan("auto", FULL, 20 * GIB, **JOB)
    small = choose_plan("auto", FULL, 10 * GIB, **JOB)
    assert not roomy.offload and roomy.checkpoint_double + roomy.checkpoint_single == 0
    assert not tight.offload and 0 < tight.checkpoint_double + tight.checkpoint_single
    assert small.offload and small.resident_bytes < 12 * 10 ** 9
    for plan in (roomy, tight, small):
        assert plan.predicted_peak <= plan.budget


def test_transposed_float8_weights_are_kept_only_where_they_fit():
    # Measured on an H100 at 1024x1024 (results/2026-11-28-h100-headline.json): no
    # checkpointing with the copy peaks at 52.5 GiB, so an 80 GB card keeps it, a 48 GB
    # card does not, nor does a lean run on a 24 GB card; a CPU (no free figure) never does.
    job = {k: v for k, v in JOB.items() if k != "fp8_compute"}
    fast = memory.estimate(FULL, job["img_tokens"], job["txt_tokens"], checkpoint_double=0,
                           checkpoint_single=0, fp8_compute=True, compiled=True)
    lean = memory.estimate(FULL, job["img_tokens"], job["txt_tokens"], fp8_compute=True, compiled=True)
    assert room_for_transposed_weights(79 * GIB, fast)
    assert not room_for_transposed_weights(48 * GIB, fast)
    assert room_for_transposed_weights(40 * GIB, lean)
    assert not room_for_transposed_weights(24 * GIB, lean)
    assert not room_for_transposed_weights(None, fast)


def test_offload_mode_offloads_even_when_the_model_would_fit():
    plan = choose_plan("offload", FULL, 80 * GIB, **JOB)
    assert plan.offload and plan.resident_bytes == 0
    assert plan.checkpoint_double == FULL.depth and plan.checkpoint_single == FULL.depth_single_blocks


def test_unknown_mode_is_named():
    with pytest.raises(ValueError, match="memory mode 'swap' is not one of auto, fast, lean, offload"):
        choose_plan("swap", FULL, None, **JOB)


@pytest.fixture
def base_and_data(tiny_sd, make_dataset, tmp_path):
    base = tmp_path / "flux-dev2pro-fp8.safetensors"
    write_bfl(tiny_sd, base, dtype=torch.float8_e4m3fn)
    return base, make_dataset(tmp_path / "data")


@pytest.mark.parametrize("mode", ["lean", "offload"])
def test_every_memory_mode_trains_the_same_losses(base_and_data, tmp_path, mode):
    """Checkpointing and weight streaming change where bytes live, not the arithmetic."""
    base, data = base_and_data
    losses = {}
    for m in ("fast", mode):
        config = TrainConfig(steps=3, learning_rate=1e-3, rank=4, alpha=4.0, compute_dtype="float32",
                             checkpoint_every=0, memory=m)
        placed = load_base_for_training(base, config, data, "cpu", log=lambda _: None)
        expected = (0, 0) if m == "fast" else (placed.model.params.depth,
                                               placed.model.params.depth_single_blocks)
        assert (placed.model.checkpointed_double, placed.model.checkpointed_single) == expected
        assert (placed.offloader is not None) == (m == "offload")
        if placed.offloader:   # every block weight came from the file, not from a mapped copy
            stats = placed.offloader.stats()
            assert stats["read_from_file"] == stats["layers"] > 0
        losses[m] = train(placed.model, data, config, tmp_path / m, log=lambda _: None).losses
        placed.release()
    assert losses[mode] == losses["fast"]


def test_float8_without_compiled_blocks_is_said_to_be_slower(base_and_data, monkeypatch):
    from fluxtrain import fp8
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    base, data = base_and_data
    said = {}
    for compiled in (False, True):
        lines = []
        config = TrainConfig(fp8_compute=True, compile_blocks=compiled, rank=4, alpha=4.0)
        placed = load_base_for_training(base, config, data, "cpu", log=lines.append)
        assert "float8 matmuls in" in lines[-1]
        said[compiled] = any("fp8_compute without compile_blocks" in line for line in lines)
        placed.release()
    assert said == {False: True, True: False}


# ---------------------------------------------------------------- a base already in memory

def test_base_from_a_shared_state_dict_references_its_tensors_and_trains(tiny_sd, make_dataset,
                                                                         tmp_path):
    """A BaseTensors (e.g. the weights of ComfyUI's MODEL) becomes our Flux without a copy:
    every parameter is the very storage of the given tensor; training leaves them unchanged
    and trains exactly as the same weights loaded from a file."""
    data = make_dataset(tmp_path / "data")
    sd = {k: v.clone() for k, v in tiny_sd.items()}
    before = {k: v.clone() for k, v in sd.items()}
    config = TrainConfig(steps=3, learning_rate=1e-3, rank=4, alpha=4.0, compute_dtype="float32",
                         checkpoint_every=0, memory="fast")
    lines = []
    placed = load_base_for_training(BaseTensors("MODEL input", sd), config, data, "cpu",
                                    log=lines.append)
    params = placed.model.state_dict()
    assert set(params) == set(sd)
    for k, t in sd.items():
        assert params[k].data_ptr() == t.data_ptr(), f"{k} was copied"
    assert placed.info.name == "MODEL input" and placed.info.format == "memory"
    assert "weights shared with MODEL input (not copied)" in lines[-1]
    shared = train(placed.model, data, config, tmp_path / "shared", log=lambda _: None)
    placed.release()
    for k, t in sd.items():
        assert torch.equal(t, before[k]), f"training changed the shared tensor {k}"

    path = tmp_path / "flux-dev.safetensors"
    write_bfl(tiny_sd, path, dtype=torch.float32)
    placed = load_base_for_training(path, config, data, "cpu", log=lambda _: None)
    from_file = train(placed.model, data, config, tmp_path / "file", log=lambda _: None)
    assert shared.losses == from_file.losses and len(shared.losses) == 3


@pytest.mark.parametrize("memory", ["fast", "lean"])
def test_a_shared_base_of_inference_tensors_trains_without_copying_its_linears(
        tiny_sd, make_dataset, tmp_path, memory):
    """ComfyUI loads its models under torch.inference_mode: autograd cannot save such
    tensors, so the frozen Linear weights must be read again in backward, not saved."""
    data = make_dataset(tmp_path / "data")
    with torch.inference_mode():
        sd = {k: v.clone() for k, v in tiny_sd.items()}
    config = TrainConfig(steps=2, learning_rate=1e-3, rank=4, alpha=4.0, compute_dtype="float32",
                         checkpoint_every=0, memory=memory)
    placed = load_base_for_training(BaseTensors("MODEL input", sd), config, data, "cpu",
                                    log=lambda _: None)
    weight = placed.model.double_blocks[0].img_attn.qkv.weight
    assert weight.is_inference() and weight.data_ptr() == sd["double_blocks.0.img_attn.qkv.weight"].data_ptr()
    result = train(placed.model, data, config, tmp_path / "run", log=lambda _: None)
    assert len(result.losses) == 2 and all(map(math.isfinite, result.losses))


def test_shared_float8_base_keeps_float8_storage_and_its_scales(tiny_sd, make_dataset, tmp_path):
    path = tmp_path / "flux-dev2pro-fp8.safetensors"
    write_bfl(tiny_sd, path, dtype=torch.float8_e4m3fn)
    sd, _ = load_state_dict(path)
    scales = {"final_layer.linear": torch.tensor(0.5)}
    config = TrainConfig(steps=1, rank=4, compute_dtype="float32", checkpoint_every=0, memory="lean")
    placed = load_base_for_training(BaseTensors("flux-dev2pro-fp8", sd, scales), config,
                                    make_dataset(tmp_path / "data"), "cpu", log=lambda _: None)
    layer = placed.model.get_submodule("double_blocks.0.img_attn.qkv")
    assert layer.weight.dtype == torch.float8_e4m3fn
    assert layer.weight.data_ptr() == sd["double_blocks.0.img_attn.qkv.weight"].data_ptr()
    assert placed.model.final_layer.linear.weight_scale == 0.5
    assert placed.info.variant == "dev2pro" and placed.info.dtype == torch.float8_e4m3fn


def test_shared_base_refuses_offload_and_schnell_clearly(tiny_sd, make_dataset, tmp_path):
    data = make_dataset(tmp_path / "data")
    config = TrainConfig(steps=1, rank=4, compute_dtype="float32", memory="offload")
    with pytest.raises(SharedOffloadError, match="memory 'offload' was chosen.*shared.*second copy"):
        load_base_for_training(BaseTensors("MODEL input", dict(tiny_sd)), config, data, "cpu")
    schnell = {k: v for k, v in tiny_sd.items() if not k.startswith("guidance_in.")}
    config = TrainConfig(steps=1, rank=4, compute_dtype="float32", memory="fast")
    with pytest.raises(CheckpointError, match="MODEL input has no guidance_in layers"):
        load_base_for_training(BaseTensors("MODEL input", schnell), config, data, "cpu")
    with pytest.raises(CheckpointError, match="MODEL input does not match the Flux shapes"):
        load_base_for_training(BaseTensors("MODEL input", {**tiny_sd, "extra.weight": torch.zeros(2, 2)}),
                               config, data, "cpu")
