"""Offloading frozen weights to host memory (fluxtrain.offload), on the CPU:
backend choice and the once-only fallback message, equality of outputs and LoRA
gradients with the resident model (eager and with compiled blocks), how long staged
weight copies live, the learnt prefetch order and what gets prefetched, and the host
memory the weights live in (one exact-size buffer, filled from the checkpoint file,
page-locked in one call; its failure and a machine short of memory). The aimdo path
and real page-locking need CUDA and run in the benchmark."""

import copy
import gc
import logging
import weakref
from types import SimpleNamespace

import pytest
import torch

from fluxtrain import offload
from fluxtrain.checkpoint import load_flux, read_into, stored_bytes
from fluxtrain.flux import Flux, pack_latents, text_ids
from fluxtrain.layers import FrozenLinear, enable_fp8_compute
from fluxtrain.lora import LoRAConfig, attach_lora
from fluxtrain.params import TINY
from fluxtrain.synthetic import write_bfl


@pytest.fixture(autouse=True)
def fresh_offload_state(monkeypatch):
    monkeypatch.setattr(offload, "_aimdo_state", {"tried": False, "ok": False, "reason": ""})
    monkeypatch.setattr(offload, "_said_fallback", False)


@pytest.fixture
def model_and_inputs(tiny_sd):
    """A TINY Flux with LoRA, every block checkpointed (what offloading needs)."""
    model = Flux(TINY)
    model.load_state_dict(tiny_sd)
    model.requires_grad_(False)
    model.set_recompute(TINY.depth, TINY.depth_single_blocks)
    adapters = attach_lora(model, LoRAConfig(rank=4), seed=0)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for a in adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.1)
    img, img_ids = pack_latents(torch.randn(1, TINY.in_channels // 4, 6, 8, generator=g))
    inputs = dict(img=img, img_ids=img_ids, txt=torch.randn(1, 5, TINY.context_in_dim, generator=g),
                  txt_ids=text_ids(1, 5), timesteps=torch.rand(1, generator=g),
                  y=torch.randn(1, TINY.vec_in_dim, generator=g), guidance=torch.ones(1))
    return model, inputs


def out_and_grads(model, inputs):
    for p in model.parameters():
        p.grad = None
    out = model(**inputs)
    out.square().mean().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.detach(), grads


def test_no_cuda_means_pinned_fallback_said_once(model_and_inputs, caplog, monkeypatch):
    import comfy_aimdo.host_buffer as hb

    def never(*a, **k):  # DESIGN.md: HostBuffer segfaults without CUDA
        raise AssertionError("HostBuffer touched without CUDA")
    monkeypatch.setattr(hb, "HostBuffer", never)
    assert offload.init_aimdo(0) is False
    assert "no CUDA" in offload._aimdo_state["reason"]
    model, _ = model_and_inputs
    with caplog.at_level(logging.WARNING, logger="fluxtrain.offload"):
        off = offload.install(model, "cpu")
        offload.install(copy.deepcopy(model), "cpu")
    assert off.backend == "pinned"
    said = [r for r in caplog.records if "pinned host memory" in r.getMessage()]
    assert len(said) == 1, "install must announce the fallback, and exactly once"


def test_failed_init_device_is_the_test_of_usability(monkeypatch):
    """control.init() succeeds on any machine; only init_device() == True counts."""
    from comfy_aimdo import control
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(offload, "_touch_device", lambda i: None)
    monkeypatch.setattr(control, "init", lambda *a, **k: True)
    monkeypatch.setattr(control, "devctxs", [])
    monkeypatch.setattr(control, "init_device", lambda i, *a: False)
    assert offload.choose_backend("cuda:0") == (
        "pinned", "comfy_aimdo.control.init_device(0) returned False")

    monkeypatch.setattr(offload, "_aimdo_state", {"tried": False, "ok": False, "reason": ""})
    monkeypatch.setattr(control, "init_device", lambda i, *a: True)
    assert offload.choose_backend("cuda:0") == ("aimdo", "")
    assert offload.choose_backend("cuda:0", prefer="pinned")[0] == "pinned"
    assert offload.choose_backend("cpu")[0] == "pinned"


def test_offloading_needs_every_block_recomputed(model_and_inputs):
    model, _ = model_and_inputs
    model.set_recompute(TINY.depth, 0)
    with pytest.raises(ValueError, match=r"every block recomputed.*set_recompute\(2, 2\)"):
        offload.install(model, "cpu")


def test_offloaded_model_has_the_same_outputs_and_lora_grads(model_and_inputs):
    model, inputs = model_and_inputs
    resident = copy.deepcopy(model)
    resident.set_recompute(0, 0)
    ref_out, ref_grads = out_and_grads(resident, inputs)
    off = offload.install(model, "cpu")
    n = len(off.entries)
    assert n == len(offload.offload_targets(model)) > 0
    out, grads = out_and_grads(model, inputs)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    # each weight is brought in for the forward and for the recompute, never for backward
    assert off.counters["fetches"] == 2 * n


def test_offloaded_float8_compute_matches_resident_float8_compute(model_and_inputs, monkeypatch):
    """Float8 matmuls on staged weights (forward, recompute, input-gradient from the
    saved staged copy) compute what they compute on resident weights."""
    from fluxtrain import fp8
    from fluxtrain.layers import FrozenLinear, enable_fp8_compute
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    model, inputs = model_and_inputs
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, FrozenLinear):
                m.weight.data = m.weight.data.to(torch.float8_e4m3fn)
    resident = copy.deepcopy(model)
    resident.set_recompute(0, 0)
    assert enable_fp8_compute(resident, "cpu") > 0
    ref_out, ref_grads = out_and_grads(resident, inputs)
    offload.install(model, "cpu")
    assert enable_fp8_compute(model, "cpu") == enable_fp8_compute(resident, "cpu")
    out, grads = out_and_grads(model, inputs)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k


def test_compiled_offloaded_blocks_match_eager_and_compile_like_resident_ones(model_and_inputs):
    """Staged weights are plain tensor inputs of the compiled blocks: no graph break per
    layer, no recompile when the next step stages fresh copies, the same gradients."""
    from torch._dynamo.utils import counters

    from fluxtrain.placement import compile_blocks

    model, inputs = model_and_inputs
    ref_out, ref_grads = out_and_grads(copy.deepcopy(model), inputs)

    def compiled_graphs(m, steps=2):
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(m, backend="aot_eager")
        graphs = []
        for _ in range(steps):
            out, grads = out_and_grads(m, inputs)
            torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
            for k in ref_grads:
                torch.testing.assert_close(grads[k], ref_grads[k], rtol=1e-4, atol=1e-6, msg=k)
            graphs.append(counters["stats"]["unique_graphs"])
        breaks = dict(counters["graph_break"])
        torch._dynamo.reset()
        return graphs, breaks

    resident_graphs, resident_breaks = compiled_graphs(copy.deepcopy(model), steps=1)
    offload.install(model, "cpu")
    graphs, breaks = compiled_graphs(model)
    assert breaks == resident_breaks == {}
    # all blocks of a kind share one graph (their weights are inputs); the first double
    # block has one more (its inputs need no gradient); the second step compiles nothing
    assert graphs == [resident_graphs[0]] * 2 and resident_graphs[0] <= 3


def test_staged_copies_live_only_while_their_block_runs_or_is_differentiated(model_and_inputs,
                                                                            monkeypatch):
    """On a GPU every fetch is a fresh device copy; here copies stand in for them, and
    weak references show which ones are alive."""
    model, inputs = model_and_inputs
    off = offload.install(model, "cpu")
    alive = []
    monkeypatch.setattr(off, "_fetch_streamed", lambda e, key: track(e.host.clone()))

    def track(w):
        alive.append(weakref.ref(w))
        return w

    def n_alive():
        gc.collect()
        return sum(r() is not None for r in alive)

    per_block = max(len(v) for v in off.block_layers.values())
    during = []
    real_stage = off.stage

    def stage(block, args):
        real_stage(block, args)
        during.append(n_alive())
    for block in model.blocks():      # the hooks hold the bound method
        block._forward_pre_hooks.clear()
        block.register_forward_pre_hook(stage)
    out = model(**inputs)
    assert len(alive) == len(off.entries) and n_alive() == 0, \
        "autograd kept a weight copy from forward to backward"
    out.square().mean().backward()
    assert len(alive) == 2 * len(off.entries)
    assert max(during) <= per_block, "more than one block's weights were held at once"


def test_prefetch_order_is_learnt_from_the_previous_step(model_and_inputs):
    model, inputs = model_and_inputs
    off = offload.install(model, "cpu")
    out_and_grads(model, inputs)
    first = list(off.recording)
    out_and_grads(model, inputs)       # forward pre-hook: last step's order becomes the plan
    assert off.order == first
    assert off.recording == first, "the same step must fetch in the same order"
    layers = {id(m): m for _, m in offload.offload_targets(model)}
    # forward order starts with the first double block's layers, the recompute in
    # backward ends with them
    assert layers[first[0]] is model.double_blocks[0].img_mod.lin
    assert any(layers[first[-1]] is m for m in model.double_blocks[0].modules())


def test_prefetch_plan_fills_the_byte_budget_skips_weights_in_vram_and_wraps_around(
        model_and_inputs):
    model, inputs = model_and_inputs
    off = offload.install(model, "cpu")
    out_and_grads(model, inputs)
    out_and_grads(model, inputs)
    order, entries = off.order, off.entries
    size = entries[order[0]].nbytes
    resident = order[1]
    entries[resident].in_vbar = True          # found room in the VBAR last time: no copy
    off.prefetch_bytes = 3 * size
    off.pos = 0
    plan = off.prefetch_plan()
    assert plan[0] == order[0] and resident not in plan
    assert sum(entries[k].nbytes for k in plan) >= off.prefetch_bytes
    assert sum(entries[k].nbytes for k in plan[:-1]) < off.prefetch_bytes
    off.pos = len(order) - 1          # the last fetch of the step: the next step's first follow
    plan = off.prefetch_plan()
    assert plan[:2] == [order[-1], order[0]]
    off.inflight = {k: None for k in plan}
    off.pos = 0
    assert not set(off.prefetch_plan()) & set(plan), "weights in flight are not copied again"


def test_host_arena_holds_each_weight_at_its_exact_size_on_its_own_page():
    layout = [((3, 5), torch.float8_e4m3fn), ((4096,), torch.bfloat16), ((7, 1), torch.float32)]
    arena = offload.HostArena(layout)
    spans = []
    for t, (shape, dtype) in zip(arena.tensors, layout):
        assert (tuple(t.shape), t.dtype) == (shape, dtype) and t.is_contiguous()
        assert t.data_ptr() % offload.HOST_ALIGN == 0
        spans.append((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()))
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), "weights overlap"
    assert arena.nbytes == 4 * offload.HOST_ALIGN   # 15 B, 8 KiB, 28 B: 1 + 2 + 1 pages
    for t in arena.tensors:
        t.view(torch.uint8).fill_(0)
    arena.tensors[1].fill_(1.0)
    assert arena.tensors[0].view(torch.uint8).sum() == 0 and arena.tensors[2].sum() == 0


