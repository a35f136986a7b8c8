"""Float8 compute of the frozen base matmuls (fluxtrain.fp8).

CI has no GPU; torch's CPU build implements `torch._scaled_mm`, so the real code
path (quantise, layout, scales, backward) runs here, and the device check is
tested by faking the capability query."""

import pytest
import torch

from fluxtrain import fp8
from fluxtrain.layers import FrozenLinear


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def _fp8_layer(n_out=48, n_in=64, scale=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    layer = FrozenLinear(n_in, n_out, bias=True, dtype=torch.float8_e4m3fn)
    with torch.no_grad():
        layer.weight.copy_((torch.randn(n_out, n_in, generator=g) * 0.5).to(torch.float8_e4m3fn))
        layer.bias = torch.nn.Parameter(torch.randn(n_out, generator=g).to(torch.bfloat16),
                                        requires_grad=False)
    if scale is not None:
        layer.weight_scale = torch.tensor(scale)
    return layer


def test_scale_maps_absmax_onto_the_largest_fp8_value():
    x = torch.tensor([[0.5, -3.0], [2.0, 1.0]])
    assert fp8.tensor_scale(x, fp8.E4M3).item() == pytest.approx(3.0 / 448.0)
    assert fp8.tensor_scale(x, fp8.E5M2).item() == pytest.approx(3.0 / 57344.0)
    q, s = fp8.quantize(x, fp8.E4M3)
    assert q.dtype == torch.float8_e4m3fn
    assert q.float().abs().max().item() == 448.0
    assert (q.float() * s).sub(x).abs().max().item() <= 3.0 * 2 ** -4  # half an ulp of e4m3


def test_zero_tensor_quantises_to_zeros_not_nan():
    q, s = fp8.quantize(torch.zeros(4, 16), fp8.E4M3)
    assert torch.isfinite(s) and s > 0
    assert q.float().abs().sum().item() == 0


def test_quantise_dequantise_matmul_is_within_fp8_tolerance_of_bf16():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, 256, generator=g)
    w = torch.randn(128, 256, generator=g) * 0.02
    ref = x.double() @ w.double().T
    xq, sx = fp8.quantize(x, fp8.E4M3)
    wq, sw = fp8.quantize(w, fp8.E4M3)
    emulated = (xq.double() * sx.double()) @ (wq.double() * sw.double()).T
    # e4m3 has 3 mantissa bits: ~3% per element, averaging down over K=256.
    assert _rel(emulated, ref) < 0.05
    # ... and the real kernel computes the same thing as the emulation.
    real = torch._scaled_mm(xq, wq.t(), scale_a=sx, scale_b=sw, out_dtype=torch.float32)
    assert _rel(real, emulated) < 1e-5
    bf16 = (x.bfloat16() @ w.bfloat16().T)
    assert _rel(bf16, ref) < 0.01  # bf16 is better, fp8 within 5x of it at most
    assert _rel(emulated, ref) > _rel(bf16, ref)


@pytest.mark.parametrize("scale", [None, 0.25])
def test_fp8_layer_forward_and_input_grad_match_the_cast_path(scale):
    layer = _fp8_layer(scale=scale)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 64, generator=g).bfloat16().requires_grad_()  # 14 rows: padded to 16
    y_ref = layer(x)
    (gy := torch.randn_like(y_ref)).requires_grad_(False)
    (dx_ref,) = torch.autograd.grad(y_ref, x, gy)

    layer.fp8_compute = layer.fp8_backward = True
    layer.fp8_weight_scale = fp8.weight_scale_f32(layer.weight, layer.weight_scale)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, gy)
    assert y.shape == y_ref.shape and y.dtype == torch.bfloat16
    assert _rel(y, y_ref) < 0.06, "forward in e4m3 drifted beyond fp8 tolerance"
    assert _rel(dx, dx_ref) < 0.12, "input gradient (e5m2 grads) drifted beyond fp8 tolerance"
    # It really took the float8 paths: not bit-identical to the cast path.
    assert not torch.equal(y, y_ref)
    assert not torch.equal(dx, dx_ref)


def test_fp8_path_is_chosen_only_where_the_device_supports_it(monkeypatch):
    model = torch.nn.Sequential(_fp8_layer(), FrozenLinear(48, 32, dtype=torch.bfloat16))
    assert not fp8.supports_fp8_matmul("cpu")
    assert fp8.enable_fp8_compute(model, "cpu") == 0
    assert not model[0].fp8_compute

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 0))  # A100
    assert not fp8.supports_fp8_matmul("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (8, 9))  # Ada
    assert fp8.supports_fp8_matmul("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: (9, 0))  # Hopper
    assert fp8.supports_fp8_matmul("cuda:0")
    monkeypatch.setattr(torch.version, "hip", "6.2", raising=False)
    assert not fp8.supports_fp8_matmul("cuda:0")


def test_enable_sets_only_float8_layers_and_the_setting_turns_it_off(monkeypatch):
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    model = torch.nn.Sequential(_fp8_layer(), FrozenLinear(48, 32, dtype=torch.bfloat16),
                                _fp8_layer(n_out=10))  # 10 outputs: not 16-aligned
    assert fp8.enable_fp8_compute(model, "cpu") == 1
    assert [m.fp8_compute for m in model] == [True, False, False]
    assert model[0].fp8_weight_scale.dtype == torch.float32
    assert model[0].fp8_backward
    assert fp8.enable_fp8_compute(model, "cpu", backward=False) == 1
    assert model[0].fp8_compute and not model[0].fp8_backward
    assert fp8.enable_fp8_compute(model, "cpu", enabled=False) == 0
    assert not any(m.fp8_compute or m.fp8_backward for m in model)


def test_kept_transposed_weight_gives_the_same_input_gradient(monkeypatch):
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    layer = _fp8_layer(scale=0.5)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
    fp8.enable_fp8_compute(layer, "cpu")
    assert layer.fp8_weight_t is None
    (dx_transposing,) = torch.autograd.grad(layer(x).sum(), x)

    fp8.enable_fp8_compute(layer, "cpu", keep_transposed=True)
    kept = layer.fp8_weight_t
    assert kept.stride() == (1, 48) and torch.equal(kept.float(), layer.weight.float())
    (dx_kept,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.equal(dx_kept, dx_transposing)
    fp8.enable_fp8_compute(layer, "cpu", enabled=False)
    assert layer.fp8_weight_t is None
