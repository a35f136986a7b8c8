"""Placement: the memory mode a training run gets, and that every mode trains alike."""

from __future__ import annotations


import pytest
import torch

from fluxtrain.params import FluxParams
from fluxtrain.placement import choose_plan, load_base_for_training
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
        losses[m] = train(placed.model, data, config, tmp_path / m, log=lambda _: None).losses
        placed.release()
    assert losses[mode] == losses["fast"]
