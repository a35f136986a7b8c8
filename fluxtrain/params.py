"""Shapes of a Flux transformer, and how to read them off a checkpoint.

Nothing here is hard-coded to FLUX.1-dev's 19/38 blocks: the block counts, widths
and head size are inferred from the tensors, so small test models and pruned
variants load through the same code.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Sequence


class CheckpointError(ValueError):
    """A model file is not what it must be. The message says what was found,
    what was expected, and what to do."""


def listed(items, limit: int = 5, width: int = 120) -> str:
    """A few items of a possibly huge collection for a message, then 'and N more': a file
    with a million foreign keys must not make a million-key error."""
    items = list(items)
    shown = [repr(x) if len(repr(x)) <= width else repr(x)[:width] + "...'" for x in items[:limit]]
    more = f" and {len(items) - limit} more" if len(items) > limit else ""
    return "[" + ", ".join(shown) + "]" + more


@dataclass(frozen=True)
class FluxParams:
    in_channels: int = 64
    out_channels: int = 64
    vec_in_dim: int = 768
    context_in_dim: int = 4096
    hidden_size: int = 3072
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = 19
    depth_single_blocks: int = 38
    axes_dim: tuple[int, ...] = (16, 56, 56)
    theta: int = 10000
    qkv_bias: bool = True
    guidance_embed: bool = True

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if sum(self.axes_dim) != self.head_dim:
            raise ValueError(
                f"RoPE axes_dim {tuple(self.axes_dim)} sums to {sum(self.axes_dim)}, "
                f"but the head dim is {self.head_dim}")
        if any(d % 2 for d in self.axes_dim):
            raise ValueError(f"every RoPE axis width must be even, got {tuple(self.axes_dim)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_state_dict(cls, shapes: Mapping[str, Sequence[int]]) -> "FluxParams":
        """Infer the shapes from `{bfl_key: shape}` (no prefix)."""
        required = ["img_in.weight", "txt_in.weight", "vector_in.in_layer.weight",
                    "final_layer.linear.weight"]
        missing = [k for k in required if k not in shapes]
        if missing:
            raise CheckpointError(
                f"this is not a Flux transformer: keys {missing} are missing "
                f"(found {len(shapes)} tensors: {listed(sorted(shapes), 3)}). Expected a FLUX.1 "
                "transformer in the original layout (img_in, txt_in, double_blocks.N..., "
                "single_blocks.N...) or a diffusers 'transformer' folder.")
        hidden, in_ch = shapes["img_in.weight"]
        head_dim = _head_dim(shapes)
        if hidden % head_dim:
            raise CheckpointError(f"hidden size {hidden} is not a multiple of head dim {head_dim}")
        depth = count_blocks(shapes, "double_blocks.")
        single = count_blocks(shapes, "single_blocks.")
        mlp_key = "double_blocks.0.img_mlp.0.weight"
        if mlp_key in shapes:
            mlp_ratio = shapes[mlp_key][0] / hidden
        elif single:
            mlp_ratio = (shapes["single_blocks.0.linear1.weight"][0] - 3 * hidden) / hidden
        else:
            mlp_ratio = 4.0
        qkv_bias = ("double_blocks.0.img_attn.qkv.bias" in shapes
                    or "single_blocks.0.linear1.bias" in shapes)
        return cls(
            in_channels=in_ch,
            out_channels=shapes["final_layer.linear.weight"][0],
            vec_in_dim=shapes["vector_in.in_layer.weight"][1],
            context_in_dim=shapes["txt_in.weight"][1],
            hidden_size=hidden,
            mlp_ratio=mlp_ratio,
            num_heads=hidden // head_dim,
            depth=depth,
            depth_single_blocks=single,
            axes_dim=default_axes_dim(head_dim),
            qkv_bias=qkv_bias,
            guidance_embed="guidance_in.in_layer.weight" in shapes,
        )


def default_axes_dim(head_dim: int) -> tuple[int, int, int]:
    """Flux's RoPE split (16, 56, 56) for head dim 128, scaled for other head dims:
    1/8 of the head for the (unused) index axis, the rest split between rows and columns."""
    if head_dim == 128:
        return (16, 56, 56)
    first = max(2, (head_dim // 8) // 2 * 2)
    rest = head_dim - first
    row = rest // 2 // 2 * 2
    return (first, row, rest - row)


def _head_dim(shapes) -> int:
    for key in ("double_blocks.0.img_attn.norm.key_norm.scale",
                "single_blocks.0.norm.key_norm.scale"):
        if key in shapes:
            return shapes[key][0]
    raise CheckpointError("cannot find a qk-norm scale (double_blocks.0.img_attn.norm.key_norm.scale "
                          "or single_blocks.0.norm.key_norm.scale) to read the head size from: "
                          "the file has no transformer blocks or is not a Flux model")


def count_blocks(keys, prefix: str) -> int:
    """How many `<prefix>N.` blocks the keys hold, numbered 0..count-1; a CheckpointError
    naming the key for a block number that is not a number, and the gap for a missing one."""
    indices = set()
    for key in keys:
        if key.startswith(prefix):
            number = key[len(prefix):].split(".", 1)[0]
            if not (number.isascii() and number.isdigit()):
                raise CheckpointError(f"tensor {listed([key], width=200)[1:-1]} has block number "
                                      f"{listed([number])[1:-1]}, not a whole number: the file is "
                                      "damaged or not a Flux transformer")
            indices.add(int(number))
    last = max(indices, default=-1)
    if last + 1 != len(indices):
        gaps = (i for i in range(last + 1) if i not in indices)
        first_gaps = [next(gaps) for _ in range(min(5, last + 1 - len(indices)))]
        more = last + 1 - len(indices) - len(first_gaps)
        raise CheckpointError(f"{prefix}N blocks are not numbered 0..{last}: blocks {first_gaps}"
                              f"{f' and {more} more' if more else ''} are missing (truncated or "
                              "partial file?)")
    return len(indices)


def expected_shapes(p: FluxParams) -> dict[str, tuple[int, ...]]:
    """Every tensor of a Flux transformer in the BFL layout, with its shape."""
    h, m, hd = p.hidden_size, p.mlp_hidden_dim, p.head_dim
    shapes: dict[str, tuple[int, ...]] = {}

    def linear(name, out_f, in_f, bias=True):
        shapes[f"{name}.weight"] = (out_f, in_f)
        if bias:
            shapes[f"{name}.bias"] = (out_f,)

    linear("img_in", h, p.in_channels)
    linear("time_in.in_layer", h, 256)
    linear("time_in.out_layer", h, h)
    linear("vector_in.in_layer", h, p.vec_in_dim)
    linear("vector_in.out_layer", h, h)
    if p.guidance_embed:
        linear("guidance_in.in_layer", h, 256)
        linear("guidance_in.out_layer", h, h)
    linear("txt_in", h, p.context_in_dim)
    for i in range(p.depth):
        for s in ("img", "txt"):
            b = f"double_blocks.{i}.{s}"
            linear(f"{b}_mod.lin", 6 * h, h)
            linear(f"{b}_attn.qkv", 3 * h, h, p.qkv_bias)
            shapes[f"{b}_attn.norm.query_norm.scale"] = (hd,)
            shapes[f"{b}_attn.norm.key_norm.scale"] = (hd,)
            linear(f"{b}_attn.proj", h, h)
            linear(f"{b}_mlp.0", m, h)
            linear(f"{b}_mlp.2", h, m)
    for i in range(p.depth_single_blocks):
        b = f"single_blocks.{i}"
        linear(f"{b}.linear1", 3 * h + m, h)
        linear(f"{b}.linear2", h, h + m)
        shapes[f"{b}.norm.query_norm.scale"] = (hd,)
        shapes[f"{b}.norm.key_norm.scale"] = (hd,)
        linear(f"{b}.modulation.lin", 3 * h, h)
    linear("final_layer.linear", p.out_channels, h)
    linear("final_layer.adaLN_modulation.1", 2 * h, h)
    return shapes


def linear_modules(p: FluxParams) -> list[str]:
    """BFL names (no '.weight') of every Linear of the model, in model order."""
    return [k[:-len(".weight")] for k, shape in expected_shapes(p).items()
            if k.endswith(".weight") and len(shape) == 2]


# A Flux small enough for fast CPU tests; same structure as the real one.
TINY = FluxParams(in_channels=64, out_channels=64, vec_in_dim=32, context_in_dim=48,
                  hidden_size=64, mlp_ratio=4.0, num_heads=2, depth=2, depth_single_blocks=2,
                  axes_dim=(4, 14, 14))