def test_offloaded_weights_are_read_from_the_file_not_from_the_models_tensors(tmp_path, tiny_sd,
                                                                            monkeypatch):
    """With `sources`, install reads each weight's bytes from the checkpoint (so the
    model's memory-mapped copy is never touched); without, it copies the tensor."""
    path = tmp_path / "m.safetensors"
    write_bfl(tiny_sd, path, torch.float8_e4m3fn)
    reads = []

    def counted_read(meta, out):
        reads.append(meta)
        read_into(meta, out)
    monkeypatch.setattr(offload, "read_into", counted_read)
    for sources in (stored_bytes(path), None):
        model, _ = load_flux(path)
        model.set_recompute(TINY.depth, TINY.depth_single_blocks)
        targets = offload.offload_targets(model)
        for _, layer in targets:     # what the file holds and what the model holds now differ
            layer.weight.data = torch.zeros_like(layer.weight)
        reads.clear()
        off = offload.install(model, "cpu", sources=sources)
        file_weights, _ = load_flux(path)
        for name, layer in targets:
            want = (file_weights.get_submodule(name).weight if sources else torch.zeros_like(layer.weight))
            assert torch.equal(layer.weight.view(torch.uint8), want.view(torch.uint8)), name
            assert layer.weight.data_ptr() % offload.HOST_ALIGN == 0
        assert len(reads) == off.stats()["read_from_file"] == (len(targets) if sources else 0)


