"""LoKr, LoHa and DoRA (fluxtrain.adapters): each adapter's forward against the merged
weight written out here from the LyCORIS formulas, exact no-op at attach, gradients,
files, the planner's counts, and what diffusers does with each file. Training, resume
and recovery of a planted change are in test_train.py; ComfyUI's own merge in
tests/comfyui/test_adapters.py."""

import json

import pytest
import torch

from fluxtrain import memory
from fluxtrain.adapters import (ADAPTERS, AdapterConfig, DoRAAdapter, adapter_cost, adapter_parameters,
                                adapter_state_dict, attach_adapters, extra_saved_units, factorization,
                                saved_per_block,
                                load_adapter_state_dict, save_adapter_file)
from fluxtrain.checkpoint import load_flux
from fluxtrain.flux import Flux
from fluxtrain.layers import materialize_weight
from fluxtrain.lora import (LoRAConfig, LoRAConfigError, LoRAFileError, attach_lora, kohya_name,
                            load_lora_file, lora_state_dict, trainable_parameters)
from fluxtrain.params import TINY, FluxParams
from fluxtrain.synthetic import random_state_dict, write_scaled_fp8
from fluxtrain.train import TrainConfig

from test_lora import inputs, tiny_flux

CONFIGS = {
    "lora": AdapterConfig(rank=4, alpha=2, adapter="lora"),
    "lokr": AdapterConfig(rank=4, alpha=2, adapter="lokr", lokr_factor=4),
    "lokr-balanced": AdapterConfig(rank=4, alpha=2, adapter="lokr", lokr_factor=-1),
    "lokr-low-rank": AdapterConfig(rank=3, alpha=2, adapter="lokr", lokr_factor=4, lokr_full_matrix=False),
    "loha": AdapterConfig(rank=3, alpha=2, adapter="loha"),
    "dora": AdapterConfig(rank=4, alpha=2, adapter="dora"),
}


