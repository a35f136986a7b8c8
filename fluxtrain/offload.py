"""Frozen base weights in host memory, brought into VRAM layer by layer.

For cards that cannot hold the 12 GB float8 base next to the activations. Every
FrozenLinear inside the transformer blocks gets its weight moved to pinned host
memory and a `weight_source` (this module) that hands the layer a fresh device
copy each time it computes: in forward, in the backward recompute of a
checkpointed block, and in backward itself (FrozenLinear never keeps a weight in
the autograd graph, so nothing pins VRAM between forward and backward). Biases,
norm scales, the edge layers, LoRA parameters, optimizer state and activations
stay in ordinary device memory.

Two backends, same contract (`fetch(layer) -> (fresh device weight, scale)`):

- **aimdo** (comfy-aimdo, when `control.init_device` says the device is usable):
  each weight gets a slice of a VBAR. `fault()` maps VRAM under it; while the
  signature is unchanged the bytes are still there and nothing moves, so the
  weights that fit stay resident across steps, and aimdo's driver hooks evict
  pages when torch needs the memory. A changed signature means the page was
  refilled with garbage: we copy from the pinned host copy. The layer gets a
  *clone* and the slice is unpinned at once: no tensor viewing VBAR memory
  outlives its unpin (autograd keeping one would be an illegal memory access).
  Weights whose fault finds no room are streamed like the fallback does.
- **pinned** (fallback: no CUDA, no aimdo, or `init_devices` failed; said once):
  copies from pinned host memory on a side stream, prefetching the next layers
  in the order they were used last step (forward, recompute and backward orders
  differ; the order is learnt during the first step and replayed after).

comfy-aimdo facts this follows (DESIGN.md): `control.init()` before importing its
other modules; `init()` returns True even without a GPU, so only
`init_device(idx)` returning True means usable; one small CUDA op before the
first fault; HostBuffer segfaults without CUDA, so it is never used here.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from .layers import FrozenLinear

log = logging.getLogger(__name__)

_aimdo_state: dict = {"tried": False, "ok": False, "reason": ""}
_said_fallback = False


def init_aimdo(device_index: int = 0) -> bool:
    """Initialise comfy-aimdo for one CUDA device; True only when it is usable.
    Safe to call repeatedly; call it early (before large CUDA allocations), as
    aimdo's driver hooks only see allocations made after they are installed."""
    st = _aimdo_state
    if st["tried"]:
        return st["ok"]
    st["tried"] = True
    try:
        from comfy_aimdo import control
    except ImportError as e:
        st["reason"] = f"comfy-aimdo is not installed ({e})"
        return False
    try:
        if control.devctxs:                    # the host program (ComfyUI) already did it
            st["ok"] = True
            return True
        if not control.init():
            st["reason"] = "comfy_aimdo.control.init() failed to load its library"
            return False
        if not torch.cuda.is_available() or getattr(torch.version, "hip", None):
            st["reason"] = "no CUDA device"
            return False
        _touch_device(device_index)                     # one small CUDA op first
        st["ok"] = bool(control.init_device(device_index))
        if not st["ok"]:
            st["reason"] = f"comfy_aimdo.control.init_device({device_index}) returned False"
    except Exception as e:  # a broken native library must not stop training
        st["ok"], st["reason"] = False, f"comfy-aimdo raised {type(e).__name__}: {e}"
    return st["ok"]


def _touch_device(device_index: int) -> None:
    torch.ones(1, device=f"cuda:{device_index}")


def choose_backend(device, prefer: str = "aimdo") -> tuple[str, str]:
    """("aimdo" | "pinned", why the fallback was taken or "")."""
    device = torch.device(device)
    if device.type != "cuda":
        return "pinned", f"the device is {device.type}, not CUDA"
    if prefer != "aimdo":
        return "pinned", "pinned streaming was asked for"
    if init_aimdo(device.index or 0):
        return "aimdo", ""
    return "pinned", _aimdo_state["reason"]