def test_a_source_of_another_dtype_is_copied_not_read(tmp_path, tiny_sd):
    write_bfl(tiny_sd, tmp_path / "bf16.safetensors", torch.bfloat16)
    write_bfl(tiny_sd, tmp_path / "fp8.safetensors", torch.float8_e4m3fn)
    model, _ = load_flux(tmp_path / "fp8.safetensors")
    model.set_recompute(TINY.depth, TINY.depth_single_blocks)
    before = {n: m.weight.clone() for n, m in offload.offload_targets(model)}
    off = offload.install(model, "cpu", sources=stored_bytes(tmp_path / "bf16.safetensors"))
    assert off.read_from_file == 0
    for n, m in offload.offload_targets(model):
        assert m.weight.dtype == torch.float8_e4m3fn
        assert torch.equal(m.weight.view(torch.uint8), before[n].view(torch.uint8)), n


@pytest.fixture
def fake_cudart(monkeypatch):
    calls = SimpleNamespace(register=[], unregister=[], result=0)

    def register(ptr, size, flags):
        calls.register.append((ptr, size, flags))
        return calls.result
    cudart = SimpleNamespace(cudaHostRegister=register,
                             cudaHostUnregister=lambda ptr: calls.unregister.append(ptr) or 0)
    monkeypatch.setattr(offload, "_cudart", lambda: cudart)
    monkeypatch.setattr(offload, "_clear_cuda_error", lambda: None)
    return calls


