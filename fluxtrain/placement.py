"""Where the base's weights live and how its steps run, decided once per run.

Two halves, so that the node, the CLI and the benchmarks all run the same decisions:

- `plan_placement(job, config, device)` is pure: from the job (shapes, tokens, batch,
  trainable parameters, steps to go) and what the device offers (free VRAM, float8
  tensor cores, Triton) it decides which blocks to recompute, whether to stream
  weights from host memory and how many to keep resident, and which speed-ups pay:
  float8 matmuls, compiled blocks, CUDA graphs. Each decision carries its reason, and
  the plan's `summary` says them on one line.
- `apply_placement(model, plan, device)` applies a plan in one fixed order:
  recompute, offload, float8, compile.

`load_base_for_training` reads the base's shapes (headers only), plans, loads the
weights straight to where the plan puts them and applies the plan.

The base is a checkpoint path, or a `BaseTensors`: a BFL state dict already in memory
(the weights of a MODEL ComfyUI loaded). The Flux built from it references those
tensors (no copy); planning, float8 compute and compiled blocks are the same path.
Weight streaming (offload) is refused for it: the tensors belong to their owner, so
streaming would add a host copy while the owner's copy stays where it is.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import fp8, memory, offload
from .checkpoint import (CheckpointInfo, describe_checkpoint, describe_state_dict,
                         flux_from_state_dict, load_flux, stored_bytes)
from .flux import Flux
from .layers import enable_fp8_compute
from .adapters import adapter_cost
from .train import MEMORY_MODES

# Compiling the blocks takes about a minute on the first run (seconds once torch's
# compile cache holds them) and saves ~40% of every step (H200, 1024²: 0.61 -> 0.37 s);
# below this many steps to go it does not pay back on a cold cache.
COMPILE_MIN_STEPS = 100
# Float8 matmuls: the recipe's loss curve was validated on Hopper (benchmarks/NOTES.md);
# Ada (8.9) has float8 tensor cores too, but nothing was measured there yet.
FP8_VALIDATED_CAPABILITY = (9, 0)


@dataclass
class BaseTensors:
    """A training base already in memory: {BFL key: tensor} whose tensors are shared
    with their owner (never modified here), plus scaled-fp8 scales {BFL layer: scale}."""
    name: str
    state_dict: Mapping[str, torch.Tensor]
    weight_scales: dict[str, torch.Tensor] = field(default_factory=dict)


class SharedOffloadError(ValueError):
    """Weight streaming was asked for (or planned) on a base whose tensors are shared."""


@dataclass(frozen=True)
class DeviceInfo:
    """What the training device offers, probed once (plain data, so plans are testable)."""
    type: str                             # "cuda" or "cpu"
    free_bytes: int | None = None         # free VRAM (None off CUDA: nothing to plan)
    capability: tuple[int, int] | None = None
    float8_cores: bool = False            # torch._scaled_mm runs on float8 tensor cores
    triton: bool = False
    name: str = "cpu"

    @classmethod
    def probe(cls, device) -> "DeviceInfo":
        device = torch.device(device)
        if device.type != "cuda":
            return cls(device.type, name=device.type)
        index = device.index if device.index is not None else torch.cuda.current_device()
        return cls("cuda", torch.cuda.mem_get_info(index)[0],
                   tuple(torch.cuda.get_device_capability(index)), fp8.supports_fp8_matmul(device),
                   importlib.util.find_spec("triton") is not None,
                   torch.cuda.get_device_name(index))

    @property
    def float8(self) -> bool:
        """Float8 tensor cores on a card where the recipe was validated."""
        return (self.float8_cores and self.capability is not None
                and tuple(self.capability) >= FP8_VALIDATED_CAPABILITY)


@dataclass(frozen=True)
class PlacementPlan:
    recompute_double: int                 # the first n double blocks recompute in backward
    recompute_single: int
    offload: bool                         # some block weights stream from host memory
    resident_bytes: int | None            # offload: block weights kept in VRAM (None: aimdo decides)
    fp8_compute: bool
    fp8_keep_transposed: bool             # a column-major float8 copy for the input-gradient
    compile_blocks: bool
    cuda_graphs: bool                     # the step may be captured (train() still checks)
    memory: memory.Plan | None = None     # the planner's numbers (auto and offload modes)
    reasons: tuple[str, ...] = ()         # why each speed-up is on or off, for the console
    fp8_recipe: fp8.Fp8Recipe = fp8.Fp8Recipe()
    offload_backend: str = "aimdo"        # "aimdo", or "pinned" (the fallback, forced)

    @property
    def summary(self) -> str:
        if self.memory is not None:
            where = self.memory.summary
        elif self.recompute_double + self.recompute_single == 0:
            where = "no recompute"
        else:
            where = f"recompute {self.recompute_double} double + {self.recompute_single} single blocks"
        return f"{where}; {'; '.join(self.reasons)}"


def job_for(params, config, dataset, weight_bytes: float, steps_left: int | None = None) -> memory.Job:
    """The planner's view of a training run on `dataset` with `config`."""
    cost = adapter_cost(config.adapter_config(), params)
    return memory.Job(params, largest_image_tokens(dataset), dataset.text_length, config.batch_size,
                      cost.parameters, weight_bytes, config.steps if steps_left is None else steps_left,
                      cost.extra_units, cost.extra_block_elements)