def randomize(adapters, seed=1, std=0.1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            for p in a.parameters():
                p.add_(torch.randn(p.shape, generator=g) * std)


def merged_weight(weight: torch.Tensor, t: dict, rank: int) -> torch.Tensor:
    """The weight ComfyUI builds from one module's file tensors `t` (suffix -> tensor), the
    LyCORIS formulas written out here, independently of fluxtrain.adapters."""
    alpha = float(t["alpha"])
    if "lokr_w1" in t:
        full = "lokr_w2" in t
        w2 = t["lokr_w2"] if full else t["lokr_w2_a"] @ t["lokr_w2_b"]
        scale = 1.0 if full else alpha / t["lokr_w2_b"].shape[0]
        o1, i1 = t["lokr_w1"].shape
        o2, i2 = w2.shape
        delta = torch.einsum("ij,pq->ipjq", t["lokr_w1"], w2).reshape(o1 * o2, i1 * i2)   # kron
        return weight + scale * delta
    if "hada_w1_a" in t:
        return weight + alpha / rank * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    merged = weight + alpha / rank * t["lora_up.weight"] @ t["lora_down.weight"]
    if "dora_scale" in t:     # [1, in]: the norm of each input column of the merged weight
        norms = merged.square().sum(0, keepdim=True).sqrt() + torch.finfo(torch.float32).eps
        merged = merged * t["dora_scale"] / norms
    return merged


def by_module(state: dict) -> dict[str, dict]:
    out: dict[str, dict] = {}
    for key, t in state.items():
        module, suffix = key.split(".", 1)
        out.setdefault(module, {})[suffix] = t
    return out


@pytest.mark.parametrize("name", list(CONFIGS))
def test_forward_equals_the_merged_weight_comfyui_builds(name):
    config = CONFIGS[name]
    model, merged = tiny_flux(), tiny_flux()
    adapters = attach_adapters(model, config, seed=3)
    randomize(adapters)
    files = by_module(adapter_state_dict(adapters))
    with torch.no_grad():
        for module, t in files.items():
            bfl = next(n for n in adapters if kohya_name(n) == module)
            w = merged.get_parameter(f"{bfl}.weight")
            w.copy_(merged_weight(w.clone(), t, config.rank))
        ours, theirs, base = model(**inputs()), merged(**inputs()), tiny_flux()(**inputs())
    assert (ours - base).abs().max() > 1e-2, "the adapters barely act: the comparison would be empty"
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fresh_adapter_leaves_the_model_unchanged(name, dtype):
    model = tiny_flux()
    with torch.no_grad():
        base = model(**inputs(dtype))
        attach_adapters(model, CONFIGS[name], seed=0)
        out = model(**inputs(dtype))
    if name == "dora":   # scale exactly 1, but the rescaled input is a new tensor: matmuls may round apart
        torch.testing.assert_close(out, base, rtol=0, atol=1e-6 if dtype == torch.float32 else 8e-3)
    else:
        assert torch.equal(out, base)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_gradients_reach_only_the_adapters_in_float32(name):
    model = tiny_flux()
    adapters = attach_adapters(model, CONFIGS[name], seed=0)
    randomize(adapters, std=0.01)           # past the zero start, so every factor gets a gradient
    out = model(**inputs(torch.bfloat16))
    assert out.dtype == torch.bfloat16
    out.float().square().mean().backward()
    trained = {id(p) for a in adapters.values() for p in a.parameters()}
    for param_name, p in model.named_parameters():
        if id(p) in trained:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.abs().sum() > 0, param_name
        else:
            assert not p.requires_grad and p.grad is None, param_name


def test_lora_through_the_adapter_table_is_todays_lora():
    a = attach_adapters(tiny_flux(), CONFIGS["lora"], seed=7)
    b = attach_lora(tiny_flux(), LoRAConfig(rank=4, alpha=2), seed=7)
    assert type(next(iter(a.values()))) is ADAPTERS["lora"]
    sa, sb = adapter_state_dict(a), lora_state_dict(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("dimension, factor, expected", [
    (3072, 16, (16, 192)), (3072, -1, (48, 64)), (21504, 16, (16, 1344)), (1024, -1, (32, 32)),
    (127, 16, (1, 127)), (360, -1, (18, 20)), (250, 8, (5, 50)), (64, 1, (1, 64)),
])
def test_lokr_factorization(dimension, factor, expected):
    # tests/comfyui compares it with ComfyUI's own on thousands of cases; these are spot checks
    assert factorization(dimension, factor) == expected


def test_lokr_shapes_on_flux_and_low_rank_second_factor():
    model = Flux(FluxParams(), device="meta")
    lokr = attach_adapters(model, AdapterConfig(adapter="lokr", lokr_factor=16), seed=0)
    a = lokr["single_blocks.0.linear1"]      # 21504 x 3072
    assert (a.w1.shape, a.w2.shape) == ((16, 16), (1344, 192))
    low = attach_adapters(model, AdapterConfig(adapter="lokr", rank=8, lokr_full_matrix=False), seed=0)
    b = low["single_blocks.0.linear1"]
    assert (b.w2_a.shape, b.w2_b.shape) == ((1344, 8), (8, 192))


def test_dora_reads_the_real_weight_of_a_scaled_float8_layer(tmp_path, tiny_sd):
    path = tmp_path / "scaled.safetensors"
    write_scaled_fp8(tiny_sd, path)
    model, _ = load_flux(path)
    layer = model.get_submodule("double_blocks.0.img_attn.qkv")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight_scale is not None
    adapters = attach_adapters(model, CONFIGS["dora"], seed=0)
    real = materialize_weight(layer.weight, layer.weight_scale, torch.float32)
    dora = adapters["double_blocks.0.img_attn.qkv"]
    torch.testing.assert_close(dora.weight_sq, real.square().sum(0), rtol=1e-6, atol=0)
    assert not torch.allclose(dora.weight_sq, layer.weight.float().square().sum(0), rtol=1e-3)


def test_dora_magnitude_changes_survive_a_bf16_forward():
    """A 1e-4 change of a column's magnitude changes a bf16 output: the scale is applied as
    x + x * (scale - 1), not as a bf16 scale (which rounds 1 + 1e-4 to 1)."""
    model = tiny_flux()
    dora = attach_adapters(model, CONFIGS["dora"], seed=0)
    with torch.no_grad():
        base = model(**inputs(torch.bfloat16))
        for a in dora.values():
            a.magnitude.mul_(1 + 2e-3)
        assert not torch.equal(model(**inputs(torch.bfloat16)), base)


# ---------------------------------------------------------------- files and resume

@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "lora"])
def test_file_holds_lycoris_names_float32_alpha_and_magnitude(tmp_path, name):
    config = CONFIGS[name]
    adapters = attach_adapters(tiny_flux(), config, seed=0)
    randomize(adapters)
    path = save_adapter_file(tmp_path / "a.safetensors", adapters, config, {"base_model": "dev2pro"})
    tensors, meta = load_lora_file(path)
    assert tensors.keys() == adapter_state_dict(adapters).keys()
    for key, t in tensors.items():
        assert key.startswith("lora_unet_")
        wanted = torch.float32 if key.endswith((".alpha", ".dora_scale")) else torch.bfloat16
        assert t.dtype == wanted, key
    assert meta["ss_network_module"] == "lycoris.kohya" and meta["base_model"] == "dev2pro"
    assert json.loads(meta["ss_network_args"])["algo"] == {"dora": "lora"}.get(config.adapter, config.adapter)
    assert AdapterConfig.from_dict(json.loads(meta["fluxtrain_lora"])) == config
    fresh = attach_adapters(tiny_flux(), config, seed=9)
    float32 = save_adapter_file(tmp_path / "b.safetensors", adapters, config, dtype=torch.float32)
    load_adapter_state_dict(fresh, load_lora_file(float32)[0])
    before, after = adapter_state_dict(adapters), adapter_state_dict(fresh)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_resuming_with_another_adapter_or_factor_is_refused():
    state = adapter_state_dict(attach_adapters(tiny_flux(), CONFIGS["lokr"], seed=0))
    with pytest.raises(LoRAFileError, match="unexpected"):
        load_adapter_state_dict(attach_adapters(tiny_flux(), CONFIGS["loha"]), state)
    with pytest.raises(LoRAFileError, match="another rank, LoKr factor"):
        load_adapter_state_dict(attach_adapters(tiny_flux(), CONFIGS["lokr-balanced"].__class__(
            rank=4, alpha=2, adapter="lokr", lokr_factor=2)), state)