LAYOUT = [((64, 32), torch.float8_e4m3fn), ((32, 64), torch.float8_e4m3fn)]


def test_the_arena_is_page_locked_in_one_call_and_unlocked_once(fake_cudart):
    arena = offload.HostArena(LAYOUT)
    assert not arena.pinned and fake_cudart.register == []
    assert arena.pin() and arena.pin()
    assert arena.pinned and fake_cudart.register == [(arena.buffer.data_ptr(), arena.nbytes, 1)]
    arena.release()
    arena.release()
    assert fake_cudart.unregister == [arena.buffer.data_ptr()] and not arena.pinned
    forgotten = offload.HostArena(LAYOUT)     # never released: unlocked when collected
    forgotten.pin()
    ptr = forgotten.buffer.data_ptr()
    del forgotten
    gc.collect()
    assert fake_cudart.unregister[-1] == ptr and len(fake_cudart.unregister) == 2


def test_a_failed_page_lock_is_said_and_training_goes_on_in_pageable_memory(fake_cudart, caplog):
    fake_cudart.result = 2    # cudaErrorMemoryAllocation
    with caplog.at_level(logging.WARNING, logger="fluxtrain.offload"):
        arena = offload.HostArena(LAYOUT)
        assert not arena.pin()
    assert not arena.pinned and "error 2" in arena.pin_error
    assert any("could not page-lock" in r.getMessage() and "pageable" in r.getMessage()
               for r in caplog.records)
    arena.release()
    assert fake_cudart.unregister == []


def test_too_little_host_memory_is_refused_before_anything_is_allocated(tmp_path, tiny_sd,
                                                                       monkeypatch):
    path = tmp_path / "m.safetensors"
    write_bfl(tiny_sd, path, torch.float8_e4m3fn)
    model, _ = load_flux(path)
    model.set_recompute(TINY.depth, TINY.depth_single_blocks)
    monkeypatch.setattr(offload, "available_host_bytes", lambda: 4096)
    with pytest.raises(offload.HostMemoryError, match=r"GiB are needed, 0.0 GiB are available.*lean"):
        offload.install(model, "cpu", sources=stored_bytes(path))
    # Copied from host memory instead, each weight frees its own bytes as it moves in.
    assert offload.install(model, "cpu").arena.nbytes > 4096


def fake_linux(tmp_path, cgroup_lines: str, files: dict[str, str], available_kib: int = 100 << 20):
    """A /proc (meminfo, self/cgroup) and a cgroup mount with `files` under tmp_path."""
    proc, root = tmp_path / "proc", tmp_path / "cgroup"
    (proc / "self").mkdir(parents=True)
    (proc / "meminfo").write_text(f"MemTotal: 200000000 kB\nMemAvailable: {available_kib} kB\n")
    (proc / "self" / "cgroup").write_text(cgroup_lines)
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return dict(proc=str(proc), cgroup_root=str(root))


GIB = 2 ** 30


