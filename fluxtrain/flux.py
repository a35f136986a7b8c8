"""The Flux transformer, in the original (BFL) key layout.

One module per concept, as in black-forest-labs/flux: EmbedND (RoPE), MLPEmbedder,
RMSNorm/QKNorm, Modulation, DoubleStreamBlock, SingleStreamBlock, LastLayer.
Every Linear is a FrozenLinear, so weight storage (float8), casting and the LoRA
slot live in one place and `Flux(params).state_dict()` has exactly the BFL keys.

Compute dtype: the dtype of `img`. Text, pooled vector and embeddings are cast
to it; every weight, bias and norm scale is cast at use. RoPE angles are built in
float64 and applied in float32, as BFL does.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from .layers import FrozenLinear
from .params import FluxParams

TIME_EMBED_DIM = 256  # width of the sinusoidal time / guidance embedding


# ---------------------------------------------------------------- positions (RoPE)

def rope(pos: Tensor, dim: int, theta: int) -> tuple[Tensor, Tensor]:
    """cos and sin of the rotary angles for one id axis: [..., N] -> 2 x [..., N, dim/2]."""
    freqs = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device=pos.device) / dim)
    angles = pos.to(torch.float64)[..., None] * freqs
    return angles.cos().float(), angles.sin().float()


def apply_rope(x: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """Rotate consecutive pairs (x0, x1) of every head by the angles of their token."""
    cos, sin = pe
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    rotated = torch.stack((cos * x0 - sin * x1, sin * x0 + cos * x1), dim=-1)
    return rotated.flatten(-2).type_as(x)


class EmbedND(nn.Module):
    """RoPE over n id axes: axis i of the ids rotates axes_dim[i] channels of each head."""

    def __init__(self, theta: int, axes_dim: tuple[int, ...]):
        super().__init__()
        self.theta = theta
        self.axes_dim = tuple(axes_dim)

    def forward(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """ids [B, L, n_axes] -> (cos, sin), each [B, 1, L, head_dim/2] (the 1 broadcasts over heads)."""
        if ids.shape[-1] != len(self.axes_dim):
            raise ValueError(f"position ids have {ids.shape[-1]} axes, expected {len(self.axes_dim)} "
                             f"(axes_dim {self.axes_dim}); image ids are (0, row, col), text ids zeros")
        per_axis = [rope(ids[..., i], d, self.theta) for i, d in enumerate(self.axes_dim)]
        cos = torch.cat([c for c, _ in per_axis], dim=-1)
        sin = torch.cat([s for _, s in per_axis], dim=-1)
        return cos.unsqueeze(1), sin.unsqueeze(1)


def attention(q: Tensor, k: Tensor, v: Tensor, pe: tuple[Tensor, Tensor]) -> Tensor:
    """[B, H, L, D] each -> [B, L, H*D]."""
    q, k = apply_rope(q, pe), apply_rope(k, pe)
    x = F.scaled_dot_product_attention(q, k, v)
    return x.transpose(1, 2).flatten(2)


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] -> q, k, v each [B, H, L, D] (BFL's "B L (K H D) -> K B H L D")."""
    b, length, _ = qkv.shape
    q, k, v = qkv.view(b, length, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return q, k, v


# ---------------------------------------------------------------- embeddings

def timestep_embedding(t: Tensor, dim: int = TIME_EMBED_DIM, max_period: float = 10000,
                       time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding of `time_factor * t`, cos half first: [B] -> [B, dim] float32."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period)
                      * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = (time_factor * t.float())[:, None] * freqs[None]
    return torch.cat((torch.cos(args), torch.sin(args)), dim=-1)


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__()
        self.in_layer = FrozenLinear(in_dim, hidden_dim, device=device, dtype=dtype)
        self.out_layer = FrozenLinear(hidden_dim, hidden_dim, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class ScalarEmbedder(MLPEmbedder):
    """MLPEmbedder of a per-sample scalar (timestep or guidance) through its sinusoidal
    embedding. It receives the raw value [B], so a forward pre-hook on
    `model.guidance_in` sees exactly the guidance the model is fed."""

    def __init__(self, hidden_dim: int, device=None, dtype=None):
        super().__init__(TIME_EMBED_DIM, hidden_dim, device=device, dtype=dtype)

    def forward(self, value: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
        return super().forward(timestep_embedding(value).to(dtype))


# ---------------------------------------------------------------- norms and modulation

class RMSNorm(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.scale = nn.Parameter(torch.empty(dim, device=device, dtype=dtype), requires_grad=False)

    def forward(self, x: Tensor) -> Tensor:
        # Statistics in float32 so bf16 compute keeps the normalisation exact enough.
        rrms = torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6)
        return (x.float() * rrms).to(x.dtype) * self.scale.to(x.dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int, device=None, dtype=None):
        super().__init__()
        self.query_norm = RMSNorm(dim, device=device, dtype=dtype)
        self.key_norm = RMSNorm(dim, device=device, dtype=dtype)

    def forward(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q), self.key_norm(k)


def layer_norm(x: Tensor) -> Tensor:
    """LayerNorm without affine parameters (Flux modulates instead)."""
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class Modulation(nn.Module):
    """(shift, scale, gate) triples from the conditioning vector: two for a double
    block (attention and MLP), one for a single block."""

    def __init__(self, dim: int, double: bool, device=None, dtype=None):
        super().__init__()
        self.multiplier = 6 if double else 3
        self.lin = FrozenLinear(dim, self.multiplier * dim, device=device, dtype=dtype)

    def forward(self, vec: Tensor) -> list[tuple[Tensor, Tensor, Tensor]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        return [out[i:i + 3] for i in range(0, self.multiplier, 3)]


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return (1 + scale) * layer_norm(x) + shift


# ---------------------------------------------------------------- blocks

class SelfAttention(nn.Module):
    """The weights of one stream's attention; the joint attention itself runs in the block."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = FrozenLinear(dim, 3 * dim, bias=qkv_bias, device=device, dtype=dtype)
        self.norm = QKNorm(dim // num_heads, device=device, dtype=dtype)
        self.proj = FrozenLinear(dim, dim, device=device, dtype=dtype)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k)
        return q, k, v


class MLP(nn.Sequential):
    """Linear, tanh-GELU, Linear, keyed mlp.0 / mlp.2 as in BFL's nn.Sequential."""

    def __init__(self, dim: int, hidden_dim: int, device=None, dtype=None):
        super().__init__(FrozenLinear(dim, hidden_dim, device=device, dtype=dtype),
                         nn.GELU(approximate="tanh"),
                         FrozenLinear(hidden_dim, dim, device=device, dtype=dtype))


class DoubleStreamBlock(nn.Module):
    """Image and text streams with their own weights, attending jointly."""

    def __init__(self, p: FluxParams, device=None, dtype=None):
        super().__init__()
        h, kw = p.hidden_size, dict(device=device, dtype=dtype)
        self.img_mod = Modulation(h, double=True, **kw)
        self.img_attn = SelfAttention(h, p.num_heads, p.qkv_bias, **kw)
        self.img_mlp = MLP(h, p.mlp_hidden_dim, **kw)
        self.txt_mod = Modulation(h, double=True, **kw)
        self.txt_attn = SelfAttention(h, p.num_heads, p.qkv_bias, **kw)
        self.txt_mlp = MLP(h, p.mlp_hidden_dim, **kw)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe) -> tuple[Tensor, Tensor]:
        (img_shift1, img_scale1, img_gate1), (img_shift2, img_scale2, img_gate2) = self.img_mod(vec)
        (txt_shift1, txt_scale1, txt_gate1), (txt_shift2, txt_scale2, txt_gate2) = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(modulate(img, img_shift1, img_scale1))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(modulate(txt, txt_shift1, txt_scale1))
        # Text tokens first, as the ids are ordered (txt_ids, img_ids).
        attn = attention(torch.cat((txt_q, img_q), dim=2), torch.cat((txt_k, img_k), dim=2),
                         torch.cat((txt_v, img_v), dim=2), pe)
        txt_attn, img_attn = attn[:, :txt.shape[1]], attn[:, txt.shape[1]:]

        img = img + img_gate1 * self.img_attn.proj(img_attn)
        img = img + img_gate2 * self.img_mlp(modulate(img, img_shift2, img_scale2))
        txt = txt + txt_gate1 * self.txt_attn.proj(txt_attn)
        txt = txt + txt_gate2 * self.txt_mlp(modulate(txt, txt_shift2, txt_scale2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over the joined text+image tokens; attention and MLP run in
    parallel from one fused input projection (linear1) and one output projection (linear2)."""

    def __init__(self, p: FluxParams, device=None, dtype=None):
        super().__init__()
        h, kw = p.hidden_size, dict(device=device, dtype=dtype)
        self.hidden_size, self.num_heads, self.mlp_hidden_dim = h, p.num_heads, p.mlp_hidden_dim
        self.linear1 = FrozenLinear(h, 3 * h + p.mlp_hidden_dim, **kw)
        self.linear2 = FrozenLinear(h + p.mlp_hidden_dim, h, **kw)
        self.norm = QKNorm(p.head_dim, **kw)
        self.modulation = Modulation(h, double=False, **kw)

    def forward(self, x: Tensor, vec: Tensor, pe) -> Tensor:
        [(shift, scale, gate)] = self.modulation(vec)
        qkv, mlp = self.linear1(modulate(x, shift, scale)).split(
            [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k)
        attn = attention(q, k, v, pe)
        out = self.linear2(torch.cat((attn, F.gelu(mlp, approximate="tanh")), dim=-1))
        return x + gate * out


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int, device=None, dtype=None):
        super().__init__()
        self.linear = FrozenLinear(hidden_size, out_channels, device=device, dtype=dtype)
        # Index 1, after a SiLU at index 0: BFL's key is adaLN_modulation.1.
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), FrozenLinear(hidden_size, 2 * hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        return self.linear(modulate(x, shift, scale))


# ---------------------------------------------------------------- the model

class Flux(nn.Module):
    """The FLUX.1 transformer. Weights are left uninitialised: they come from a checkpoint
    (fluxtrain.checkpoint) or a synthetic one (fluxtrain.synthetic)."""

    def __init__(self, params: FluxParams, device=None, dtype=None):
        super().__init__()
        self.params = p = params
        kw = dict(device=device, dtype=dtype)
        self.pe_embedder = EmbedND(p.theta, p.axes_dim)
        self.img_in = FrozenLinear(p.in_channels, p.hidden_size, **kw)
        self.time_in = ScalarEmbedder(p.hidden_size, **kw)
        self.vector_in = MLPEmbedder(p.vec_in_dim, p.hidden_size, **kw)
        self.guidance_in = ScalarEmbedder(p.hidden_size, **kw) if p.guidance_embed else None
        self.txt_in = FrozenLinear(p.context_in_dim, p.hidden_size, **kw)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(p, **kw) for _ in range(p.depth))
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(p, **kw) for _ in range(p.depth_single_blocks))
        self.final_layer = LastLayer(p.hidden_size, p.out_channels, **kw)
        self.recomputed_double = 0
        self.recomputed_single = 0
        # Recompute replays the random draws of the forward (LoRA dropout). With none to
        # replay, False keeps the recompute free of RNG bookkeeping (CUDA graphs need that).
        self.recompute_rng = True

    def blocks(self) -> list[nn.Module]:
        """Every transformer block, double blocks first (the order forward runs them)."""
        return [*self.double_blocks, *self.single_blocks]

    def token_linears(self) -> list[FrozenLinear]:
        """The frozen linears that act on every token inside the blocks (attention and
        MLP projections): all of the model's matmul work except a few tenths of a
        percent. Not among them: the modulation (one row per sample), the embedders
        and the final layer."""
        modulation = {id(m.lin) for b in self.blocks() for m in b.modules()
                      if isinstance(m, Modulation)}
        return [m for b in self.blocks() for m in b.modules()
                if isinstance(m, FrozenLinear) and id(m) not in modulation]

    def set_recompute(self, n_double: int, n_single: int) -> None:
        """Recompute the first `n_double` double blocks and the first `n_single` single
        blocks in backward instead of keeping their activations (0, 0 turns it off)."""
        for name, n, total in (("n_double", n_double, self.params.depth),
                               ("n_single", n_single, self.params.depth_single_blocks)):
            if not 0 <= n <= total:
                raise ValueError(f"{name}={n} blocks to recompute, but the model has {total}; "
                                 f"pass a count between 0 and {total}")
        self.recomputed_double, self.recomputed_single = n_double, n_single

    def forward(self, img: Tensor, img_ids: Tensor, txt: Tensor, txt_ids: Tensor,
                timesteps: Tensor, y: Tensor, guidance: Tensor | None = None) -> Tensor:
        """img [B, N, in_channels] tokens, ids [B, *, 3], txt [B, L, context_in_dim],
        timesteps [B] in [0, 1], y [B, vec_in_dim], guidance [B] (ignored by a model
        without guidance embedding) -> velocity [B, N, out_channels] in img's dtype."""
        self._check_inputs(img, txt, y)
        dtype = img.dtype
        vec = self.time_in(timesteps, dtype)
        if self.guidance_in is not None:
            if guidance is None:
                raise ValueError("this Flux model has a guidance embedding (FLUX.1-dev, Dev2Pro) "
                                 "and needs guidance [B]: pass e.g. torch.full((B,), 1.0) "
                                 "(1.0 for training on Dev2Pro)")
            vec = vec + self.guidance_in(guidance, dtype)
        vec = vec + self.vector_in(y.to(dtype))

        img = self.img_in(img)
        txt = self.txt_in(txt.to(dtype))
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        for i, block in enumerate(self.double_blocks):
            img, txt = self._run(block, i < self.recomputed_double, img, txt, vec, pe)
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            x = self._run(block, i < self.recomputed_single, x, vec, pe)
        img = x[:, txt.shape[1]:]
        return self.final_layer(img, vec)

    def _run(self, block: nn.Module, recompute: bool, *args):
        if recompute and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, preserve_rng_state=self.recompute_rng)
        return block(*args)

    def _check_inputs(self, img: Tensor, txt: Tensor, y: Tensor) -> None:
        p = self.params
        for name, x, width in (("img", img, p.in_channels), ("txt", txt, p.context_in_dim),
                               ("y", y, p.vec_in_dim)):
            if x.shape[-1] != width:
                raise ValueError(f"{name} has width {x.shape[-1]} (shape {tuple(x.shape)}), but this "
                                 f"model expects {width}: check the latents are packed 2x2 and the "
                                 "text encoders match the model")


# ---------------------------------------------------------------- latents <-> tokens

def pack_latents(z: Tensor) -> tuple[Tensor, Tensor]:
    """[B, C, H, W] latents -> tokens [B, (H/2)(W/2), 4C] and image ids [B, N, 3] = (0, row, col).
    Same order as BFL's rearrange "b c (h ph) (w pw) -> b (h w) (c ph pw)"."""
    b, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height and width must be even to patchify 2x2, got {h}x{w}: "
                         "crop or resize the image to a multiple of 16 pixels")
    tokens = (z.reshape(b, c, h // 2, 2, w // 2, 2)
              .permute(0, 2, 4, 1, 3, 5)
              .reshape(b, (h // 2) * (w // 2), c * 4))
    ids = torch.zeros(h // 2, w // 2, 3, device=z.device)
    ids[..., 1] = torch.arange(h // 2, device=z.device)[:, None]
    ids[..., 2] = torch.arange(w // 2, device=z.device)[None, :]
    return tokens, ids.reshape(1, -1, 3).repeat(b, 1, 1)


def unpack_latents(tokens: Tensor, height: int, width: int) -> Tensor:
    """Inverse of pack_latents: tokens [B, (H/2)(W/2), 4C] -> latents [B, C, H, W]."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2) or height % 2 or width % 2:
        raise ValueError(f"{n} tokens cannot be unpacked to a {height}x{width} latent: "
                         f"expected {(height // 2) * (width // 2)} tokens and even sizes")
    return (tokens.reshape(b, height // 2, width // 2, d // 4, 2, 2)
            .permute(0, 3, 1, 4, 2, 5)
            .reshape(b, d // 4, height, width))


def text_ids(batch: int, length: int, device=None) -> Tensor:
    """Position ids of the text tokens: all zeros, [B, L, 3]."""
    return torch.zeros(batch, length, 3, device=device)
