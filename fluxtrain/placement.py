"""Where the base's weights live while training, decided from the free VRAM.

`load_base_for_training` is the one way the CLI, the node and the benchmark load a
base to train: it reads the checkpoint's shapes (headers only), plans the memory
mode (fluxtrain.memory), loads the weights straight to the GPU or to host memory
for offloading, and switches on float8 compute and compiled blocks when asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from . import fp8, memory, offload
from .checkpoint import CheckpointInfo, describe_checkpoint, load_flux
from .flux import Flux
from .train import MEMORY_MODES



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


def choose_plan(mode: str, params, free_bytes: int | None, *, img_tokens: int, txt_tokens: int,
                batch: int, rank: int, fp8_compute: bool, compiled: bool,
                weight_bytes: float) -> memory.Plan | None:
    """The memory plan for `mode`. Forced modes and a device without a free-memory
    figure (CPU) return a plan-less answer: None, and the caller applies the mode."""
    if mode not in MEMORY_MODES:
        raise ValueError(f"memory mode {mode!r} is not one of {', '.join(MEMORY_MODES)}")
    if free_bytes is None or mode in ("fast", "lean"):
        return None
    p = memory.plan(free_bytes, params, img_tokens, txt_tokens, batch, rank,
                    fp8_compute=fp8_compute, compiled=compiled, weight_bytes=weight_bytes)
    if mode == "offload" and not p.offload:        # offload asked for although it would fit
        e = memory.estimate(params, img_tokens, txt_tokens, batch, rank, resident_bytes=0,
                            weight_bytes=weight_bytes, fp8_compute=fp8_compute, compiled=compiled)
        p = memory.Plan(params.depth, params.depth_single_blocks, True, 0, int(e["total"]),
                        p.budget, e)
    return p


def load_base_for_training(path, config, dataset, device,
                           log: Callable[[str], None] = print) -> Placement:
    device = torch.device(device)
    info = describe_checkpoint(path, require_guidance=True)
    params = info.params
    free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    weight_bytes = torch.empty((), dtype=info.dtype).element_size()
    plan = choose_plan(config.memory, params, free, img_tokens=largest_image_tokens(dataset),
                       txt_tokens=dataset.text_length, batch=config.batch_size, rank=config.rank,
                       fp8_compute=config.fp8_compute, compiled=config.compile_blocks,
                       weight_bytes=weight_bytes)
    offloading = plan.offload if plan else config.memory == "offload"
    model, info = load_flux(path, device="cpu" if offloading else device, require_guidance=True)

    if plan is not None:
        model.set_checkpointing(plan.checkpoint_double, plan.checkpoint_single)
        description = f"memory auto: {plan.summary}"
    elif config.memory == "fast" or (config.memory == "auto" and free is None):
        model.set_checkpointing(0, 0)
        description = f"memory {config.memory}: no checkpointing"
    else:
        model.set_checkpointing(params.depth, params.depth_single_blocks)
        description = f"memory {config.memory}: every block checkpointed"

    offloader = None
    if offloading:
        resident = plan.resident_bytes if plan else 0
        offloader = offload.install(model, device, resident_bytes=resident)
        description += f", weights streamed from host memory ({offloader.backend})"
    if config.fp8_compute:
        layers = fp8.enable_fp8_compute(model, device)
        description += f", float8 matmuls in {layers} layers" if layers else ", float8 compute unavailable here"
    if config.compile_blocks and device.type == "cuda":
        from torch import _dynamo    # 57 blocks share one forward: let each keep its compiled graph
        _dynamo.config.cache_size_limit = max(64, _dynamo.config.cache_size_limit)
        for block in (*model.double_blocks, *model.single_blocks):
            block.compile()
        description += ", compiled blocks"
    log(f"[fluxtrain] {description}")
    return Placement(model, info, plan, description, offloader)
