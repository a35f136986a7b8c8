"""Frozen base weights in host memory, brought into VRAM block by block.

For cards that cannot hold the 12 GB float8 base next to the activations. Every
FrozenLinear inside the transformer blocks gets its weight moved to one page-locked
host buffer (`HostArena`), read there straight from the checkpoint file when the
model came from one. Around each run of a block (its forward, and its recompute in backward:
offloading needs every block recomputed) a forward pre-hook stages a fresh device
copy of each of its weights in `layer.streamed.staged`, and the forward hook drops
those references again. Backward uses the weights saved by the recompute, so each
weight is brought in twice per step, and only one block's weights are held while
that block is differentiated. Staging happens outside the layers' arithmetic: in
compiled blocks the weight is a plain tensor input, not a graph break per layer.
Biases, norm scales, the edge layers, LoRA parameters, optimizer state and
activations stay in ordinary device memory.

Two backends, same contract (`_fetch(layer) -> the weight on the device`):

- **aimdo** (comfy-aimdo, when `control.init_device` says the device is usable):
  each weight gets a slice of a VBAR. `fault()` maps VRAM under it; while the
  signature is unchanged the bytes are still there and nothing moves, so the
  weights that fit stay resident across steps, and aimdo's driver hooks evict
  pages when torch needs the memory. A changed signature means the page was
  refilled with garbage: we copy from the host copy. The layer gets a
  *clone* and the slice is unpinned at once: no tensor viewing VBAR memory
  outlives its unpin (autograd keeping one would be an illegal memory access).
  Weights whose fault finds no room are streamed like the fallback does.
- **pinned** (fallback: no CUDA, no aimdo, or `init_devices` failed; said once):
  copies from the page-locked host buffer.

Streamed weights are prefetched on a side stream, in the order they were staged
last step (forward, then recompute in reverse; learnt during the first step), up to
`prefetch_bytes` ahead and across the end of the step into the next one, so the copy
engine works while the previous blocks compute.

comfy-aimdo facts this follows (DESIGN.md): `control.init()` before importing its
other modules; `init()` returns True even without a GPU, so only
`init_device(idx)` returning True means usable; one small CUDA op before the
first fault; HostBuffer segfaults without CUDA, so it is never used here.
"""

from __future__ import annotations

import logging
import math
import sys
import weakref
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from .checkpoint import TensorMeta, read_into
from .layers import FrozenLinear, Streamed
from .memory import OFFLOAD_PREFETCH_BYTES as PREFETCH_BYTES

log = logging.getLogger(__name__)

_aimdo_state: dict = {"tried": False, "ok": False, "reason": ""}
_said_fallback = False
HOST_ALIGN = 4096             # each weight starts on its own page: clean DMA, no shared pages


class HostMemoryError(RuntimeError):
    """The machine has not enough free host memory for the offloaded weights."""


def available_host_bytes(proc: str = "/proc", cgroup_root: str = "/sys/fs/cgroup") -> int | None:
    """Host memory this process can still take: MemAvailable (free memory plus reclaimable
    page cache), or less where a memory cgroup limits the process (a container with a
    memory limit, where going over means the OOM killer, not swapping). None where
    neither is known (not Linux), and then nothing is checked."""
    known = [b for b in (_meminfo_available(Path(proc) / "meminfo"),
                         _cgroup_room(Path(proc) / "self" / "cgroup", Path(cgroup_root)))
             if b is not None]
    return min(known) if known else None


def _meminfo_available(meminfo: Path) -> int | None:
    try:
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


# (limit file, usage file, memory.stat key of page cache the kernel can reclaim)
_CGROUP_V2 = ("memory.max", "memory.current", "inactive_file")
_CGROUP_V1 = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")


