"""Float8 compute of the frozen base matmuls (fluxtrain.fp8).

CI has no GPU; torch's CPU build implements `torch._scaled_mm`, so the real code
path (quantise, layout, scales, backward) runs here, and the device check is
tested by faking the capability query."""

import pytest
import torch

from fluxtrain import fp8
from fluxtrain.layers import Fp8Compute, FrozenLinear, enable_fp8_compute, fp8_eligible


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


@pytest.mark.parametrize("rowwise", [False, True])
@pytest.mark.parametrize("scale", [None, 0.25])
def test_fp8_layer_forward_and_input_grad_match_the_cast_path(scale, rowwise):
    layer = _fp8_layer(scale=scale)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 7, 64, generator=g).bfloat16().requires_grad_()  # 14 rows: padded to 16
    y_ref = layer(x)
    (gy := torch.randn_like(y_ref)).requires_grad_(False)
    (dx_ref,) = torch.autograd.grad(y_ref, x, gy)

    layer.fp8 = Fp8Compute(fp8.Fp8Recipe(rowwise=rowwise),
                           fp8.weight_scale_f32(layer.weight, layer.weight_scale), True, rowwise)
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
    assert enable_fp8_compute(model, "cpu") == 0
    assert model[0].fp8 is None

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
    assert enable_fp8_compute(model, "cpu") == 1
    assert [m.fp8 is not None for m in model] == [True, False, False]
    assert model[0].fp8.weight_scale.dtype == torch.float32
    assert model[0].fp8.backward
    assert enable_fp8_compute(model, "cpu", backward=False) == 1
    assert model[0].fp8 is not None and not model[0].fp8.backward
    assert enable_fp8_compute(model, "cpu", enabled=False) == 0
    assert all(m.fp8 is None for m in model)


def test_kept_transposed_weight_gives_the_same_input_gradient(monkeypatch):
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    layer = _fp8_layer(scale=0.5)
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)).bfloat16().requires_grad_()
    enable_fp8_compute(layer, "cpu")
    assert layer.fp8.weight_t is None
    (dx_transposing,) = torch.autograd.grad(layer(x).sum(), x)

    enable_fp8_compute(layer, "cpu", keep_transposed=True)
    kept = layer.fp8.weight_t
    assert kept.stride() == (1, 48) and torch.equal(kept.float(), layer.weight.float())
    (dx_kept,) = torch.autograd.grad(layer(x).sum(), x)
    assert torch.equal(dx_kept, dx_transposing)
    enable_fp8_compute(layer, "cpu", enabled=False)
    assert layer.fp8 is None


def test_per_row_scales_keep_quiet_rows_precise_beside_a_loud_one():
    """One token 10^5 times louder than the rest: one scale per tensor pushes the quiet
    rows into float8's subnormals (or to zero); one scale per row does not."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(32, 128, generator=g)
    x[0] *= 1e5
    qt, st = fp8.quantize(x, fp8.E4M3)
    qr, sr = fp8.quantize(x, fp8.E4M3, rowwise=True)
    assert st.shape == () and sr.shape == (32, 1)
    assert torch.allclose(sr[:, 0], x.abs().amax(dim=1) / 448.0)
    quiet = slice(1, None)
    err_tensor = _rel(qt[quiet].float() * st, x[quiet])
    err_row = _rel(qr[quiet].float() * sr[quiet], x[quiet])
    assert err_row < 0.05 < err_tensor


def test_rowwise_product_is_the_emulated_one():
    g = torch.Generator().manual_seed(6)
    x = torch.randn(16, 64, generator=g) * torch.logspace(-2, 2, 16)[:, None]
    layer = _fp8_layer(scale=0.5)
    w_scale = fp8.weight_scale_f32(layer.weight, layer.weight_scale)
    y = fp8.linear_fp8(x.bfloat16(), layer.weight, w_scale, None, torch.float32,
                       fp8.Fp8Recipe(rowwise=True))
    xq, sx = fp8.quantize(x.bfloat16(), fp8.E4M3, rowwise=True)
    emulated = (xq.double() * sx.double()) @ (layer.weight.double() * 0.5).T
    assert _rel(y, emulated) < 1e-5


def test_fast_accumulation_is_a_forward_setting_only(monkeypatch):
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    seen = []
    real = torch._scaled_mm

    def spy(*args, **kwargs):
        seen.append(kwargs.get("use_fast_accum"))
        return real(*args, **kwargs)
    monkeypatch.setattr(torch, "_scaled_mm", spy)
    layer = _fp8_layer()
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(7)).bfloat16().requires_grad_()
    for fast in (True, False):
        seen.clear()
        enable_fp8_compute(layer, "cpu", recipe=fp8.Fp8Recipe(fast_accum=fast))
        layer(x).sum().backward()
        assert seen == [fast, False]      # forward as set, input-gradient always exact


def test_default_recipe_computes_only_the_blocks_token_wise_linears_in_float8(monkeypatch):
    """Embedders, modulation and the final layer stay on the cast path: on the full-size
    model they carried 84% of the float8 forward's error for 0.3% of its matmul work
    (benchmarks/results/2026-12-01-h200-fp8floors.json)."""
    from fluxtrain.layers import FrozenLinear
    from fluxtrain.flux import Flux
    from fluxtrain.params import TINY
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    model = Flux(TINY, dtype=torch.float8_e4m3fn)   # which layers, not values: uninitialised
    names = {id(m): n for n, m in model.named_modules()}
    token = {names[id(m)] for m in model.token_linears()}
    assert token and not any("mod" in n for n in token)
    assert {n.rsplit(".", 1)[-1] for n in token} == {"qkv", "proj", "0", "2", "linear1", "linear2"}

    n = enable_fp8_compute(model, "cpu")
    on = {names[id(m)] for m in model.modules() if isinstance(m, FrozenLinear) and m.fp8 is not None}
    assert on == token and n == len(token)

    every = enable_fp8_compute(model, "cpu", recipe=fp8.Fp8Recipe(all_layers=True))
    frozen = [m for m in model.modules() if isinstance(m, FrozenLinear)]
    assert every == sum(fp8_eligible(m) for m in frozen) > n
    assert {"img_in", "final_layer.linear", "double_blocks.0.img_mod.lin"} <= {
        names[id(m)] for m in frozen if m.fp8 is not None}

    # an explicit layer list overrides the recipe's choice (the benchmark's "only=CLASS")
    assert enable_fp8_compute(model, "cpu", layers=[model.img_in]) == 1 and model.img_in.fp8 is not None


def test_without_per_row_kernels_the_recipe_falls_back_to_per_tensor(monkeypatch):
    monkeypatch.setattr(fp8, "supports_fp8_matmul", lambda d: True)
    monkeypatch.setattr(fp8, "_ROWWISE", {("cpu", fp8.E4M3): False, ("cpu", fp8.E5M2): False})
    layer = _fp8_layer()
    enable_fp8_compute(layer, "cpu")
    assert not layer.fp8.recipe.rowwise and not layer.fp8.grad_rowwise
    monkeypatch.setattr(fp8, "_ROWWISE", {("cpu", fp8.E4M3): True, ("cpu", fp8.E5M2): False})
    enable_fp8_compute(layer, "cpu")
    assert layer.fp8.recipe.rowwise and not layer.fp8.grad_rowwise
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(8)).bfloat16().requires_grad_()
    layer(x).sum().backward()       # per-row forward, per-tensor input-gradient
    assert torch.isfinite(x.grad).all()