def largest_image_tokens(dataset) -> int:
    """Image tokens (2x2 patches) of the largest bucket: the step that needs most memory."""
    return max(h * w // 4 for h, w in (s.bucket for s in dataset.samples))


def room_for_transposed_weights(free_bytes: int | None, estimate: dict,
                                headroom: float = memory.HEADROOM) -> bool:
    """Whether a second, column-major copy of the float8 weights (what the float8
    input-gradient reads; ~12 GB for Flux, 10-14% faster steps) fits beside the
    step's predicted peak."""
    if free_bytes is None:
        return False
    return estimate["budget_total"] + estimate["all_weights"] <= free_bytes * (1 - headroom)


def _speed_choices(job: memory.Job, config, device: DeviceInfo) -> tuple[bool, bool, list[str]]:
    """(compile, float8, reasons) for the switches the config leaves on."""
    reasons = []
    compiled = False
    if not config.compile_blocks:
        reasons.append("compiled blocks off (switched off)")
    elif device.type != "cuda":
        reasons.append(f"compiled blocks off (needs a CUDA device, this is {device.type})")
    elif not device.triton:
        reasons.append("compiled blocks off (Triton is not installed)")
    elif job.steps < COMPILE_MIN_STEPS:
        reasons.append(f"compiled blocks off (only {job.steps} steps to go: compiling would "
                       f"take longer than it saves below {COMPILE_MIN_STEPS})")
    else:
        compiled = True
        reasons.append("compiled blocks on (cached after the first compile)")
    float8 = False
    if not config.fp8_compute:
        reasons.append("float8 off (switched off)")
    elif not device.float8:
        reasons.append("float8 off (needs float8 tensor cores of a Hopper-class GPU, "
                       f"{device.name} has none validated)")
    elif not compiled:
        reasons.append("float8 off (pays only with compiled blocks)")
    else:
        float8 = True
    return compiled, float8, reasons


def plan_placement(job: memory.Job, config, device: DeviceInfo, *,
                   shared: str | None = None) -> PlacementPlan:
    """Decide recompute, offload and speed-ups for `job` on `device` (pure). `config`
    is a TrainConfig (memory, fp8_compute, compile_blocks, cuda_graphs, dropout);
    `shared` names the owner of a base whose tensors are shared (never offloaded)."""
    mode = config.memory
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")
    if shared and mode == "offload":
        raise SharedOffloadError(_no_shared_offload(shared, "memory 'offload' was chosen"))
    compiled, float8, reasons = _speed_choices(job, config, device)
    p = job.params
    free = device.free_bytes
    mem = None
    if mode == "fast" or (mode == "auto" and free is None):
        recompute = (0, 0)
    elif mode == "lean" or free is None:
        recompute = (p.depth, p.depth_single_blocks)
    else:
        try:
            mem = memory.plan(free, job, fp8_compute=float8, compiled=compiled,
                              offload_available=shared is None)
        except memory.MemoryPlanError as e:
            if not shared:
                raise
            raise SharedOffloadError(_no_shared_offload(
                shared, f"training does not fit in VRAM without weight streaming ({e})")) from e
        if mode == "offload" and not mem.offload:    # asked for although it would fit
            e = memory.estimate(job, resident_bytes=0, fp8_compute=float8, compiled=compiled)
            mem = memory.Plan(p.depth, p.depth_single_blocks, True, 0, int(e["total"]), mem.budget, e)
        recompute = (mem.recompute_double, mem.recompute_single)
    offloading = mem.offload if mem is not None else mode == "offload"
    resident = mem.resident_bytes if mem is not None and offloading else (0 if offloading else None)

    keep_transposed = float8 and not offloading and room_for_transposed_weights(free, memory.estimate(
        job, *recompute, fp8_compute=True, compiled=compiled))
    if float8:
        reasons.append("float8 on" + (" (transposed weights kept)" if keep_transposed else ""))
    graphs = False
    if not config.cuda_graphs:
        reasons.append("CUDA graphs off (switched off)")
    elif device.type != "cuda":
        reasons.append("CUDA graphs off (needs a CUDA device)")
    elif offloading:
        reasons.append("CUDA graphs off (weights stream from host memory)")
    elif config.dropout:
        reasons.append("CUDA graphs off (LoRA dropout draws a new mask every step)")
    else:
        graphs = True
        reasons.append("CUDA graphs on")
    return PlacementPlan(recompute[0], recompute[1], offloading, resident, float8, keep_transposed,
                         compiled, graphs, mem, tuple(reasons))


@dataclass
class Placement:
    model: Flux
    info: CheckpointInfo
    plan: PlacementPlan
    description: str
    offloader: offload.Offloader | None = None

    def release(self) -> None:
        """Drop the offload machinery (pinned buffers, VBAR) with the model."""
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None


def apply_placement(model: Flux, plan: PlacementPlan, device, *,
                    sources: Mapping | None = None) -> offload.Offloader | None:
    """Apply `plan` to `model` in the one order every caller uses: recompute, offload
    (the model's weights on the host; `sources` reads them from the file), float8,
    compile. Returns the offloader when weights stream."""
    device = torch.device(device)
    model.set_recompute(plan.recompute_double, plan.recompute_single)
    offloader = None
    if plan.offload:
        offloader = offload.install(model, device, prefer=plan.offload_backend,
                                    resident_bytes=plan.resident_bytes, sources=sources)
    if plan.fp8_compute:
        enable_fp8_compute(model, device, keep_transposed=plan.fp8_keep_transposed,
                           recipe=plan.fp8_recipe)
    if plan.compile_blocks and device.type == "cuda":
        compile_blocks(model)
    return offloader


def load_base_for_training(source, config, dataset, device, log: Callable[[str], None] = print,
                           steps_left: int | None = None) -> Placement:
    """Load the base to train (`source`: a checkpoint path or a BaseTensors), planned for
    `config` over `dataset` with `steps_left` steps to go (default: all of them)."""
    device = torch.device(device)
    shared = isinstance(source, BaseTensors)
    if shared:
        info = describe_state_dict(source.state_dict, source.name, require_guidance=True)
        info.weight_scales = dict(source.weight_scales)
    else:
        info = describe_checkpoint(source, require_guidance=True)
    probed = DeviceInfo.probe(device)
    if shared and probed.free_bytes is not None:  # weights already resident count as room
        probed = dataclasses.replace(probed, free_bytes=probed.free_bytes + sum(
            t.numel() * t.element_size() for t in source.state_dict.values() if _on(t, device)))
    weight_bytes = torch.empty((), dtype=info.dtype).element_size()
    job = job_for(info.params, config, dataset, weight_bytes, steps_left)
    plan = plan_placement(job, config, probed, shared=source.name if shared else None)
    if shared:
        copied = sum(t.numel() * t.element_size() for t in source.state_dict.values()
                     if not _on(t, device))
        if copied:
            log(f"[fluxtrain] {copied / 2**20:.0f} MiB of {source.name}'s weights are not on "
                f"{device} and are copied there for training")
        model = flux_from_state_dict(source.state_dict, info.params, info.weight_scales, device)
    else:
        model, info = load_flux(source, device="cpu" if plan.offload else device,
                                require_guidance=True)
    offloader = apply_placement(model, plan, device,
                                sources=None if shared or not plan.offload else stored_bytes(source))
    description = f"memory {config.memory}: {plan.summary}"
    if shared:
        description += f"; weights shared with {source.name} (not copied)"
    if offloader is not None:
        host = offloader.arena
        description += (f"; {len(offloader.block_layers)} of {len(model.blocks())} blocks stream "
                        f"from {host.nbytes / 2**30:.1f} GiB of "
                        f"{'page-locked' if host.pinned else 'pageable'} host memory ({offloader.backend})")
    log(f"[fluxtrain] {description}")
    return Placement(model, info, plan, description, offloader)


def compile_blocks(model: Flux, backend: str = "inductor", dynamic: bool | None = None) -> None:
    """torch.compile every transformer block (the edge layers stay eager). Offloaded
    blocks compile the same way: their weights are staged by hooks before the block
    runs, so inside the compiled graph they are plain tensor inputs. `dynamic` as in
    torch.compile: None compiles the first token count statically and recompiles once
    with dynamic shapes when a second one comes; False compiles each token count
    (bucket) statically."""
    from torch import _dynamo
    # 57 blocks run one of two forwards, once per bucket shape: room for all their cache
    # entries (the limit's name differs between torch versions)
    for key in ("cache_size_limit", "recompile_limit"):
        if hasattr(_dynamo.config, key):
            setattr(_dynamo.config, key, max(64, getattr(_dynamo.config, key)))
    for block in model.blocks():
        block.compile(backend=backend, dynamic=dynamic)


def _no_shared_offload(name: str, why: str) -> str:
    return (f"{why}, but the weights of {name} are shared with the model that holds them "
            "(a MODEL input): streaming them from host memory would need a second copy in "
            "host memory while the model's own copy stays where it is, so it is not done. "
            "Use memory 'fast' or 'lean', or load the base from its file with Load Training "
            "Base, which streams from the file.")


def _on(t: torch.Tensor, device: torch.device) -> bool:
    """True when `t` sits on `device` ("cuda" matches any index, "cuda:1" only itself)."""
    return t.device.type == device.type and device.index in (None, t.device.index)
