import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file

import fluxtrain.files
from fluxtrain.flux import Flux, pack_latents, text_ids
from fluxtrain.lora import (LoRAAdapter, LoRAConfig, LoRAConfigError, LoRAFileError, adapter_deltas,
                            attach_lora, detach_lora, kohya_name, load_lora_file,
                            load_lora_state_dict, lora_deltas, lora_key_map, lora_state_dict,
                            save_lora_file, target_modules)
from fluxtrain.params import TINY, FluxParams, expected_shapes, linear_modules
from fluxtrain.synthetic import random_state_dict


def tiny_flux(seed=0) -> Flux:
    model = Flux(TINY)
    model.load_state_dict(random_state_dict(TINY, seed))
    return model


def inputs(dtype=torch.float32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    img, img_ids = pack_latents(torch.randn(batch, TINY.in_channels // 4, 4, 6, generator=g))
    return dict(img=img.to(dtype), img_ids=img_ids,
                txt=torch.randn(batch, 5, TINY.context_in_dim, generator=g), txt_ids=text_ids(batch, 5),
                timesteps=torch.rand(batch, generator=g),
                y=torch.randn(batch, TINY.vec_in_dim, generator=g), guidance=torch.ones(batch))


def randomize_up(adapters, seed=2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.1)


# ---------------------------------------------------------------- targets

def test_all_targets_304_layers_of_full_flux():
    model = Flux(FluxParams(), device="meta")
    adapters = attach_lora(model, LoRAConfig(rank=16))
    assert len(adapters) == 304
    assert all(type(m.lora) is LoRAAdapter for n, m in model.named_modules() if n in adapters)
    assert adapters["single_blocks.37.linear1"].down.shape == (16, 3072)
    assert adapters["single_blocks.37.linear1"].up.shape == (3 * 3072 + 4 * 3072, 16)


@pytest.mark.parametrize("targets, count", [
    ("attention", 19 * 4 + 38 * 2), ("mlp", 19 * 4 + 38 * 2),
    ("double_blocks", 19 * 10), ("single_blocks", 38 * 3),
    ("double:0-7,single:10-20", 8 * 10 + 11 * 3), ("single:0,single:37", 2 * 3),
])
def test_target_set_counts(targets, count):
    assert len(target_modules(LoRAConfig(targets=targets), FluxParams())) == count


def test_attention_and_mlp_share_only_the_fused_single_block_layers():
    attn = set(target_modules(LoRAConfig(targets="attention"), TINY))
    mlp = set(target_modules(LoRAConfig(targets="mlp"), TINY))
    assert "double_blocks.0.txt_attn.qkv" in attn and "double_blocks.0.txt_attn.qkv" not in mlp
    assert "double_blocks.1.img_mlp.2" in mlp and "double_blocks.1.img_mlp.2" not in attn
    assert attn & mlp == {f"single_blocks.{i}.{l}" for i in range(2) for l in ("linear1", "linear2")}
    assert not any("mod" in n for n in attn | mlp)


def test_set_restricted_to_blocks_and_explicit_layers():
    names = target_modules(LoRAConfig(targets="attention", blocks="double:1"), TINY)
    assert names == ["double_blocks.1.img_attn.qkv", "double_blocks.1.img_attn.proj",
                     "double_blocks.1.txt_attn.qkv", "double_blocks.1.txt_attn.proj"]
    names = target_modules(LoRAConfig(targets=["img_attn.qkv", "linear2", "txt_in"]), TINY)
    assert names == ["txt_in", "double_blocks.0.img_attn.qkv", "double_blocks.1.img_attn.qkv",
                     "single_blocks.0.linear2", "single_blocks.1.linear2"]


@pytest.mark.parametrize("kwargs, found", [
    (dict(targets="attn"), "'attn'"),
    (dict(targets="triple:0-3"), "'triple:0-3'"),
    (dict(targets="double:a-b"), "'a-b'"),
    (dict(targets="double:5-2"), "first block 5"),
    (dict(targets="double:0", blocks="single:0"), "given twice"),
    (dict(targets=["img_attn.qkvv"]), "'img_attn.qkvv'"),
    (dict(rank=0), "rank"),
    (dict(alpha=0.0), "alpha"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_config_is_named(kwargs, found):
    with pytest.raises(LoRAConfigError, match=found):
        target_modules(LoRAConfig(**kwargs), TINY)


def test_block_range_past_the_model_is_refused():
    with pytest.raises(LoRAConfigError, match=r"single_blocks 0-7 goes past the model: it has 2"):
        target_modules(LoRAConfig(targets="single:0-7"), TINY)


# ---------------------------------------------------------------- adapter behaviour

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_zero_equals_base_model_exactly(dtype):
    model = tiny_flux()
    with torch.no_grad():
        base = model(**inputs(dtype))
        adapters = attach_lora(model, LoRAConfig(rank=4, alpha=8), seed=0)
        assert len(adapters) == 2 * 10 + 2 * 3
        assert torch.equal(model(**inputs(dtype)), base)
        randomize_up(adapters)
        assert not torch.allclose(model(**inputs(dtype)), base)   # the adapters are in the path
        detach_lora(model)
        assert torch.equal(model(**inputs(dtype)), base)


def test_forward_equals_base_plus_merged_delta():
    model, merged = tiny_flux(), tiny_flux()
    adapters = attach_lora(model, LoRAConfig(rank=4, alpha=2, targets="attention"), seed=3)
    randomize_up(adapters)
    with torch.no_grad():
        for key, delta in adapter_deltas(adapters).items():
            merged.get_parameter(key).add_(delta)
        assert torch.allclose(model(**inputs()), merged(**inputs()), atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_reach_only_lora_params_in_float32(dtype):
    model = tiny_flux()
    adapters = attach_lora(model, LoRAConfig(rank=4), seed=0)
    out = model(**inputs(dtype))
    assert out.dtype == dtype
    out.float().square().mean().backward()
    lora_params = {id(p) for a in adapters.values() for p in a.parameters()}
    for name, p in model.named_parameters():
        if id(p) in lora_params:
            assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, name
        else:
            assert not p.requires_grad and p.grad is None, name
    # up starts at zero: up gets a gradient, down gets none until up moves
    assert all(a.up.grad.abs().sum() > 0 for a in adapters.values())
    assert all(a.down.grad.abs().sum() == 0 for a in adapters.values())


def test_dropout_only_while_training():
    a = LoRAAdapter(8, 6, rank=2, alpha=2, dropout=0.5)
    a.reset_parameters(torch.Generator().manual_seed(0))
    torch.nn.init.normal_(a.up)
    x = torch.randn(3, 8)
    a.eval()
    assert torch.equal(a(x), a(x)) and torch.allclose(a(x), x @ a.delta_weight().T, atol=1e-6)
    a.train()
    torch.manual_seed(0)
    assert not torch.allclose(a(x), a(x))


def test_init_is_seeded_per_module_and_kaiming_bounded():
    a = attach_lora(tiny_flux(), LoRAConfig(targets="all"), seed=7)
    b = attach_lora(tiny_flux(), LoRAConfig(targets="attention"), seed=7)
    c = attach_lora(tiny_flux(), LoRAConfig(targets="attention"), seed=8)
    name = "double_blocks.1.img_attn.qkv"
    assert torch.equal(a[name].down, b[name].down)
    assert not torch.equal(b[name].down, c[name].down)
    assert not torch.equal(a[name].down, a["double_blocks.0.img_attn.qkv"].down)
    bound = 1 / math.sqrt(TINY.hidden_size)
    assert a[name].down.abs().max() <= bound and a[name].down.abs().max() > 0.8 * bound
    assert all(torch.count_nonzero(x.up) == 0 for x in a.values())


def test_attach_replaces_all_previous_adapters():
    model = tiny_flux()
    attach_lora(model, LoRAConfig(targets="all"))
    adapters = attach_lora(model, LoRAConfig(targets="single_blocks"))
    attached = [n for n, m in model.named_modules() if getattr(m, "lora", None) is not None]
    assert sorted(attached) == sorted(adapters) and len(adapters) == 6
    assert detach_lora(model) == 6


# ---------------------------------------------------------------- resume

def test_state_dict_round_trip_and_mismatch_errors():
    src = attach_lora(tiny_flux(), LoRAConfig(rank=4, alpha=4), seed=0)
    randomize_up(src)
    sd = lora_state_dict(src)
    assert "lora_unet_single_blocks_1_modulation_lin.lora_up.weight" in sd
    dst = attach_lora(tiny_flux(), LoRAConfig(rank=4, alpha=4), seed=1)
    load_lora_state_dict(dst, sd)
    assert all(torch.equal(src[n].down, dst[n].down) and torch.equal(src[n].up, dst[n].up) for n in src)

    with pytest.raises(LoRAFileError, match="alpha 4.0 but the attached LoRA has alpha 8.0"):
        load_lora_state_dict(attach_lora(tiny_flux(), LoRAConfig(rank=4, alpha=8)), sd)
    with pytest.raises(LoRAFileError, match="unexpected"):
        load_lora_state_dict(attach_lora(tiny_flux(), LoRAConfig(rank=4, alpha=4, targets="mlp")), sd)
    with pytest.raises(LoRAFileError, match="different rank"):
        load_lora_state_dict(attach_lora(tiny_flux(), LoRAConfig(rank=2, alpha=4)), sd)


# ---------------------------------------------------------------- LoRA files

@pytest.fixture
def trained():
    adapters = attach_lora(tiny_flux(), LoRAConfig(rank=4, alpha=2), seed=0)
    randomize_up(adapters)
    return adapters


def test_save_load_round_trip_is_exact_in_float32(tmp_path, trained):
    path = save_lora_file(tmp_path / "a.safetensors", trained, LoRAConfig(rank=4, alpha=2), {},
                          dtype=torch.float32)
    tensors, _ = load_lora_file(path)
    assert set(tensors) == {f"{kohya_name(n)}.{s}" for n in trained
                            for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert tensors["lora_unet_double_blocks_0_img_attn_qkv.alpha"].shape == ()
    expected = adapter_deltas(trained)
    got = lora_deltas(path, TINY)
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)


def test_default_file_is_bf16_and_close(tmp_path, trained):
    path = save_lora_file(tmp_path / "a.safetensors", trained, LoRAConfig(rank=4, alpha=2))
    tensors, _ = load_lora_file(path)
    assert tensors["lora_unet_single_blocks_0_linear1.lora_up.weight"].dtype == torch.bfloat16
    assert tensors["lora_unet_single_blocks_0_linear1.alpha"].dtype == torch.float32
    expected, got = adapter_deltas(trained), lora_deltas(path, TINY)
    assert all(torch.allclose(got[k], expected[k], rtol=2e-2, atol=1e-4) for k in expected)


def random_factors(params=TINY, rank=3, seed=0):
    """{bfl module: (down, up, alpha)} for every Linear of the model."""
    g = torch.Generator().manual_seed(seed)
    shapes = expected_shapes(params)
    out = {}
    for m in linear_modules(params):
        out_f, in_f = shapes[f"{m}.weight"]
        out[m] = (torch.randn(rank, in_f, generator=g), torch.randn(out_f, rank, generator=g),
                  torch.tensor(float(rank + 1)))
    return out


def as_kohya(factors):
    sd = {}
    for m, (down, up, alpha) in factors.items():
        sd.update({f"{kohya_name(m)}.lora_down.weight": down, f"{kohya_name(m)}.lora_up.weight": up,
                   f"{kohya_name(m)}.alpha": alpha})
    return sd


def as_diffusers(factors, p=TINY):
    """Written out by hand from the diffusers FluxTransformer2DModel layout."""
    h = p.hidden_size
    sd = {}

    def put(name, down, up, alpha):
        sd.update({f"transformer.{name}.lora_A.weight": down.clone(),     # safetensors refuses
                   f"transformer.{name}.lora_B.weight": up.contiguous(),  # shared storage
                   f"transformer.{name}.alpha": alpha.clone()})

    plain = {"img_in": "x_embedder", "txt_in": "context_embedder",
             "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
             "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
             "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
             "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
             "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
             "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
             "final_layer.linear": "proj_out"}
    block = {"img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
             "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
             "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
             "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
             "linear2": "proj_out", "modulation.lin": "norm.linear"}
    for m, (down, up, alpha) in factors.items():
        kind, _, rest = m.partition(".")
        index, _, layer = rest.partition(".")
        if m in plain:
            put(plain[m], down, up, alpha)
        elif m == "final_layer.adaLN_modulation.1":     # diffusers holds (scale, shift)
            put("norm_out.linear", down, torch.cat(up.chunk(2)[::-1]), alpha)
        elif kind == "double_blocks" and layer in ("img_attn.qkv", "txt_attn.qkv"):
            names = (["attn.to_q", "attn.to_k", "attn.to_v"] if layer.startswith("img")
                     else ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"])
            for name, rows in zip(names, up.split(h)):
                put(f"transformer_blocks.{index}.{name}", down, rows, alpha)
        elif kind == "double_blocks":
            put(f"transformer_blocks.{index}.{block[layer]}", down, up, alpha)
        elif layer == "linear1":
            for name, rows in zip(["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
                                  up.split([h, h, h, p.mlp_hidden_dim])):
                put(f"single_transformer_blocks.{index}.{name}", down, rows, alpha)
        else:
            put(f"single_transformer_blocks.{index}.{block[layer]}", down, up, alpha)
    return sd


def as_lora_a_b(factors):
    sd = {}
    for m, (down, up, alpha) in factors.items():
        sd.update({f"diffusion_model.{m}.lora_A.weight": down, f"diffusion_model.{m}.lora_B.weight": up,
                   f"diffusion_model.{m}.alpha": alpha})
    return sd


def assert_same_deltas(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-5), k


def test_diffusers_and_lora_a_b_names_give_the_kohya_deltas(tmp_path):
    factors = random_factors()
    kohya = lora_deltas(as_kohya(factors), TINY)
    assert len(kohya) == len(factors) == 2 * 10 + 2 * 3 + 10
    down, up, alpha = factors["single_blocks.1.linear1"]
    assert torch.allclose(kohya["single_blocks.1.linear1.weight"], up @ down * alpha / 3)
    save_file(as_diffusers(factors), str(tmp_path / "d.safetensors"))
    assert_same_deltas(lora_deltas(tmp_path / "d.safetensors", TINY), kohya)
    assert_same_deltas(lora_deltas(as_lora_a_b(factors), TINY), kohya)


def test_missing_alpha_means_scale_one():
    down, up, _ = random_factors()["double_blocks.0.img_mlp.0"]
    deltas = lora_deltas({"transformer.transformer_blocks.0.ff.net.0.proj.lora_A.weight": down,
                          "transformer.transformer_blocks.0.ff.net.0.proj.lora_B.weight": up}, TINY)
    assert torch.allclose(deltas["double_blocks.0.img_mlp.0.weight"], up @ down)


def test_kohya_split_qkv_file_reads_as_one_rank_3r_lora():
    """sd-scripts' split_qkv saves q/k/v as down cat [3r, in] and a block-diagonal up, under the
    fused name; ComfyUI (and we) scale it by alpha / (3r)."""
    h, r = TINY.hidden_size, 2
    g = torch.Generator().manual_seed(0)
    downs = [torch.randn(r, h, generator=g) for _ in range(3)]
    ups = [torch.randn(h, r, generator=g) for _ in range(3)]
    deltas = lora_deltas({"lora_unet_double_blocks_1_txt_attn_qkv.lora_down.weight": torch.cat(downs),
                          "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight": torch.block_diag(*ups),
                          "lora_unet_double_blocks_1_txt_attn_qkv.alpha": torch.tensor(6.0)}, TINY)
    expected = torch.cat([u @ d for u, d in zip(ups, downs)]) * 6.0 / (3 * r)
    assert torch.allclose(deltas["double_blocks.1.txt_attn.qkv.weight"], expected, atol=1e-5)


def test_key_map_agrees_with_diffusers_kohya_converter():
    """diffusers' own kohya -> diffusers Flux LoRA converter (an independent implementation of
    the name and q/k/v-slice mapping) lands every piece where lora_key_map says it lives."""
    conv = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    params = FluxParams()     # the converter hard-codes 19/38 blocks and width 3072
    shapes = expected_shapes(params)
    modules = linear_modules(params)
    sd = {}
    for i, m in enumerate(modules):       # down marks the module, up marks the row
        out_f, in_f = shapes[f"{m}.weight"]
        sd[f"{kohya_name(m)}.lora_down.weight"] = torch.full((1, in_f), float(i))
        sd[f"{kohya_name(m)}.lora_up.weight"] = torch.arange(out_f, dtype=torch.float32)[:, None]
        sd[f"{kohya_name(m)}.alpha"] = torch.tensor(1.0)
    converted = conv._convert_kohya_flux_lora_to_diffusers(sd)
    key_map = lora_key_map(params)
    seen = set()
    for key, tensor in converted.items():
        if not key.endswith(".lora_B.weight"):
            continue
        name = key[:-len(".lora_B.weight")]
        name = name if name.startswith("transformer.") else f"transformer.{name}"
        target = key_map[name]
        module = modules[int(converted[key.replace("lora_B", "lora_A")][0, 0])]
        first, count = target.rows or (0, shapes[f"{module}.weight"][0])
        first_row = count // 2 if target.swap_halves else first   # converter swaps the halves
        assert (target.module, first_row, count) == (module, int(tensor[0, 0]), tensor.shape[0]), key
        seen.add(module)
    assert seen == set(modules)


def test_unknown_keys_are_a_clear_error():
    sdxl = {"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.zeros(4, 320),
            "lora_unet_down_blocks_0_attentions_0_proj_in.lora_up.weight": torch.zeros(320, 4)}
    with pytest.raises(LoRAFileError, match=r"2 of 2 LoRA keys .*lora_unet_down_blocks_0.*another model"):
        lora_deltas(sdxl, TINY)
    full_flux = as_kohya({"double_blocks.7.img_mlp.0": random_factors()["double_blocks.1.img_mlp.0"]})
    with pytest.raises(LoRAFileError, match="double_blocks_7"):      # TINY has 2 double blocks
        lora_deltas(full_flux, TINY)


def test_wrong_shapes_and_half_pairs_are_clear_errors():
    down, up, alpha = random_factors()["double_blocks.0.img_attn.qkv"]
    with pytest.raises(LoRAFileError, match=r"Flux of another size"):
        lora_deltas(as_kohya({"double_blocks.0.img_attn.qkv": (down[:, :10], up, alpha)}), TINY)
    with pytest.raises(LoRAFileError, match="needs both"):
        lora_deltas({"lora_unet_txt_in.lora_down.weight": down}, TINY)


def test_text_encoder_keys_are_skipped():
    factors = {"double_blocks.0.img_mlp.2": random_factors()["double_blocks.0.img_mlp.2"]}
    sd = {**as_kohya(factors), "lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 768)}
    assert list(lora_deltas(sd, TINY)) == ["double_blocks.0.img_mlp.2.weight"]


def test_metadata_survives_as_strings_without_paths(tmp_path, trained):
    config = LoRAConfig(rank=4, alpha=2)
    training = {"steps": 100, "learning_rate": 1e-4, "targets": "all"}
    path = save_lora_file(tmp_path / "sub" / "my_lora.safetensors", trained, config,
                          {"base_model": "flux-dev2pro-fp8", "training": training, "dataset_size": 12})
    _, meta = load_lora_file(path)
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["base_model"] == "flux-dev2pro-fp8"
    assert json.loads(meta["training"]) == training and meta["dataset_size"] == "12"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"], meta["ss_base_model_version"]) == \
        ("4", "2.0", "flux1")
    assert LoRAConfig.from_dict(json.loads(meta["fluxtrain_lora"])) == config
    for value in meta.values():
        assert str(tmp_path) not in value and "my_lora" not in value and not value.startswith("/")


def test_file_is_replaced_atomically(tmp_path, trained, monkeypatch):
    path = tmp_path / "lora.safetensors"
    save_lora_file(path, trained, LoRAConfig(rank=4, alpha=2))
    before = path.read_bytes()
    randomize_up(trained, seed=9)

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(fluxtrain.files.os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        save_lora_file(path, trained, LoRAConfig(rank=4, alpha=2))
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
    monkeypatch.undo()
    save_lora_file(path, trained, LoRAConfig(rank=4, alpha=2))
    assert path.read_bytes() != before and [p.name for p in tmp_path.iterdir()] == ["lora.safetensors"]
    assert load_file(str(path)).keys() == lora_state_dict(trained).keys()
