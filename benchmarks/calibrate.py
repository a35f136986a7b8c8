"""The ceilings the training benchmark is read against, measured on the card at hand:
bf16 and float8 matmul rates at Flux's shapes, the cost of casting a float8 weight,
float8 quantisation of activations (fused and eager), host-to-device bandwidth
(pinned and pageable), and whether comfy-aimdo initialises its device here.

    python benchmarks/calibrate.py --out calib.json
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def bench(fn, iters=20, warmup=3):
    import torch
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(iters):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3)
    times.sort()
    return times[len(times) // 2]


def matmuls():
    import torch
    from fluxtrain import fp8
    dev = "cuda"
    out = []
    # (M, K, N): single-block linear1 / linear2, double-block mlp.0 / qkv, at 1024^2 and 512^2.
    shapes = [(4608, 3072, 21504), (4608, 15360, 3072), (4096, 3072, 12288), (4096, 3072, 9216),
              (1536, 3072, 21504), (1536, 15360, 3072), (1024, 3072, 12288)]
    for m, k, n in shapes:
        x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
        w8 = (torch.randn(n, k, device=dev) * 0.02).to(torch.float8_e4m3fn)
        wb = w8.to(torch.bfloat16)
        one = torch.ones((), device=dev)
        xq, sx = fp8.quantize(x)
        flop = 2 * m * k * n
        t_bf16 = bench(lambda: x @ wb.t())
        t_cast = bench(lambda: w8.to(torch.bfloat16))
        t_fp8 = bench(lambda: torch._scaled_mm(xq, w8.t(), sx, one, out_dtype=torch.bfloat16,
                                               use_fast_accum=True))
        t_fp8_slow = bench(lambda: torch._scaled_mm(xq, w8.t(), sx, one, out_dtype=torch.bfloat16))
        t_q = bench(lambda: fp8.quantize(x))
        qc = torch.compile(fp8.quantize)
        t_q_eager = bench(lambda: qc(x, fp8.E4M3))
        t_full_fp8 = bench(lambda: fp8.linear_fp8(x, w8, one, None, torch.bfloat16))
        t_full_bf16 = bench(lambda: torch.nn.functional.linear(x, w8.to(torch.bfloat16)))
        g = torch.randn(m, n, device=dev, dtype=torch.bfloat16)
        t_grad_fp8 = bench(lambda: fp8.grad_input_fp8(g, w8, one, torch.bfloat16))
        t_grad_bf16 = bench(lambda: g @ w8.to(torch.bfloat16))
        out.append(dict(shape=[m, k, n], bf16_tflops=flop / t_bf16 / 1e12,
                        fp8_fastacc_tflops=flop / t_fp8 / 1e12, fp8_tflops=flop / t_fp8_slow / 1e12,
                        cast_ms=t_cast * 1e3, quant_ms=t_q * 1e3, quant_compiled_ms=t_q_eager * 1e3,
                        linear_fp8_ms=t_full_fp8 * 1e3, linear_bf16cast_ms=t_full_bf16 * 1e3,
                        grad_fp8_ms=t_grad_fp8 * 1e3, grad_bf16cast_ms=t_grad_bf16 * 1e3))
        print(json.dumps(out[-1]), flush=True)
    return out


def transfers():
    import torch
    n = 512 * 2**20
    host_p = torch.empty(n, dtype=torch.uint8, pin_memory=True)
    host = torch.empty(n, dtype=torch.uint8)
    host.fill_(1)
    host_p.fill_(1)
    dev = torch.empty(n, dtype=torch.uint8, device="cuda")
    d2 = torch.empty_like(dev)
    r = dict(h2d_pinned_gbps=n / bench(lambda: dev.copy_(host_p, non_blocking=True), 10) / 1e9,
             h2d_pageable_gbps=n / bench(lambda: dev.copy_(host), 5) / 1e9,
             d2d_gbps=2 * n / bench(lambda: d2.copy_(dev), 10) / 1e9)
    print(json.dumps(r), flush=True)
    return r


AIMDO_PROBE = r"""
import json, sys
sys.path.insert(0, %r)
from comfy_aimdo import control
r = {"init": bool(control.init())}
import torch
torch.ones(1, device="cuda")
r["init_device"] = bool(control.init_device(0))
if r["init_device"]:
    from comfy_aimdo import model_vbar
    from comfy_aimdo.torch import aimdo_to_tensor
    vbar = model_vbar.ModelVBAR(4 << 30, 0)
    allocs = [vbar.alloc(48 << 20) for _ in range(4)]
    sig = [model_vbar.vbar_fault(a) for a in allocs]
    r["fault_ok"] = [s is not None for s in sig]
    views = [aimdo_to_tensor(a, torch.device("cuda")) for a in allocs]
    for i, v in enumerate(views):
        v.fill_(i + 1)
    copies = [v.clone() for v in views]
    del views
    for a in allocs:
        model_vbar.vbar_unpin(a)
    sig2 = [model_vbar.vbar_fault(a) for a in allocs]
    r["sig_same_after_refault"] = [model_vbar.vbar_signature_compare(a, b) for a, b in zip(sig, sig2)]
    views = [aimdo_to_tensor(a, torch.device("cuda")) for a in allocs]
    r["content_kept"] = [bool((v == i + 1).all()) for i, v in enumerate(views)]
    del views
    for a in allocs:
        model_vbar.vbar_unpin(a)
    r["loaded_size"] = vbar.loaded_size()
    r["residency"] = vbar.get_residency()[:8]
    print("AIMDO " + json.dumps(r), flush=True)
    # Pressure: a torch allocation larger than what is free evicts unpinned VBAR pages.
    free, total = torch.cuda.mem_get_info()
    r["free_before_pressure_gib"] = free / 2**30
    try:
        big = torch.empty(int(free - (64 << 20)), dtype=torch.uint8, device="cuda")
    except Exception as e:
        r["pressure_error"] = repr(e)[:300]
        print("AIMDO " + json.dumps(r), flush=True)
        raise SystemExit(0)
    r["free_after_pressure_gib"] = torch.cuda.mem_get_info()[0] / 2**30
    sig3 = [model_vbar.vbar_fault(a) for a in allocs]
    r["fault_under_pressure"] = [s is not None for s in sig3]
    r["sig_same_under_pressure"] = [model_vbar.vbar_signature_compare(a, b) for a, b in zip(sig, sig3)]
    for a, s in zip(allocs, sig3):
        if s is not None:
            model_vbar.vbar_unpin(a)
    del big
    sig4 = [model_vbar.vbar_fault(a) for a in allocs]
    r["fault_after_release"] = [s is not None for s in sig4]
    r["sig_same_after_release"] = [model_vbar.vbar_signature_compare(a, b) for a, b in zip(sig, sig4)]
print("AIMDO " + json.dumps(r))
"""


def aimdo_probe():
    p = subprocess.run([sys.executable, "-c", AIMDO_PROBE % str(ROOT)], capture_output=True,
                       text=True, timeout=120)
    line = [ln for ln in p.stdout.splitlines() if ln.startswith("AIMDO ")]
    r = json.loads(line[-1][6:]) if line else {"error": (p.stderr or p.stdout)[-1500:],
                                               "returncode": p.returncode}
    print(json.dumps(r), flush=True)
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--skip", nargs="*", default=[])
    args = ap.parse_args()
    import torch
    doc = dict(device=torch.cuda.get_device_name(), capability=torch.cuda.get_device_capability(),
               torch=torch.__version__)
    for name, fn in (("aimdo", aimdo_probe), ("transfers", transfers), ("matmuls", matmuls)):
        if name not in args.skip:
            try:
                doc[name] = fn()
            except Exception as e:
                doc[name] = {"error": repr(e)}
                print(name, "failed:", repr(e), flush=True)
    if args.out:
        args.out.write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