@pytest.mark.parametrize("cgroup_lines, files, room", [
    # cgroup v2 container: 8 GiB limit, 1 GiB used of which 0.5 GiB reclaimable page cache
    ("0::/\n", {"memory.max": f"{8 * GIB}\n", "memory.current": f"{GIB}\n",
                "memory.stat": f"anon 1\ninactive_file {GIB // 2}\n"}, 7.5 * GIB),
    ("0::/\n", {"memory.max": "max\n", "memory.current": f"{GIB}\n"}, None),        # no limit
    # cgroup v1 seen from inside a container: /proc names the host's path, the mount is its own
    ("5:memory:/docker/abc\n4:cpu:/docker/abc\n",
     {"memory/memory.limit_in_bytes": f"{16 * GIB}", "memory/memory.usage_in_bytes": f"{4 * GIB}",
      "memory/memory.stat": "total_inactive_file 0\n"}, 12 * GIB),
    ("5:memory:/\n", {"memory/memory.limit_in_bytes": "9223372036854771712",
                      "memory/memory.usage_in_bytes": "1"}, None),                    # v1 unlimited
    # a systemd slice with its own v2 limit (and a line this reader does not understand)
    ("garbage\n0::/user.slice/job.scope\n", {"user.slice/job.scope/memory.max": f"{2 * GIB}",
                                    "user.slice/job.scope/memory.current": "0"}, 2 * GIB),
])
def test_available_host_memory_counts_a_containers_memory_limit(tmp_path, cgroup_lines, files, room):
    where = fake_linux(tmp_path, cgroup_lines, files, available_kib=100 << 20)   # 100 GiB free
    assert offload.available_host_bytes(**where) == (100 * GIB if room is None else room)


def test_available_host_memory_is_unknown_without_proc_and_cgroups(tmp_path):
    assert offload.available_host_bytes(proc=str(tmp_path / "none"), cgroup_root=str(tmp_path)) is None


def test_resident_blocks_fill_the_budget_and_spread_the_streamed_ones():
    sizes = [340] * 19 + [141] * 38               # Flux's double and single blocks, MB
    total = sum(sizes)
    for budget in (0, total // 4, total // 2, 3 * total // 4, total - 1, total):
        keep = offload.resident_blocks(sizes, budget)
        kept = sum(sizes[i] for i in keep)
        assert kept <= budget
        assert budget - kept < 2 * 340 or budget == 0, "a block that fits was left out"
        streamed = [i for i in range(len(sizes)) if i not in keep]
        if 1 < len(streamed) < len(sizes) - 1:
            gaps = [b - a for a, b in zip(streamed, streamed[1:])]
            assert max(gaps) <= 3 * min(len(sizes) // len(streamed), len(sizes) // max(1, len(keep))) + 3, (
                f"streamed blocks bunch together: {streamed}")
    assert offload.resident_blocks(sizes, total) == list(range(len(sizes)))
    assert offload.resident_blocks(sizes, 0) == []


def test_resident_blocks_stay_in_vram_unhooked_and_the_others_stream(model_and_inputs):
    """A budget keeps whole blocks on the device (no staging, no host copy) and streams
    only the rest; the arithmetic is the resident model's either way."""
    model, inputs = model_and_inputs
    resident = copy.deepcopy(model)
    resident.set_recompute(0, 0)
    ref_out, ref_grads = out_and_grads(resident, inputs)
    blocks = model.blocks()
    sizes = [sum(m.weight.nbytes for m in b.modules() if isinstance(m, FrozenLinear)) for b in blocks]
    off = offload.install(model, "cpu", prefer="pinned", resident_bytes=sizes[0] + sizes[-1])
    assert len(off.kept_blocks) == 2 and off.kept_bytes == sum(sizes[i] for i in off.kept_blocks)
    kept_layers = {id(m) for i in off.kept_blocks for m in blocks[i].modules()}
    assert not kept_layers & set(off.entries), "a resident block's weights were offloaded"
    assert all(m.streamed is None for i in off.kept_blocks for m in blocks[i].modules()
               if isinstance(m, FrozenLinear))
    stats = off.stats()
    assert stats["resident_blocks"] == 2 and stats["streamed_blocks"] == len(blocks) - 2
    out, grads = out_and_grads(model, inputs)
    torch.testing.assert_close(out, ref_out)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k])
