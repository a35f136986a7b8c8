"""Automatic memory planning: how many blocks to recompute, whether to offload.

Users should not have to guess a block-swap number. Given the free VRAM and the
job (model shapes, resolution, batch, LoRA rank), `plan()` picks the fastest
configuration that fits, from an explicit model of where the bytes go:

    weights      frozen Linear weights at their stored size (float8: 1 byte each)
                 plus biases / norm scales, per block
    LoRA         float32 factors + gradients + AdamW's two moments (16 B/param)
    activations  per block, in units of one token row of the hidden state
                 (hidden_size * 2 bytes, bf16) times the block's tokens:
                 - a recomputed block keeps only its input: 1 unit
                   (a double block keeps image and text rows: 1 unit per token)
                 - a block kept for backward keeps UNITS[(compiled, fp8)] rows
                 - while one block is recomputed and differentiated, its full
                   activations plus the gradients in flight: TRANSIENT_UNITS more
    workspace    cast copies of the largest weight, attention and cuBLAS workspace,
                 allocator slack: a fixed part plus a share of the total

The unit counts were measured with autograd's saved-tensor hooks on fluxtrain's
own blocks (tests/test_memory.py measures them again, so a change to flux.py that
moves them fails a test instead of silently breaking the planner) and checked
against peak VRAM measured on an H100 (benchmarks/NOTES.md).

Order of preference: fewest recomputed blocks without offload (speed), then
every block recomputed, then offload with as many weights resident as fit.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .params import FluxParams

# Saved activations of a block kept for backward, in hidden-state rows (bf16) per
# token of the block, as autograd's saved-tensor hooks count them on fluxtrain.flux
# with a LoRA on every Linear (CPU; tests/test_memory.py re-measures these).
HOOK_DOUBLE_UNITS = 38.2
HOOK_SINGLE_UNITS = 31.3
# What an H100 actually keeps (peak allocated, fast minus lean, at 512^2 and 1024^2,
# benchmarks/results/2026-11-27-h100-*.json), split in the hook ratio. CUDA's flash
# attention saves less than the CPU kernels; compiled blocks let inductor choose
# what to save (float8 compiled saves the least).
# Compiled bf16 blocks save a shape-dependent amount (inductor's choice): measured
# at 1536 tokens (512^2) and 4608 tokens (1024^2), interpolated in between, the
# nearest measurement outside.
UNITS = {  # (compiled, fp8) -> {tokens: (double, single)}
    (False, False): {4608: (31.9, 26.1)},
    (False, True): {4608: (31.9, 26.1)},
    (True, False): {1536: (58.4, 47.9), 4608: (34.2, 28.0)},
    (True, True): {1536: (22.4, 18.3), 4608: (22.1, 18.1)},
}


def activation_units(compiled: bool, fp8_compute: bool, tokens: int) -> tuple[float, float]:
    """(double, single) saved rows per token of a block kept for backward."""
    table = sorted(UNITS[(bool(compiled), bool(fp8_compute))].items())
    if tokens <= table[0][0]:
        return table[0][1]
    for (t0, u0), (t1, u1) in zip(table, table[1:]):
        if tokens <= t1:
            f = (tokens - t0) / (t1 - t0)
            return tuple(a + f * (b - a) for a, b in zip(u0, u1))
    return table[-1][1]


# Lean mode beyond the saved block inputs: one block recomputed with its gradients in
# flight (measured: 90 rows per token in all, 57 of them the saved inputs).
TRANSIENT_UNITS = 33.0
# Caching-allocator slack between allocated and reserved, and a fixed reserve for
# cuBLAS / attention workspaces; applied to the budget check, not the prediction.
FRAGMENTATION = 0.06
FIXED_WORKSPACE = 0.5 * 2**30
# Share of the free VRAM a plan leaves for the process's other allocations.
HEADROOM = 0.04
# Offload: streamed weights kept in flight ahead of the block that runs (one double
# block of float8 Flux is 340 MB, ~6 ms on PCIe 5: more than its forward at 1024^2).
OFFLOAD_PREFETCH_BYTES = 512 << 20


class MemoryPlanError(RuntimeError):
    """The job cannot fit the free VRAM even with every block recomputed and offloaded."""


@dataclass
class Plan:
    recompute_double: int            # the first n double blocks are recomputed in backward
    recompute_single: int            # the first n single blocks are recomputed in backward
    offload: bool                     # frozen weights stream from host memory
    resident_bytes: int               # weights kept in VRAM when offloading (all when not)
    predicted_peak: int               # bytes torch will have allocated at the peak
    budget: int                       # bytes the plan was allowed to use
    breakdown: dict = field(default_factory=dict)

    @property
    def summary(self) -> str:
        gib = 2 ** 30
        off = (f", offload with {self.resident_bytes / gib:.1f} GiB of weights resident"
               if self.offload else ", no offload")
        return (f"recompute {self.recompute_double} double + {self.recompute_single} single "
                f"blocks{off}; predicted peak {self.predicted_peak / gib:.1f} GiB of "
                f"{self.budget / gib:.1f} GiB available")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["summary"] = self.summary
        return d


def _linear_bytes(k: int, n: int, weight_bytes: float, bias: bool = True) -> float:
    return k * n * weight_bytes + (2 * n if bias else 0)


def block_weight_bytes(p: FluxParams, weight_bytes: float = 1.0) -> tuple[float, float]:
    """Bytes of one double and one single block's weights (weight_bytes per element:
    1 for float8, 2 for bf16), biases and norm scales in bf16."""
    h, m, hd = p.hidden_size, p.mlp_hidden_dim, p.head_dim
    stream = (_linear_bytes(h, 6 * h, weight_bytes) + _linear_bytes(h, 3 * h, weight_bytes, p.qkv_bias)
              + _linear_bytes(h, h, weight_bytes) + _linear_bytes(h, m, weight_bytes)
              + _linear_bytes(m, h, weight_bytes) + 4 * hd)
    single = (_linear_bytes(h, 3 * h + m, weight_bytes) + _linear_bytes(h + m, h, weight_bytes)
              + _linear_bytes(h, 3 * h, weight_bytes) + 4 * hd)
    return 2 * stream, single


def edge_weight_bytes(p: FluxParams, weight_bytes: float = 1.0) -> float:
    """Weights outside the blocks: embedders, txt_in, final layer."""
    h = p.hidden_size
    n_emb = 3 if p.guidance_embed else 2
    return (_linear_bytes(p.in_channels, h, weight_bytes) + _linear_bytes(p.context_in_dim, h, weight_bytes)
            + (n_emb - 1) * _linear_bytes(256, h, weight_bytes) + _linear_bytes(p.vec_in_dim, h, weight_bytes)
            + n_emb * _linear_bytes(h, h, weight_bytes)
            + _linear_bytes(h, 2 * h, weight_bytes) + _linear_bytes(h, p.out_channels, weight_bytes))


def lora_params(p: FluxParams, rank: int) -> int:
    """LoRA parameters for the default 'all' target set (every Linear inside the blocks)."""
    h, m = p.hidden_size, p.mlp_hidden_dim
    stream = (h + 6 * h) + (h + 3 * h) + (h + h) + (h + m) + (m + h)
    single = (h + 3 * h + m) + (h + m + h) + (h + 3 * h)
    return rank * (2 * p.depth * stream + p.depth_single_blocks * single)


def largest_layer_bytes(p: FluxParams, weight_bytes: float = 1.0) -> float:
    h, m = p.hidden_size, p.mlp_hidden_dim
    return h * max(3 * h + m, 6 * h) * weight_bytes


@dataclass(frozen=True)
class Job:
    """One training job as the planner sees it: the model's shapes, the largest step's
    tokens, the batch and how many parameters train (LoRA factors, or any adapter's)."""
    params: FluxParams
    img_tokens: int                   # image tokens (2x2 patches) of the largest bucket
    txt_tokens: int = 512
    batch: int = 1
    trainable_params: int | None = None   # None: a rank-16 LoRA on every block Linear
    weight_bytes: float = 1.0         # bytes per stored weight (1 float8, 2 bf16)
    steps: int = 1000                 # optimizer steps still to train
    # What an adapter other than LoRA keeps for backward beyond a LoRA's (fluxtrain.adapters.
    # adapter_cost): hidden-state rows per token, and elements per block whatever the tokens,
    # each for (double, single) blocks.
    extra_units: tuple[float, float] = (0.0, 0.0)
    extra_block_elements: tuple[float, float] = (0.0, 0.0)

    @property
    def trainable(self) -> int:
        return lora_params(self.params, 16) if self.trainable_params is None else self.trainable_params


def estimate(job: Job, recompute_double: int | None = None, recompute_single: int | None = None,
             resident_bytes: float | None = None, fp8_compute: bool = False,
             compiled: bool = False) -> dict:
    """Predicted peak device bytes, by part: `total` what torch will have allocated
    (plus weights an aimdo VBAR holds, which torch does not count), `budget_total`
    that with allocator slack and workspace, as checked against free VRAM.
    Recompute counts default to all blocks; resident_bytes None = every weight
    resident (no offload)."""
    p, batch = job.params, job.batch
    tokens = job.img_tokens + job.txt_tokens
    double_units, single_units = activation_units(compiled, fp8_compute, tokens)
    double_units, single_units = double_units + job.extra_units[0], single_units + job.extra_units[1]
    cd = p.depth if recompute_double is None else recompute_double
    cs = p.depth_single_blocks if recompute_single is None else recompute_single
    row = p.hidden_size * 2 * batch            # one token of hidden state, bf16
    wd, ws = block_weight_bytes(p, job.weight_bytes)
    all_weights = p.depth * wd + p.depth_single_blocks * ws + edge_weight_bytes(p, job.weight_bytes)
    largest = largest_layer_bytes(p, job.weight_bytes)
    if resident_bytes is None:
        weights = all_weights
        streaming = 0.0
    else:
        weights = min(all_weights, resident_bytes)
        streaming = max(wd, ws) + OFFLOAD_PREFETCH_BYTES   # the staged block + prefetched
    lora = job.trainable * 16.0
    saved = row * tokens * (cd * 1 + cs * 1
                            + (p.depth - cd) * double_units
                            + (p.depth_single_blocks - cs) * single_units)
    saved += 2 * ((p.depth - cd) * job.extra_block_elements[0]
                  + (p.depth_single_blocks - cs) * job.extra_block_elements[1])
    transient = row * tokens * (TRANSIENT_UNITS + max(job.extra_units)) if cd + cs > 0 else 0.0
    # The bf16 cast of the largest weight (the float8 path: its transposed copy).
    cast = largest * (1 if fp8_compute else 2 / job.weight_bytes)
    total = weights + streaming + lora + saved + transient + cast
    budget_total = total * (1 + FRAGMENTATION) + FIXED_WORKSPACE
    return dict(weights=weights, all_weights=all_weights, streaming=streaming, lora=lora,
                saved_activations=saved, transient=transient, cast=cast, total=total,
                budget_total=budget_total)


def plan(free_bytes: int, job: Job, fp8_compute: bool = False, offload_available: bool = True,
         headroom: float = HEADROOM, compiled: bool = False) -> Plan:
    """The fastest configuration whose predicted peak fits `free_bytes` (less `headroom`,
    a share kept free for other allocations of the process)."""
    p = job.params
    budget = int(free_bytes * (1 - headroom))
    kw = dict(fp8_compute=fp8_compute, compiled=compiled)

    # 1. Everything resident: recompute as few blocks as fit, single blocks first
    #    (cheapest per block), then double blocks.
    def fits(cd: int, cs: int) -> bool:
        return estimate(job, cd, cs, **kw)["budget_total"] <= budget

    nd, ns = p.depth, p.depth_single_blocks
    if fits(nd, ns):
        cd, cs = nd, ns
        while cs > 0 and fits(cd, cs - 1):    # fewer recomputed single blocks
            cs -= 1
        while cs == 0 and cd > 0 and fits(cd - 1, 0):
            cd -= 1
        e = estimate(job, cd, cs, **kw)
        return Plan(cd, cs, False, int(e["all_weights"]), int(e["total"]), budget, e)

    # 2. Offload: every block recomputed, as many weights resident as fit.
    if not offload_available:
        e = estimate(job, **kw)
        raise MemoryPlanError(
            f"the model needs about {e['budget_total'] / 2**30:.1f} GiB with every block recomputed, "
            f"but only {budget / 2**30:.1f} GiB are free and offloading is off; turn offloading "
            "on, lower the resolution or the batch, or free VRAM")
    zero = estimate(job, resident_bytes=0, **kw)
    spare = (budget - zero["budget_total"]) / (1 + FRAGMENTATION)
    if spare < 0:
        raise MemoryPlanError(
            f"even with every block recomputed and every weight in host memory the step needs "
            f"about {zero['budget_total'] / 2**30:.1f} GiB, but only {budget / 2**30:.1f} GiB are free: "
            "lower the resolution, the batch or the LoRA rank, or free VRAM")
    resident = int(min(spare, zero["all_weights"]))
    e = estimate(job, resident_bytes=resident, **kw)
    return Plan(nd, ns, True, resident, int(e["total"]), budget, e)