def aimdo_usable() -> bool:
    return _aimdo_state["ok"]


def _say_fallback(reason: str) -> None:
    global _said_fallback
    if not _said_fallback:
        _said_fallback = True
        log.warning("fluxtrain offload: comfy-aimdo unavailable (%s); streaming weights from "
                    "pinned host memory instead", reason)


def offload_targets(model: nn.Module) -> list[tuple[str, FrozenLinear]]:
    """The FrozenLinears whose weights are offloaded: every one inside a block."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, FrozenLinear) and (n.startswith("double_blocks.")
                                                 or n.startswith("single_blocks."))]


class _Entry:
    __slots__ = ("name", "host", "shape", "dtype", "nbytes", "alloc", "sig", "resident", "in_vbar")

    def __init__(self, name, host):
        self.name, self.host = name, host
        self.shape, self.dtype = tuple(host.shape), host.dtype
        self.nbytes = host.numel() * host.element_size()
        self.alloc, self.sig, self.resident = None, None, None
        self.in_vbar = False          # the last fault found room: no host copy needed


class Offloader:
    """The weight source of offloaded layers. Build it with `install()`."""

    def __init__(self, device, backend: str, prefetch_depth: int = 3):
        self.device = torch.device(device)
        self.backend = backend                    # "aimdo" | "pinned" | "resident"
        self.prefetch_depth = prefetch_depth
        self.entries: dict[int, _Entry] = {}
        self.vbar = None
        self.order: list[int] = []                # layer ids in last step's fetch order
        self.recording: list[int] = []
        self.pos = 0
        self.inflight: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.counters = dict(fetches=0, vbar_hits=0, vbar_refills=0, vbar_no_room=0,
                             streamed=0, streamed_bytes=0, prefetched=0, resident_hits=0)

    # ------------------------------------------------------------ contract with FrozenLinear
    @torch.compiler.disable
    def fetch(self, layer: FrozenLinear):
        key = id(layer)
        e = self.entries[key]
        self.counters["fetches"] += 1
        self._note_order(key)
        if e.resident is not None:                    # kept in ordinary VRAM by the plan
            self.counters["resident_hits"] += 1
            w = e.resident
        elif self.vbar is not None and e.alloc is not None:
            w = self._fetch_vbar(e)
        else:
            w = None
        if w is None:
            w = self._fetch_streamed(e, key)
        self._prefetch_ahead()
        return w, layer.weight_scale

    def _fetch_vbar(self, e: _Entry):
        from comfy_aimdo import model_vbar
        from comfy_aimdo.torch import aimdo_to_tensor

        sig = model_vbar.vbar_fault(e.alloc)
        e.in_vbar = sig is not None
        if sig is None:                               # no room / above the watermark
            self.counters["vbar_no_room"] += 1
            return None
        try:
            view = aimdo_to_tensor(e.alloc, self.device)[:e.nbytes].view(e.dtype).view(e.shape)
            if not model_vbar.vbar_signature_compare(sig, e.sig):
                view.copy_(e.host, non_blocking=True)     # page refilled: bytes are garbage
                e.sig = sig
                self.counters["vbar_refills"] += 1
            else:
                self.counters["vbar_hits"] += 1
            w = view.clone()                          # fresh tensor: nothing views VBAR memory
            del view
        finally:
            model_vbar.vbar_unpin(e.alloc)
        return w

    def _fetch_streamed(self, e: _Entry, key: int):
        got = self.inflight.pop(key, None)
        self.counters["streamed"] += 1
        self.counters["streamed_bytes"] += e.nbytes
        if got is not None:
            w, ready = got
            torch.cuda.current_stream(self.device).wait_event(ready)
            w.record_stream(torch.cuda.current_stream(self.device))
            self.counters["prefetched"] += 1
            return w
        return e.host.to(self.device, non_blocking=True)

    # ------------------------------------------------------------ prefetch in learnt order
    def _note_order(self, key: int) -> None:
        self.recording.append(key)
        self.pos += 1

    def step_begins(self) -> None:
        """Called at the start of each model forward: last step's order becomes the
        prediction for this one."""
        if self.recording:
            self.order = self.recording
        self.recording = []
        self.pos = 0
        self.inflight.clear()

    def _streams_from_host(self, key: int) -> bool:
        e = self.entries.get(key)
        if e is None or e.resident is not None:
            return False
        # VBAR-backed weights that found room last time do not need the copy engine.
        return not e.in_vbar

    def _prefetch_ahead(self) -> None:
        if self.side is None or not self.order:
            return
        n = len(self.order)
        for k in range(self.pos, min(self.pos + self.prefetch_depth, n)):
            key = self.order[k]
            if key in self.inflight or not self._streams_from_host(key):
                continue
            e = self.entries[key]
            with torch.cuda.stream(self.side):
                w = e.host.to(self.device, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self.side)
            self.inflight[key] = (w, ev)

    # ------------------------------------------------------------ bookkeeping
    def stats(self) -> dict:
        total = sum(e.nbytes for e in self.entries.values())
        resident = sum(e.nbytes for e in self.entries.values() if e.resident is not None)
        out = dict(backend=self.backend, layers=len(self.entries), offloaded_bytes=total,
                   resident_bytes=resident, **self.counters)
        if self.vbar is not None:
            out["vbar_loaded_bytes"] = int(self.vbar.loaded_size())
        if not aimdo_usable():
            out["aimdo_reason"] = _aimdo_state["reason"]
        return out

    def close(self) -> None:
        self.inflight.clear()
        if self.vbar is not None:
            self.vbar.close()
            self.vbar = None


def install(model: nn.Module, device, prefer: str = "aimdo", resident_bytes: int | None = None,
            prefetch_depth: int = 3) -> Offloader:
    """Offload the block weights of `model` to pinned host memory and move everything
    else to `device`. `prefer` "aimdo" uses comfy-aimdo when it initialises (else the
    pinned fallback, said once); "pinned" forces the fallback. `resident_bytes` keeps
    that many bytes of weights in ordinary VRAM (pinned backend) or caps the VBAR's
    resident set (aimdo backend); None lets aimdo use whatever VRAM is free."""
    device = torch.device(device)
    backend, reason = choose_backend(device, prefer)
    if backend != "aimdo" and prefer == "aimdo":
        _say_fallback(reason)
    off = Offloader(device, backend, prefetch_depth)
    targets = offload_targets(model)
    target_weights = {id(layer.weight) for _, layer in targets}
    # Everything that is not an offloaded weight goes to the device.
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) not in target_weights and p.device != device:
                p.data = p.data.to(device)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[bname] = b.to(device)
    pin = device.type == "cuda"
    budget = 0 if resident_bytes is None else int(resident_bytes)
    for name, layer in targets:
        w = layer.weight.data
        host = w.to("cpu") if w.device.type != "cpu" else w
        if pin and not host.is_pinned():
            host = host.pin_memory()
        e = _Entry(name, host)
        if backend == "pinned" and budget >= e.nbytes:
            e.resident = host.to(device)                  # kept in VRAM by the plan
            budget -= e.nbytes
        layer.weight.data = host
        layer.weight_source = off
        off.entries[id(layer)] = e
    total = sum(e.nbytes for e in off.entries.values())
    if backend == "aimdo":
        from comfy_aimdo import model_vbar
        off.vbar = model_vbar.ModelVBAR(total + (64 << 20), device.index or 0)
        for e in off.entries.values():
            e.alloc = off.vbar.alloc(e.nbytes)
        off.vbar.prioritize()
        if resident_bytes is not None:
            off.vbar.set_watermark_limit(max(0, int(resident_bytes)))
    model.register_forward_pre_hook(lambda mod, args: off.step_begins())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.info("fluxtrain offload: %d layers, %.1f GiB in host memory, backend %s", len(targets),
             total / 2**30, backend)
    return off