@pytest.mark.parametrize("bad, message", [
    (dict(adapter="oft"), "unknown adapter 'oft'"),
    (dict(adapter="lokr", lokr_factor=0), "lokr_factor must be -1"),
])
def test_bad_adapter_settings_are_named(bad, message):
    with pytest.raises(LoRAConfigError, match=message):
        AdapterConfig(**bad)


def test_train_config_offers_every_adapter_and_refuses_factor_zero():
    assert TrainConfig().adapter == "lora"
    assert TrainConfig(adapter="dora").adapter_config().adapter == "dora"
    with pytest.raises(ValueError, match="adapter 'oft' is not one of lora, lokr, loha, dora"):
        TrainConfig(adapter="oft")
    with pytest.raises(ValueError, match="lokr_factor must be -1 .* got 0"):
        TrainConfig(lokr_factor=0)


# ---------------------------------------------------------------- the memory planner's counts

@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("targets", ["all", "attention"])
def test_parameter_count_is_what_attaches(name, targets):
    config = AdapterConfig(**{**CONFIGS[name].to_dict(), "targets": targets})
    model = Flux(FluxParams(), device="meta")
    attached = attach_adapters(model, config, seed=0)
    assert adapter_parameters(config, FluxParams()) == sum(p.numel() for a in attached.values()
                                                           for p in a.parameters())


