"""The memory planner (fluxtrain.memory): its model of where the bytes go, and the
decisions it takes from free VRAM. The activation coefficients are measured again
here on fluxtrain's own blocks, so a change to flux.py that moves them fails."""

import pytest
import torch

from fluxtrain import memory
from fluxtrain.flux import Flux
from fluxtrain.adapters import AdapterConfig, attach_adapters
from fluxtrain.lora import LoRAConfig, attach_lora
from fluxtrain.params import FluxParams, expected_shapes

FLUX = FluxParams()
GB = 10 ** 9


def saved_units(block_kind: str, adapter: AdapterConfig = AdapterConfig(rank=16)) -> float:
    """Bytes autograd saves for one block (`adapter`, by default a rank-16 LoRA, on every
    Linear), in hidden-state rows (bf16) per token. Head dim 128 as in Flux; width 256
    keeps it quick."""
    h = 256
    p = FluxParams(vec_in_dim=32, context_in_dim=48, hidden_size=h, num_heads=2, depth=1,
                   depth_single_blocks=1)
    model = Flux(p, dtype=torch.bfloat16)
    with torch.no_grad():
        for t in model.parameters():
            t.copy_(torch.randn(t.shape) * 0.05)
    model.requires_grad_(False)
    attach_adapters(model, adapter, seed=0)
    n_img, n_txt = 64, 32
    params = {t.untyped_storage().data_ptr() for t in model.parameters()}
    seen = {}

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in params:
            seen[s.data_ptr()] = s.nbytes()
        return t
    vec = torch.randn(1, h, dtype=torch.bfloat16, requires_grad=True)
    pe = model.pe_embedder(torch.zeros(1, n_img + n_txt, 3))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        if block_kind == "double":
            img = torch.randn(1, n_img, h, dtype=torch.bfloat16, requires_grad=True)
            txt = torch.randn(1, n_txt, h, dtype=torch.bfloat16, requires_grad=True)
            model.double_blocks[0](img, txt, vec, pe)
        else:
            x = torch.randn(1, n_img + n_txt, h, dtype=torch.bfloat16, requires_grad=True)
            model.single_blocks[0](x, vec, pe)
    return sum(seen.values()) / ((n_img + n_txt) * h * 2)


@pytest.mark.parametrize("kind,constant", [("double", memory.HOOK_DOUBLE_UNITS),
                                           ("single", memory.HOOK_SINGLE_UNITS)])
def test_activation_coefficients_match_what_the_blocks_save(kind, constant):
    measured = saved_units(kind)
    assert measured == pytest.approx(constant, rel=0.08), (
        f"{kind} blocks now save {measured:.1f} rows per token, the planner assumes "
        f"{constant}: update fluxtrain/memory.py (and re-check it on a GPU)")


def test_weight_bytes_are_the_float8_checkpoint_size():
    shapes = expected_shapes(FLUX)
    exact = sum((1 if len(s) == 2 else 2) * torch.Size(s).numel() for k, s in shapes.items())
    wd, ws = memory.block_weight_bytes(FLUX)
    modelled = FLUX.depth * wd + FLUX.depth_single_blocks * ws + memory.edge_weight_bytes(FLUX)
    assert modelled == pytest.approx(exact, rel=0.002)
    assert 11.5 * GB < modelled < 12.2 * GB      # the released float8 file is ~11.9 GB


def test_lora_parameter_count_matches_attach_lora():
    p = FluxParams(hidden_size=64, num_heads=2, depth=2, depth_single_blocks=3, axes_dim=(4, 14, 14),
                   vec_in_dim=32, context_in_dim=48)
    model = Flux(p, device="meta")
    adapters = attach_lora(model, LoRAConfig(rank=8), seed=0)
    assert memory.lora_params(p, 8) == sum(t.numel() for a in adapters.values()
                                           for t in a.parameters())


def test_a_big_card_trains_without_recompute():
    plan = memory.plan(80 * GB, memory.Job(FLUX, img_tokens=1024))
    assert (plan.recompute_double, plan.recompute_single, plan.offload) == (0, 0, False)
    assert plan.predicted_peak <= plan.budget


def test_less_vram_means_more_recompute_then_offload():
    tokens = 4096
    job = memory.Job(FLUX, img_tokens=tokens)
    plans = [memory.plan(gb * GB, job) for gb in (80, 48, 32, 24, 16, 10)]
    recomputed = [p.recompute_double + p.recompute_single for p in plans]
    assert recomputed == sorted(recomputed), "less memory must never recompute fewer blocks"
    assert not plans[0].offload and plans[-1].offload
    assert 0 < recomputed[2] < FLUX.depth + FLUX.depth_single_blocks  # partial in between
    for p in plans:
        assert p.predicted_peak <= p.budget
        # single blocks (cheaper to keep) stop recomputing before any double block
        assert p.recompute_single == 0 or p.recompute_double == FLUX.depth
    # offloading keeps whatever weights fit, more with more memory
    assert memory.plan(12 * GB, job).resident_bytes > plans[-1].resident_bytes > 0


def test_impossible_budgets_fail_with_a_message_that_says_what_to_do():
    with pytest.raises(memory.MemoryPlanError, match="lower the resolution"):
        memory.plan(3 * GB, memory.Job(FLUX, img_tokens=4096))
    with pytest.raises(memory.MemoryPlanError, match="offloading is off"):
        memory.plan(10 * GB, memory.Job(FLUX, img_tokens=4096), offload_available=False)


def test_compiled_coefficients_follow_the_measurements_between_resolutions():
    lo = memory.activation_units(True, False, 1536)
    hi = memory.activation_units(True, False, 4608)
    mid = memory.activation_units(True, False, 3072)
    assert lo == memory.UNITS[(True, False)][1536] and hi == memory.UNITS[(True, False)][4608]
    assert all(min(a, b) < m < max(a, b) for a, b, m in zip(lo, hi, mid))
    assert memory.activation_units(True, False, 100) == lo       # nearest outside the table
    assert memory.activation_units(False, False, 100) == memory.activation_units(False, False, 9000)
