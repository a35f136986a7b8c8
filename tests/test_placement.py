"""Placement: the memory mode a training run gets, and that every mode trains alike."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from fluxtrain import memory
from fluxtrain.checkpoint import load_state_dict
from fluxtrain.params import CheckpointError, FluxParams
from fluxtrain.lora import LoRAConfig, trainable_parameters
from fluxtrain.placement import (BaseTensors, DeviceInfo, SharedOffloadError, load_base_for_training,
                                 plan_placement, room_for_transposed_weights)
from fluxtrain.synthetic import write_bfl
from fluxtrain.train import TrainConfig, train

GIB = 2 ** 30
FULL = FluxParams()
JOB = memory.Job(FULL, img_tokens=4096, txt_tokens=512, steps=1000)
HOPPER = DeviceInfo("cuda", 139 * GIB, (9, 0), float8_cores=True, triton=True, name="H200")
ADA = DeviceInfo("cuda", 24 * GIB, (8, 9), float8_cores=True, triton=True, name="RTX 4090")
CPU = DeviceInfo("cpu")


def cuda(free_gib: float, base: DeviceInfo = HOPPER) -> DeviceInfo:
    return dataclasses.replace(base, free_bytes=int(free_gib * GIB))


def test_forced_modes_and_cpu_need_no_memory_plan():
    fast = plan_placement(JOB, TrainConfig(memory="fast"), HOPPER)
    lean = plan_placement(JOB, TrainConfig(memory="lean"), HOPPER)
    cpu = plan_placement(JOB, TrainConfig(memory="auto"), CPU)
    assert (fast.recompute_double, fast.recompute_single, fast.memory) == (0, 0, None)
    assert (lean.recompute_double, lean.recompute_single) == (FULL.depth, FULL.depth_single_blocks)
    assert (cpu.recompute_double, cpu.recompute_single, cpu.memory, cpu.offload) == (0, 0, None, False)


def test_auto_plan_follows_the_free_vram():
    config = TrainConfig(fp8_compute=False, compile_blocks=False)
    roomy, tight, small = (plan_placement(JOB, config, cuda(gib)) for gib in (80, 20, 10))
    assert not roomy.offload and roomy.recompute_double + roomy.recompute_single == 0
    assert not tight.offload and 0 < tight.recompute_double + tight.recompute_single
    assert small.offload and 0 < small.resident_bytes < 12 * 10 ** 9
    for plan in (roomy, tight, small):
        assert plan.memory.predicted_peak <= plan.memory.budget


def test_a_long_run_on_hopper_gets_every_speed_up_and_says_why():
    plan = plan_placement(JOB, TrainConfig(), HOPPER)
    assert (plan.compile_blocks, plan.fp8_compute, plan.cuda_graphs) == (True, True, True)
    assert plan.fp8_keep_transposed            # 139 GiB hold the column-major copy too
    assert "compiled blocks on" in plan.summary and "float8 on" in plan.summary
    assert "CUDA graphs on" in plan.summary and "\n" not in plan.summary


@pytest.mark.parametrize("device,job,config,off,why", [
    (HOPPER, dataclasses.replace(JOB, steps=30), TrainConfig(), ("compile_blocks", "fp8_compute"),
     "only 30 steps to go"),
    (dataclasses.replace(HOPPER, triton=False), JOB, TrainConfig(), ("compile_blocks", "fp8_compute"),
     "Triton is not installed"),
    (ADA, JOB, TrainConfig(), ("fp8_compute",), "RTX 4090 has none validated"),
    (HOPPER, JOB, TrainConfig(compile_blocks=False), ("compile_blocks", "fp8_compute"),
     "float8 off (pays only with compiled blocks)"),
    (HOPPER, JOB, TrainConfig(dropout=0.1), ("cuda_graphs",), "LoRA dropout"),
    (cuda(10), JOB, TrainConfig(), ("cuda_graphs", "fp8_keep_transposed"), "weights stream from host"),
    (HOPPER, JOB, TrainConfig(cuda_graphs=False), ("cuda_graphs",), "CUDA graphs off (switched off)"),
    (CPU, JOB, TrainConfig(), ("compile_blocks", "fp8_compute", "cuda_graphs"), "needs a CUDA device"),
])
def test_each_speed_up_is_off_where_it_cannot_pay_and_the_plan_says_why(device, job, config, off, why):
    plan = plan_placement(job, config, device)
    for name in ("compile_blocks", "fp8_compute", "cuda_graphs"):
        assert getattr(plan, name) == (name not in off and getattr(config, name)), name
    assert why in plan.summary


def test_transposed_float8_weights_are_kept_only_where_they_fit():
    # Measured on an H100 at 1024x1024 (results/2026-11-28-h100-headline.json): no
    # recompute with the copy peaks at 52.5 GiB, so an 80 GB card keeps it, a 48 GB
    # card does not, nor does a lean run on a 24 GB card; a CPU (no free figure) never does.
    fast = memory.estimate(JOB, 0, 0, fp8_compute=True, compiled=True)
    lean = memory.estimate(JOB, fp8_compute=True, compiled=True)
    assert room_for_transposed_weights(79 * GIB, fast)
    assert not room_for_transposed_weights(48 * GIB, fast)
    assert room_for_transposed_weights(40 * GIB, lean)
    assert not room_for_transposed_weights(24 * GIB, lean)
    assert not room_for_transposed_weights(None, fast)


def test_offload_mode_offloads_even_when_the_model_would_fit():
    plan = plan_placement(JOB, TrainConfig(memory="offload"), cuda(80))
    assert plan.offload and plan.resident_bytes == 0
    assert plan.recompute_double == FULL.depth and plan.recompute_single == FULL.depth_single_blocks


def test_unknown_mode_is_named():
    config = TrainConfig()
    object.__setattr__(config, "memory", "swap")
    with pytest.raises(ValueError, match="memory mode 'swap' is not one of auto, fast, lean, offload"):
        plan_placement(JOB, config, CPU)


def test_the_job_counts_the_parameters_its_targets_train():
    everything = memory.Job(FULL, 4096, trainable_params=trainable_parameters(LoRAConfig(rank=16), FULL))
    attention = memory.Job(FULL, 4096, trainable_params=trainable_parameters(
        LoRAConfig(rank=16, targets="attention"), FULL))
    assert everything.trainable == memory.lora_params(FULL, 16)
    assert attention.trainable < everything.trainable / 2
    assert memory.estimate(attention)["lora"] < memory.estimate(everything)["lora"]


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
        assert (placed.model.recomputed_double, placed.model.recomputed_single) == expected
        assert (placed.offloader is not None) == (m == "offload")
        if placed.offloader:   # every block weight came from the file, not from a mapped copy
            stats = placed.offloader.stats()
            assert stats["read_from_file"] == stats["layers"] > 0
        losses[m] = train(placed.model, data, config, tmp_path / m, log=lambda _: None).losses
        placed.release()
    assert losses[mode] == losses["fast"]


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