def test_planner_counts_each_adapters_parameters_and_activations():
    p = FluxParams()

    def job(config):
        cost = adapter_cost(config, p)
        return memory.Job(p, 4096, 512, 1, cost.parameters, extra_units=cost.extra_units,
                          extra_block_elements=cost.extra_block_elements)
    lora = AdapterConfig(rank=16, alpha=16)
    assert job(lora) == memory.Job(p, 4096, 512, 1, trainable_parameters(lora.lora_config(), p))
    fast_lora = memory.estimate(job(lora), recompute_double=0, recompute_single=0)
    for name in ("lokr", "loha", "dora"):
        config = AdapterConfig(rank=16, alpha=16, adapter=name)
        e = memory.estimate(job(config), recompute_double=0, recompute_single=0)
        assert e["lora"] == adapter_parameters(config, p) * 16
        assert e["saved_activations"] > fast_lora["saved_activations"], name


@pytest.mark.parametrize("config", [AdapterConfig(rank=16, alpha=16, adapter="lokr", lokr_factor=4),
                                    AdapterConfig(rank=16, alpha=16, adapter="lokr", lokr_factor=16),
                                    AdapterConfig(rank=16, alpha=16, adapter="loha"),
                                    AdapterConfig(rank=16, alpha=16, adapter="dora")],
                         ids=["lokr-4", "lokr-16", "loha", "dora"])
def test_activation_counts_cover_what_the_blocks_save(config):
    """What autograd's hooks see a block keep beyond a LoRA of the same rank (test_memory
    measures the LoRA baseline the same way) is never more than the planner counts, and at
    most a few rows less (measured, width 256, 96 tokens: LoKr double blocks keep 2.1 rows
    of the 7.5 counted, DoRA's 7.5 of 14; LoHa 119 of 130, the rest within 0.5)."""
    from test_memory import saved_units
    tokens, p = 96, FluxParams(vec_in_dim=32, context_in_dim=48, hidden_size=256, num_heads=2, depth=1,
                               depth_single_blocks=1)
    rows, fixed = extra_saved_units(config, p), saved_per_block(config, p)
    for kind, per_token, per_block in zip(("double", "single"), rows, fixed):
        predicted = per_token + per_block / (tokens * p.hidden_size)
        measured = saved_units(kind, config) - saved_units(kind)
        assert measured <= predicted * 1.05 + 0.2, (kind, measured, predicted)
        assert predicted <= measured + 12, (kind, measured, predicted)


# ---------------------------------------------------------------- diffusers

def test_diffusers_cannot_load_lokr_or_loha_and_drops_doras_magnitude():
    """What diffusers (the version tests/requirements.txt installs) does with these files for
    Flux.1: the README says so; when this fails, diffusers learnt something: update both."""
    pytest.importorskip("peft")
    from diffusers import FluxTransformer2DModel
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin
    p = TINY
    for name in ("lokr", "loha"):
        state = adapter_state_dict(attach_adapters(tiny_flux(), CONFIGS[name], seed=0))
        reference = FluxTransformer2DModel(
            in_channels=p.in_channels, num_layers=p.depth, num_single_layers=p.depth_single_blocks,
            attention_head_dim=p.head_dim, num_attention_heads=p.num_heads,
            joint_attention_dim=p.context_in_dim, pooled_projection_dim=p.vec_in_dim,
            guidance_embeds=True, axes_dims_rope=p.axes_dim)
        # what FluxPipeline.load_lora_weights does: nothing is injected (it warns "No LoRA keys")
        reference.load_lora_adapter(FluxLoraLoaderMixin.lora_state_dict(dict(state)), adapter_name=name,
                                    prefix="transformer")
        assert not any("lora" in n or "lokr" in n or "hada" in n for n, _ in reference.named_modules()), name
    # DoRA: read as its LoRA part alone, the magnitude dropped (with a warning): another model
    config = AdapterConfig(rank=4, alpha=2, adapter="dora", targets=["img_mlp.0"])
    dora = adapter_state_dict(attach_adapters(tiny_flux(), config, seed=0))
    read = FluxLoraLoaderMixin.lora_state_dict(dict(dora))
    assert read and all(k.endswith(("lora_A.weight", "lora_B.weight")) for k in read), sorted(read)
