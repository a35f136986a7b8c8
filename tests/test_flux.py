"""The Flux transformer: BFL key layout, parity with diffusers' independent
implementation, latent packing order, guidance input, checkpointing, float8 storage."""

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fluxtrain.checkpoint import bfl_to_diffusers
from fluxtrain.flux import Flux, pack_latents, text_ids, unpack_latents
from fluxtrain.params import TINY, FluxParams, expected_shapes

# Key list and shapes of the released flux1-dev.safetensors (a copy of the team's reference).
REFERENCE_SHAPES = Path(__file__).parent / "data" / "flux1-dev-bfl-shapes.json"


def random_flux(params=TINY, seed=0) -> Flux:
    """A Flux where every path moves the output: unlike the shared `tiny_sd` fixture
    (norm scales 1, tiny biases), qk-norm scales and biases are random, so the diffusers
    comparison notices a swapped query/key norm or a misplaced bias."""
    model = Flux(params)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen)
            if name.endswith(".scale"):  # qk-norm
                p.copy_(1 + 0.2 * noise)
            elif name.endswith(".weight"):  # unit-size activations: std 1/sqrt(fan-in)
                p.copy_(noise / p.shape[1] ** 0.5)
            else:
                p.copy_(0.1 * noise)
    return model


def random_inputs(batch=2, latent_hw=(8, 12), txt_len=5, params=TINY, seed=1):
    gen = torch.Generator().manual_seed(seed)
    img, img_ids = pack_latents(torch.randn(batch, params.in_channels // 4, *latent_hw, generator=gen))
    return dict(img=img, img_ids=img_ids,
                txt=torch.randn(batch, txt_len, params.context_in_dim, generator=gen),
                txt_ids=text_ids(batch, txt_len),
                timesteps=torch.rand(batch, generator=gen),
                y=torch.randn(batch, params.vec_in_dim, generator=gen),
                guidance=torch.tensor([1.0, 3.5])[:batch])


# ---------------------------------------------------------------- key layout

def test_state_dict_is_the_bfl_layout():
    for params in (TINY, dataclasses.replace(TINY, guidance_embed=False)):
        shapes = {k: tuple(v.shape) for k, v in Flux(params).state_dict().items()}
        assert shapes == expected_shapes(params)


def test_full_size_model_matches_the_released_flux1_dev_keys():
    reference = json.loads(REFERENCE_SHAPES.read_text())["shapes"]
    model = Flux(FluxParams(), device="meta")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert shapes == reference
    assert all(not p.requires_grad for p in model.parameters())


# ---------------------------------------------------------------- parity with diffusers

def diffusers_flux(model: Flux):
    from diffusers import FluxTransformer2DModel
    p = model.params
    reference = FluxTransformer2DModel(
        in_channels=p.in_channels, out_channels=p.out_channels, num_layers=p.depth,
        num_single_layers=p.depth_single_blocks, attention_head_dim=p.head_dim,
        num_attention_heads=p.num_heads, joint_attention_dim=p.context_in_dim,
        pooled_projection_dim=p.vec_in_dim, guidance_embeds=p.guidance_embed,
        axes_dims_rope=p.axes_dim)
    # Our converter: test_checkpoint checks it key for key against diffusers' own.
    reference.load_state_dict(bfl_to_diffusers(model.state_dict()), strict=True)
    return reference.eval()


@pytest.mark.parametrize("latent_hw, txt_len", [((8, 12), 5), ((16, 8), 7)])
def test_forward_matches_diffusers(latent_hw, txt_len):
    pytest.importorskip("diffusers")
    model = random_flux()
    reference = diffusers_flux(model)
    x = random_inputs(latent_hw=latent_hw, txt_len=txt_len)
    with torch.no_grad():
        ours = model(**x)
        # diffusers multiplies timestep and guidance by 1000 itself, and takes unbatched ids.
        theirs = reference(hidden_states=x["img"], encoder_hidden_states=x["txt"],
                           pooled_projections=x["y"], timestep=x["timesteps"],
                           img_ids=x["img_ids"][0], txt_ids=x["txt_ids"][0],
                           guidance=x["guidance"], return_dict=False)[0]
    assert ours.shape == (2, (latent_hw[0] // 2) * (latent_hw[1] // 2), 64)
    assert theirs.abs().mean() > 0.1, "the random model is too weak for the comparison to mean much"
    rel_err = (ours - theirs).abs().max() / theirs.abs().max()
    assert rel_err < 1e-5, f"max error relative to max output: {rel_err:.2e}"


# ---------------------------------------------------------------- latents

def test_pack_latents_uses_bfl_patchify_order():
    z = torch.randn(2, 16, 6, 10)
    tokens, ids = pack_latents(z)
    assert tokens.shape == (2, 15, 64) and ids.shape == (2, 15, 3)
    # "b c (h ph) (w pw) -> b (h w) (c ph pw)", spelled out element by element.
    for b, row, col, c, ph, pw in [(0, 0, 0, 0, 0, 1), (1, 2, 4, 15, 1, 0), (0, 1, 3, 7, 1, 1)]:
        token, feature = row * 5 + col, c * 4 + ph * 2 + pw
        assert tokens[b, token, feature] == z[b, c, 2 * row + ph, 2 * col + pw]
        assert ids[b, token].tolist() == [0.0, row, col]
    assert torch.equal(unpack_latents(tokens, 6, 10), z)
    with pytest.raises(ValueError, match="even"):
        pack_latents(torch.zeros(1, 16, 5, 4))
    with pytest.raises(ValueError, match="15 tokens"):
        unpack_latents(tokens, 8, 10)
    assert torch.equal(text_ids(2, 4), torch.zeros(2, 4, 3))


# ---------------------------------------------------------------- guidance

def test_guidance_reaches_the_embedder_raw_and_is_required():
    """A forward pre-hook on model.guidance_in receives the raw guidance tensor [B]:
    that is how a test checks what a trainer feeds the guidance embedding."""
    model = random_flux()
    x = random_inputs()
    seen = []
    handle = model.guidance_in.register_forward_pre_hook(lambda mod, args: seen.append(args[0]))
    with torch.no_grad():
        out = model(**x)
        other = model(**{**x, "guidance": torch.tensor([4.0, 4.0])})
    handle.remove()
    assert torch.equal(seen[0], torch.tensor([1.0, 3.5]))
    assert not torch.allclose(out, other, atol=1e-3), "guidance does not change the output"
    with pytest.raises(ValueError, match="needs guidance"):
        model(**{**x, "guidance": None})


def test_bad_input_width_is_named():
    model = random_flux()
    x = random_inputs()
    with pytest.raises(ValueError, match="txt has width 40"):
        model(**{**x, "txt": x["txt"][..., :40]})


# ---------------------------------------------------------------- compute dtype

def test_compute_dtype_follows_img():
    model = random_flux()
    x = random_inputs()
    with torch.no_grad():
        full = model(**x)
        half = model(**{**x, "img": x["img"].bfloat16()})
    assert half.dtype == torch.bfloat16
    assert (half.float() - full).abs().max() / full.abs().max() < 0.05


# ---------------------------------------------------------------- gradient checkpointing

class DeltaAdapter(nn.Module):
    """Stands in for a LoRA adapter: a trainable map from the layer input to an output delta."""

    def __init__(self, layer):
        super().__init__()
        self.weight = nn.Parameter(0.01 * torch.randn(layer.out_features, layer.in_features))

    def forward(self, x):
        return x @ self.weight.T


def output_and_grads(model, x):
    img = x["img"].clone().requires_grad_(True)
    out = model(**{**x, "img": img})
    out.square().mean().backward()
    adapters = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    model.zero_grad(set_to_none=True)
    return out.detach(), img.grad, adapters


@pytest.mark.parametrize("n_double, n_single", [(2, 2), (1, 1)])
def test_recompute_runs_blocks_again_and_keeps_outputs_and_grads(n_double, n_single):
    torch.manual_seed(0)
    model = random_flux()
    model.double_blocks[0].img_attn.qkv.lora = DeltaAdapter(model.double_blocks[0].img_attn.qkv)
    model.single_blocks[1].linear1.lora = DeltaAdapter(model.single_blocks[1].linear1)
    x = random_inputs()
    plain = output_and_grads(model, x)

    calls = []
    for block in model.blocks():
        block.register_forward_pre_hook(lambda mod, args: calls.append(mod))
    model.set_recompute(n_double, n_single)
    recomputed = output_and_grads(model, x)

    # A recomputed block starts twice: in forward, then again in backward (where torch
    # stops it early once the saved tensors are rebuilt, so only pre-hooks see it).
    runs = [calls.count(b) for b in model.blocks()]
    assert runs == [2] * n_double + [1] * (2 - n_double) + [2] * n_single + [1] * (2 - n_single)
    assert torch.allclose(plain[0], recomputed[0], rtol=0, atol=1e-6)
    assert torch.allclose(plain[1], recomputed[1], rtol=1e-5, atol=1e-8)
    assert len(plain[2]) == 2
    for a, b in zip(plain[2], recomputed[2]):
        assert a.abs().max() > 0 and torch.allclose(a, b, rtol=1e-5, atol=1e-8)


def test_set_recompute_rejects_counts_beyond_the_model():
    with pytest.raises(ValueError, match="n_single=3 blocks to recompute, but the model has 2"):
        Flux(TINY, device="meta").set_recompute(0, 3)


# ---------------------------------------------------------------- float8 storage

def test_float8_model_equals_upcast_weights_and_stays_float8():
    fp8 = random_flux().to(torch.float8_e4m3fn)
    upcast = Flux(TINY)
    upcast.load_state_dict({k: v.float() for k, v in fp8.state_dict().items()})
    original = random_flux()
    x = random_inputs()
    img = x["img"].clone().requires_grad_(True)  # the training path, with its own backward
    out = fp8(**{**x, "img": img})
    out.sum().backward()
    with torch.no_grad():
        assert torch.equal(out.detach(), upcast(**x))
        assert not torch.allclose(out.detach(), original(**x)), "float8 rounding had no effect"
    tensors = {**dict(fp8.named_parameters()), **dict(fp8.named_buffers())}
    assert tensors.keys() == expected_shapes(TINY).keys()
    assert {t.dtype for t in tensors.values()} == {torch.float8_e4m3fn}
