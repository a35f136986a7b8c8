"""Where the base's weights live while training, decided from the free VRAM.

`load_base_for_training` is the one way the CLI, the node and the benchmark load a
base to train: it reads the checkpoint's shapes (headers only), plans the memory
mode (fluxtrain.memory), loads the weights straight to the GPU or to host memory
for offloading, and switches on float8 compute and compiled blocks when asked.

The base is a checkpoint path, or a `BaseTensors`: a BFL state dict already in memory
(the weights of a MODEL ComfyUI loaded). The Flux built from it references those
tensors (no copy); planning, float8 compute and compiled blocks are the same path.
Weight streaming (offload) is refused for it: the tensors belong to their owner, so
streaming would add a host copy while the owner's copy stays where it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

import torch

from . import fp8, memory, offload
from .adapters import AdapterCost, adapter_cost
from .checkpoint import (CheckpointInfo, describe_checkpoint, describe_state_dict,
                         flux_from_state_dict, load_flux, stored_bytes)
from .flux import Flux
from .train import MEMORY_MODES


@dataclass
class BaseTensors:
    """A training base already in memory: {BFL key: tensor} whose tensors are shared
    with their owner (never modified here), plus scaled-fp8 scales {BFL layer: scale}."""
    name: str
    state_dict: Mapping[str, torch.Tensor]
    weight_scales: dict[str, torch.Tensor] = field(default_factory=dict)


class SharedOffloadError(ValueError):
    """Weight streaming was asked for (or planned) on a base whose tensors are shared."""


@dataclass
class Placement:
    model: Flux
    info: CheckpointInfo
    plan: memory.Plan | None      # None when the mode was forced or the device is not CUDA
    description: str
    offloader: offload.Offloader | None = None

    def release(self) -> None:
        """Drop the offload machinery (pinned buffers, VBAR) with the model."""
        if self.offloader is not None:
            self.offloader.close()
            self.offloader = None


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


def choose_plan(mode: str, params, free_bytes: int | None, *, img_tokens: int, txt_tokens: int,
                batch: int, rank: int, fp8_compute: bool, compiled: bool,
                weight_bytes: float, offload_available: bool = True,
                adapter: AdapterCost | None = None) -> memory.Plan | None:
    """The memory plan for `mode`. Forced modes and a device without a free-memory
    figure (CPU) return a plan-less answer: None, and the caller applies the mode."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")
    if free_bytes is None or mode in ("fast", "lean"):
        return None
    p = memory.plan(free_bytes, params, img_tokens, txt_tokens, batch, rank,
                    fp8_compute=fp8_compute, compiled=compiled, weight_bytes=weight_bytes,
                    offload_available=offload_available, adapter=adapter)
    if mode == "offload" and not p.offload:        # offload asked for although it would fit
        e = memory.estimate(params, img_tokens, txt_tokens, batch, rank, resident_bytes=0,
                            weight_bytes=weight_bytes, fp8_compute=fp8_compute, compiled=compiled,
                            adapter=adapter)
        p = memory.Plan(params.depth, params.depth_single_blocks, True, 0, int(e["total"]),
                        p.budget, e)
    return p


def load_base_for_training(source, config, dataset, device,
                           log: Callable[[str], None] = print) -> Placement:
    """Load the base to train: `source` is a checkpoint path or a BaseTensors."""
    device = torch.device(device)
    shared = isinstance(source, BaseTensors)
    if shared:
        info = describe_state_dict(source.state_dict, source.name, require_guidance=True)
        info.weight_scales = dict(source.weight_scales)
    else:
        info = describe_checkpoint(source, require_guidance=True)
    params = info.params
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    if shared and free is not None:   # weights already resident count as room for the weights
        free += sum(t.numel() * t.element_size() for t in source.state_dict.values()
                    if _on(t, device))
    weight_bytes = torch.empty((), dtype=info.dtype).element_size()
    tokens = largest_image_tokens(dataset)
    adapter = adapter_cost(config.adapter_config(), params)
    if shared and config.memory == "offload":
        raise SharedOffloadError(_no_shared_offload(source.name, "memory 'offload' was chosen"))
    try:
        plan = choose_plan(config.memory, params, free, img_tokens=tokens,
                           txt_tokens=dataset.text_length, batch=config.batch_size,
                           rank=config.rank, fp8_compute=config.fp8_compute,
                           compiled=config.compile_blocks, weight_bytes=weight_bytes,
                           offload_available=not shared, adapter=adapter)
    except memory.MemoryPlanError as e:
        if not shared:
            raise
        raise SharedOffloadError(_no_shared_offload(
            source.name, f"training does not fit in VRAM without weight streaming ({e})")) from e
    offloading = plan.offload if plan else config.memory == "offload"
    if shared:
        copied = sum(t.numel() * t.element_size() for t in source.state_dict.values()
                     if not _on(t, device))
        if copied:
            log(f"[fluxtrain] {copied / 2**20:.0f} MiB of {source.name}'s weights are not on "
                f"{device} and are copied there for training")
        model = flux_from_state_dict(source.state_dict, params, info.weight_scales, device)
    else:
        model, info = load_flux(source, device="cpu" if offloading else device,
                                require_guidance=True)

    if plan is not None:
        model.set_checkpointing(plan.checkpoint_double, plan.checkpoint_single)
        description = f"memory auto: {plan.summary}"
    elif config.memory == "fast" or (config.memory == "auto" and free is None):
        model.set_checkpointing(0, 0)
        description = f"memory {config.memory}: no checkpointing"
    else:
        model.set_checkpointing(params.depth, params.depth_single_blocks)
        description = f"memory {config.memory}: every block checkpointed"

    if shared:
        description += f", weights shared with {source.name} (not copied)"
    offloader = None
    if offloading:
        resident = plan.resident_bytes if plan else 0
        offloader = offload.install(model, device, resident_bytes=resident,
                                    sources=stored_bytes(source))
        host = offloader.arena
        description += (f", weights streamed from {host.nbytes / 2**30:.1f} GiB of "
                        f"{'page-locked' if host.pinned else 'pageable'} host memory ({offloader.backend})")
    if config.fp8_compute:
        keep = not offloading and room_for_transposed_weights(free, memory.estimate(
            params, tokens, dataset.text_length, config.batch_size, config.rank,
            checkpoint_double=model.checkpointed_double, checkpoint_single=model.checkpointed_single,
            weight_bytes=weight_bytes, fp8_compute=True, compiled=config.compile_blocks,
            adapter=adapter))
        layers = fp8.enable_fp8_compute(model, device, keep_transposed=keep)
        description += (f", float8 matmuls in {layers} layers" + (" (transposed weights kept)" if keep else "")
                        if layers else ", float8 compute unavailable here")
        if layers and not config.compile_blocks:
            log("[fluxtrain] warning: fp8_compute without compile_blocks is slower than the bf16 "
                "path (its quantisation runs as separate kernels; H200, 1024x1024 lean: 0.99 s "
                "against 0.89 s per step). Turn compile_blocks on to make float8 pay (0.44 s).")
    if config.compile_blocks and device.type == "cuda":
        compile_blocks(model)
        description += ", compiled blocks"
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