def _cgroup_room(self_cgroup: Path, root: Path) -> int | None:
    """Bytes left under the memory limit of this process's cgroup (v2 or v1), None when
    it has no limit or none can be read. The cgroup is looked up where /proc/self/cgroup
    says, then at the mount's root (how a container usually sees its own)."""
    try:
        lines = self_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    places = []
    for line in lines:
        if line.count(":") < 2:
            continue
        _, controllers, path = line.split(":", 2)
        if controllers == "":
            places.append((root / path.lstrip("/"), _CGROUP_V2))
        elif "memory" in controllers.split(","):
            places.append((root / "memory" / path.lstrip("/"), _CGROUP_V1))
    places += [(root, _CGROUP_V2), (root / "memory", _CGROUP_V1)]
    for folder, (limit_file, usage_file, cache_key) in places:
        try:
            limit = (folder / limit_file).read_text().strip()
            usage = int((folder / usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 1 << 60:       # v1 writes "no limit" as ~2**63
            return None
        cache = 0
        try:
            for line in (folder / "memory.stat").read_text().splitlines():
                key, _, value = line.partition(" ")
                if key == cache_key:
                    cache = int(value)
        except (OSError, ValueError):
            pass
        return max(0, int(limit) - usage + cache)
    return None


class HostArena:
    """Host memory for the offloaded weights: one buffer, each weight at its exact size
    (page-aligned), page-locked in place with cudaHostRegister when the weights stream to
    a CUDA device, so copies from it are asynchronous DMA.

    Why not `tensor.pin_memory()` per weight: torch's pinned allocator rounds every block
    up to a power of two (Flux's 11.9 GB of block weights took 18.5 GB of page-locked
    memory that way), and pinning a copy of a memory-mapped tensor also holds the file's
    pages while it copies. Page-locking can fail (a limit of the OS or the driver); the
    weights then stay in pageable memory, which streams several times slower, and a
    warning says so."""

    def __init__(self, layout: Sequence[tuple[tuple[int, ...], torch.dtype]], freed_bytes: int = 0):
        """`layout`: (shape, dtype) of each weight, in order. `freed_bytes`: host memory
        that the weights being copied in free as they go (they count as available)."""
        offsets, total = [], 0
        for shape, dtype in layout:
            offsets.append(total)
            nbytes = dtype.itemsize * math.prod(shape)
            total += -(-nbytes // HOST_ALIGN) * HOST_ALIGN
        available = available_host_bytes()
        if available is not None and total > available + freed_bytes:
            raise HostMemoryError(
                f"offloading keeps the base's block weights in host memory: {total / 2**30:.1f} "
                f"GiB are needed, {(available + freed_bytes) / 2**30:.1f} GiB are available (free "
                "memory, or what a container's memory limit leaves). Close other programs "
                "(ComfyUI's own models count too), give the container more memory, or train "
                "without offloading (memory 'lean' needs about 15 GiB of VRAM at 1024x1024).")
        # Page-aligned start: one spare page, the buffer begins at the first boundary.
        raw = torch.empty(total + HOST_ALIGN, dtype=torch.uint8)
        skip = -raw.data_ptr() % HOST_ALIGN
        self.buffer = raw[skip:skip + total]
        self.nbytes = total
        self.tensors = [self.buffer[o:o + dtype.itemsize * math.prod(shape)].view(dtype).view(shape)
                        for o, (shape, dtype) in zip(offsets, layout)]
        self.pin_error = ""
        self._unpin = None              # the finalizer that unlocks the buffer, while locked

    @property
    def pinned(self) -> bool:
        return self._unpin is not None

    def pin(self) -> bool:
        """Page-lock the buffer in place. Call it once the weights are in: locking makes
        every page resident at once, and the weights being copied in may still hold as
        much memory again until each is freed."""
        if self.pinned or not self.nbytes:
            return self.pinned
        self.pin_error = _host_register(self.buffer)
        if not self.pin_error:
            self._unpin = weakref.finalize(self, _host_unregister, self.buffer.data_ptr())
        else:
            log.warning("fluxtrain offload: could not page-lock %.1f GiB of host memory (%s); "
                        "weights stream from pageable memory, several times slower",
                        self.nbytes / 2**30, self.pin_error)
        return self.pinned

    def release(self) -> None:
        """Undo the page-locking (the memory itself goes with the last tensor using it)."""
        if self._unpin is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()      # no copy from it may still be in flight
            self._unpin()
            self._unpin = None


def _cudart():
    return torch.cuda.cudart()


# Page-locked for every CUDA context, not only the current device's (training on cuda:1).
_HOST_REGISTER_PORTABLE = 1


def _host_register(buffer: torch.Tensor) -> str:
    """Page-lock `buffer` in place; "" on success, else why not."""
    try:
        err = _cudart().cudaHostRegister(buffer.data_ptr(), buffer.numel(), _HOST_REGISTER_PORTABLE)
        code = int(getattr(err, "value", err))
    except Exception as e:  # no CUDA runtime, a driver refusing
        return f"{type(e).__name__}: {e}"
    if code == 0:
        return ""
    _clear_cuda_error()
    return f"cudaHostRegister returned CUDA error {code}"


def _host_unregister(ptr: int) -> None:
    try:
        _cudart().cudaHostUnregister(ptr)
    except Exception:  # interpreter shutdown, CUDA already torn down
        if not sys.is_finalizing():
            raise


def _clear_cuda_error() -> None:
    # A failed cudaHostRegister can leave its error queued, and torch would then report
    # it from an unrelated kernel: take it off with one small synchronised op.
    try:
        torch.ones(1, device="cuda").add_(1)
        torch.cuda.synchronize()
    except Exception:
        pass


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


def offload_targets(model: nn.Module, keep: Sequence[int] = ()) -> list[tuple[str, FrozenLinear]]:
    """The FrozenLinears of the transformer blocks, except those of the blocks numbered
    in `keep` (indices into model.blocks()), whose weights stay in VRAM."""
    kept = {id(m) for i, block in enumerate(model.blocks()) if i in set(keep) for m in block.modules()}
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, FrozenLinear) and id(m) not in kept
            and (n.startswith("double_blocks.") or n.startswith("single_blocks."))]


def resident_blocks(block_bytes: Sequence[int], budget: int) -> list[int]:
    """Which blocks keep their weights in VRAM when only `budget` bytes of them fit: as
    many bytes as fit, and the streamed blocks spread evenly over the step, so that each
    one's copy overlaps the compute of the resident blocks before it (streaming a run
    of neighbours would leave the copy engine, then the GPU, waiting in turn)."""
    total = sum(block_bytes)
    if budget >= total:
        return list(range(len(block_bytes)))
    share = 1.0 - max(0, budget) / total if total else 0.0      # of the bytes, streamed
    keep, debt, kept = [], 0.0, 0
    for i, nbytes in enumerate(block_bytes):
        debt += share * nbytes
        if debt >= nbytes / 2 or kept + nbytes > budget:
            debt -= nbytes                  # streamed
        else:
            keep.append(i)
            kept += nbytes
    return keep


class _Entry:
    __slots__ = ("name", "host", "shape", "dtype", "nbytes", "alloc", "sig", "in_vbar")

    def __init__(self, name, host):
        self.name, self.host = name, host
        self.shape, self.dtype = tuple(host.shape), host.dtype
        self.nbytes = host.numel() * host.element_size()
        self.alloc, self.sig = None, None
        self.in_vbar = False          # the last fault found room: no host copy needed


class Offloader:
    """The weight source of offloaded layers. Build it with `install()`."""

    def __init__(self, device, backend: str, prefetch_bytes: int = PREFETCH_BYTES):
        self.device = torch.device(device)
        self.backend = backend                    # "aimdo" | "pinned"
        self.prefetch_bytes = prefetch_bytes
        self.entries: dict[int, _Entry] = {}
        self.block_layers: dict[int, list[FrozenLinear]] = {}   # streamed blocks' layers
        self.kept_blocks: list[int] = []          # blocks whose weights stay in VRAM
        self.kept_bytes = 0
        self.staged: list[FrozenLinear] = []     # the layers of the block now staged
        self.vbar = None
        self.arena: HostArena | None = None
        self.read_from_file = 0                   # weights read from the checkpoint, not copied
        self.order: list[int] = []                # layer ids in last step's fetch order
        self.recording: list[int] = []
        self.pos = 0
        self.inflight: dict[int, tuple[torch.Tensor, torch.cuda.Event]] = {}
        self.side = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.counters = dict(fetches=0, vbar_hits=0, vbar_refills=0, vbar_no_room=0,
                             streamed=0, streamed_bytes=0, prefetched=0)

    # ------------------------------------------------------------ block hooks
    @torch.compiler.disable
    def stage(self, block: nn.Module, args) -> None:
        """Forward pre-hook of a block: a fresh device copy of each of its weights."""
        self._drop_staged()
        self.staged = self.block_layers[id(block)]
        for layer in self.staged:
            layer.streamed.staged = self._fetch(layer)
        self._prefetch_ahead()

    @torch.compiler.disable
    def unstage(self, block: nn.Module, args, output) -> None:
        """Forward hook: drop the block's copies (what autograd saved stays with it)."""
        self._drop_staged()

    def _drop_staged(self) -> None:
        # Also run by the next stage(): a recompute that torch.utils.checkpoint stops early (once it
        # has every tensor backward needs) never reaches the forward hook.
        for layer in self.staged:
            layer.streamed.staged = None
        self.staged = []

    def _fetch(self, layer: FrozenLinear) -> torch.Tensor:
        key = id(layer)
        e = self.entries[key]
        self.counters["fetches"] += 1
        self.recording.append(key)
        self.pos += 1
        w = self._fetch_vbar(e, key) if self.vbar is not None else None
        if w is None:
            return self._fetch_streamed(e, key)
        self.inflight.pop(key, None)      # streamed last step, in the VBAR now: not needed
        return w

    def _fetch_vbar(self, e: _Entry, key: int):
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
                # The page was refilled: its bytes are garbage. Refill from the prefetched
                # copy when there is one (streamed last step), else from host memory.
                src = self._take_prefetched(key)
                view.copy_(e.host if src is None else src, non_blocking=True)
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
        self.counters["streamed"] += 1
        self.counters["streamed_bytes"] += e.nbytes
        w = self._take_prefetched(key)
        return w if w is not None else e.host.to(self.device, non_blocking=True)

    def _take_prefetched(self, key: int) -> torch.Tensor | None:
        """The side stream's copy of this weight, made safe to use on the compute stream."""
        got = self.inflight.pop(key, None)
        if got is None:
            return None
        w, ready = got
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(ready)
        w.record_stream(stream)
        self.counters["prefetched"] += 1
        return w

    # ------------------------------------------------------------ prefetch in learnt order
    def step_begins(self) -> None:
        """Called at the start of each model forward: last step's order becomes the
        prediction for this one."""
        if self.recording:
            if self.recording != self.order:      # a different step: its prefetches are stale
                self.inflight.clear()
            self.order = self.recording
        self.recording = []
        self.pos = 0

    def _streams_from_host(self, key: int) -> bool:
        e = self.entries[key]
        # VBAR-backed weights that found room last time need no copy.
        return not e.in_vbar

    def prefetch_plan(self) -> list[int]:
        """The layers to copy now: the next streamed ones of the learnt order, until
        `prefetch_bytes` are in flight; past the end of the step, the next step's first."""
        n = len(self.order)
        ahead = sum(self.entries[k].nbytes for k in self.inflight)
        keys = []
        for k in range(self.pos, self.pos + n):
            if ahead >= self.prefetch_bytes:
                break
            key = self.order[k % n]
            if key in self.inflight or key in keys or not self._streams_from_host(key):
                continue
            keys.append(key)
            ahead += self.entries[key].nbytes
        return keys

    def _prefetch_ahead(self) -> None:
        if self.side is None:
            return
        for key in self.prefetch_plan():
            with torch.cuda.stream(self.side):
                w = self.entries[key].host.to(self.device, non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(self.side)
            self.inflight[key] = (w, ready)

    # ------------------------------------------------------------ bookkeeping
    def stats(self) -> dict:
        total = sum(e.nbytes for e in self.entries.values())
        out = dict(backend=self.backend, layers=len(self.entries), offloaded_bytes=total,
                   resident_bytes=self.kept_bytes, resident_blocks=len(self.kept_blocks),
                   streamed_blocks=len(self.block_layers), prefetch_bytes=self.prefetch_bytes,
                   host_bytes=self.arena.nbytes if self.arena else 0,
                   host_pinned=bool(self.arena and self.arena.pinned),
                   read_from_file=self.read_from_file, **self.counters)
        if self.vbar is not None:
            out["vbar_loaded_bytes"] = int(self.vbar.loaded_size())
        if not aimdo_usable():
            out["aimdo_reason"] = _aimdo_state["reason"]
        return out

    def close(self) -> None:
        self._drop_staged()
        self.inflight.clear()
        if self.vbar is not None:
            self.vbar.close()
            self.vbar = None
        if self.arena is not None:
            self.arena.release()


def install(model: nn.Module, device, prefer: str = "aimdo", resident_bytes: int | None = None,
            prefetch_bytes: int = PREFETCH_BYTES,
            sources: Mapping[str, TensorMeta] | None = None) -> Offloader:
    """Offload the block weights of `model` (a Flux with every block recomputed) to
    page-locked host memory and move everything else to `device`. `prefer` "aimdo" uses
    comfy-aimdo when it initialises (else the pinned fallback, said once); "pinned"
    forces the fallback. `resident_bytes` keeps whole blocks whose weights add up to at
    most that many bytes in ordinary VRAM, unhooked (`resident_blocks` picks them), and
    streams only the others; None keeps none and lets aimdo use whatever VRAM is free.
    `sources` ({key: where its bytes lie}, from
    checkpoint.stored_bytes of the file the model was just loaded from) reads those
    weights from the file into host memory instead of copying the model's tensors:
    the model's memory-mapped pages are never touched, so the file is not held twice."""
    if (model.recomputed_double, model.recomputed_single) != (
            len(model.double_blocks), len(model.single_blocks)):
        raise ValueError(
            f"offloading needs every block recomputed (it streams each block's weights in for "
            f"its forward and its recompute), but {model.recomputed_double} of "
            f"{len(model.double_blocks)} double and {model.recomputed_single} of "
            f"{len(model.single_blocks)} single blocks are: call model.set_recompute("
            f"{len(model.double_blocks)}, {len(model.single_blocks)}) first")
    device = torch.device(device)
    backend, reason = choose_backend(device, prefer)
    if backend != "aimdo" and prefer == "aimdo":
        _say_fallback(reason)
    off = Offloader(device, backend, prefetch_bytes)
    blocks = model.blocks()
    block_bytes = [sum(m.weight.nbytes for m in b.modules() if isinstance(m, FrozenLinear))
                   for b in blocks]
    off.kept_blocks = (resident_blocks(block_bytes, int(resident_bytes))
                       if resident_bytes is not None else [])
    off.kept_bytes = sum(block_bytes[i] for i in off.kept_blocks)
    targets = offload_targets(model, off.kept_blocks)
    target_weights = {id(layer.weight) for _, layer in targets}
    # Everything that is not an offloaded weight goes to the device.
    for module in model.modules():
        for pname, p in list(module._parameters.items()):
            if p is not None and id(p) not in target_weights and p.device != device:
                p.data = p.data.to(device)
        for bname, b in list(module._buffers.items()):
            if b is not None and b.device != device:
                module._buffers[bname] = b.to(device)
    sources = sources or {}

    def from_file(name: str, layer: FrozenLinear) -> TensorMeta | None:
        src = sources.get(f"{name}.weight")
        same = src is not None and (src.dtype, src.shape) == (layer.weight.dtype, tuple(layer.weight.shape))
        return src if same else None
    copied_from_host = sum(layer.weight.nbytes for name, layer in targets
                           if layer.weight.device.type == "cpu" and from_file(name, layer) is None)
    off.arena = HostArena([(tuple(layer.weight.shape), layer.weight.dtype) for _, layer in targets],
                          freed_bytes=copied_from_host)
    for (name, layer), host in zip(targets, off.arena.tensors):
        src = from_file(name, layer)
        if src is not None:
            read_into(src, host)
            off.read_from_file += 1
        else:
            host.copy_(layer.weight.data)
        layer.weight.data = host          # the weight it replaces is freed here, one by one
        layer.streamed = Streamed(off)
        off.entries[id(layer)] = _Entry(name, host)
    if device.type == "cuda":
        off.arena.pin()
    for i, block in enumerate(blocks):
        if i in off.kept_blocks:
            continue
        off.block_layers[id(block)] = [m for m in block.modules() if id(m) in off.entries]
        block.register_forward_pre_hook(off.stage)
        block.register_forward_hook(off.unstage)
    total = sum(e.nbytes for e in off.entries.values())
    if backend == "aimdo" and off.entries:
        from comfy_aimdo import model_vbar
        off.vbar = model_vbar.ModelVBAR(total + (64 << 20), device.index or 0)
        for e in off.entries.values():
            e.alloc = off.vbar.alloc(e.nbytes)
        off.vbar.prioritize()
        if resident_bytes is not None:     # the planned blocks are resident: no room beyond
            off.vbar.set_watermark_limit(max(0, int(resident_bytes) - off.kept_bytes))
    model.register_forward_pre_hook(lambda mod, args: off.step_begins())
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    log.info("fluxtrain offload: %d of %d blocks streamed (%d layers, %.1f GiB in %s host "
             "memory, %d read from the file), backend %s", len(blocks) - len(off.kept_blocks),
             len(blocks), len(targets), total / 2**30,
             "page-locked" if off.arena.pinned else "pageable", off.read_from_file, backend)
    return off
