"""Offloading frozen weights to host memory (fluxtrain.offload), on the CPU:
backend choice and the once-only fallback message, equality of outputs and LoRA
gradients with the resident model, that autograd keeps no weight, and the learnt
prefetch order. The aimdo path itself needs CUDA and runs in the benchmark."""

import copy
import logging

import pytest
import torch

from fluxtrain import offload
from fluxtrain.flux import Flux, pack_latents, text_ids
from fluxtrain.lora import LoRAConfig, attach_lora
from fluxtrain.params import TINY


@pytest.fixture(autouse=True)
def fresh_offload_state(monkeypatch):
    monkeypatch.setattr(offload, "_aimdo_state", {"tried": False, "ok": False, "reason": ""})
    monkeypatch.setattr(offload, "_said_fallback", False)


@pytest.fixture
def model_and_inputs(tiny_sd):
    model = Flux(TINY)
    model.load_state_dict(tiny_sd)
    model.requires_grad_(False)
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


@pytest.mark.parametrize("checkpointing", [False, True])
def test_offloaded_model_has_the_same_outputs_and_lora_grads(model_and_inputs, checkpointing):
    model, inputs = model_and_inputs
    if checkpointing:
        model.set_checkpointing(TINY.depth, TINY.depth_single_blocks)
    ref_out, ref_grads = out_and_grads(model, inputs)
    off_model = copy.deepcopy(model)
    off = offload.install(off_model, "cpu")
    n = len(off.entries)
    assert n == len(offload.offload_targets(off_model)) > 0
    out, grads = out_and_grads(off_model, inputs)
    assert torch.equal(out, ref_out)
    assert grads.keys() == ref_grads.keys() and len(grads) > 0
    for k in grads:
        assert torch.equal(grads[k], ref_grads[k]), k
    # forward fetches every weight, backward those whose input needs a gradient (not the
    # modulations of the time vector), and a checkpointed block fetches again to recompute
    needs_grad_in = n - 2 * TINY.depth - TINY.depth_single_blocks
    assert off.counters["fetches"] == n + needs_grad_in + (n if checkpointing else 0)


def test_autograd_keeps_no_offloaded_weight(model_and_inputs):
    model, inputs = model_and_inputs
    off = offload.install(model, "cpu")
    fetched = set()
    real_fetch = off.fetch

    def spy(layer):
        w, s = real_fetch(layer)
        fetched.add(w.untyped_storage().data_ptr())
        return w, s
    off.fetch = spy
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**inputs)
    assert fetched and saved
    assert not fetched & set(saved), "a fetched weight was saved for backward"
    out.square().mean().backward()


def test_prefetch_order_is_learnt_from_the_previous_step(model_and_inputs):
    model, inputs = model_and_inputs
    model.set_checkpointing(TINY.depth, TINY.depth_single_blocks)
    off = offload.install(model, "cpu")
    out_and_grads(model, inputs)
    first = list(off.recording)
    out_and_grads(model, inputs)       # forward pre-hook: last step's order becomes the plan
    assert off.order == first
    assert off.recording == first, "the same step must fetch in the same order"
    layers = {id(m): m for _, m in offload.offload_targets(model)}
    # forward order starts with the first double block's layers, backward ends with them
    assert layers[first[0]] is model.double_blocks[0].img_mod.lin
    assert any(layers[first[-1]] is m for m in model.double_blocks[0].modules())
