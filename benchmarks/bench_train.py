"""Speed and memory of LoRA training on a full-size Flux (issue 5).

Builds FLUX.1-dev's transformer (FluxParams(): 19 double + 38 single blocks, hidden
3072) with random float8_e4m3fn weights generated tensor by tensor on the GPU (no
host copy of the model), attaches a rank-16 LoRA on the default "all" target set,
and trains batch 1 with T5 length 512 at each resolution, through the engine's
own step (fluxtrain.train.MicroStep forward + backward, clip, optimizer step, exactly
as fluxtrain.train.train runs it).

Every configuration runs in a fresh child process, so peak VRAM and peak host
RSS belong to that configuration alone. Step times are taken inside the loop
(CUDA events around each step, synchronised), median over --steps after --warmup.

Modes:  fast  no gradient checkpointing
        lean  every block checkpointed
        auto  fluxtrain.memory.plan() picks checkpointing / offload from free VRAM
Compute: bf16 (weights cast per call) or fp8 (torch._scaled_mm on float8 tensor cores).
Offload: none | aimdo | pinned (frozen weights in host memory, fluxtrain.offload).
--free-gb N: a ballast allocation leaves only N GB of the card free (both torch and
aimdo then see an N GB card).
Configuration keys of --configs / suites beyond the grid's: fp8_recipe ({field: value}
of fluxtrain.fp8.Fp8Recipe), fp8_keep_transposed, fp8_backward, compile, graphs,
other_sizes (resolutions stepped twice each before the timed one, as a dataset with
several buckets does), prepare_graphs (default true: with graphs, every size's graph is
captured up front as train() does; false captures each size when first stepped),
compile_dynamic (compile_blocks' `dynamic`), profile, random_up, grads_file, resident_gb,
adapter / lokr_factor / lokr_full_matrix (TrainConfig's; FLOPs are counted as a LoRA's).
Every result records file_bytes, the size of the adapter file training would write.

FLOPs (for MFU) are counted exactly per matmul, model FLOPs only: each frozen
linear 2*M*K*N forward + 2*M*K*N input-gradient (no weight gradient: the base is
frozen); each LoRA 6*M*r*(K+N) (forward, both gradients); attention 4*T^2*D
forward and 8*T^2*D backward. Recompute (checkpointing) is not counted, so MFU
of lean and fast modes compare the same useful work. MFU is against the card's
dense bf16 peak (989.4 TFLOP/s for H100 SXM / H200).

    python benchmarks/bench_train.py --out benchmarks/results/DATE-h100.json
"""

from __future__ import annotations

import argparse
import os
import tempfile
import json
import statistics
import subprocess
import sys
import time
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DENSE_BF16_PEAK = {"H100 PCIe": 756e12, "H100": 989.4e12, "H200": 989.4e12, "H800": 989.4e12,
                   "A100": 312e12, "L40S": 362e12, "RTX 4090": 165e12}


def bf16_peak(name: str) -> float | None:
    for key in sorted(DENSE_BF16_PEAK, key=len, reverse=True):
        if key in name:
            return DENSE_BF16_PEAK[key]
    return None


# ---------------------------------------------------------------- FLOPs

def model_flops(p, img_tokens: int, txt_tokens: int, rank: int, lora_layers: set[str],
                batch: int = 1) -> float:
    """Model FLOPs of one training step (see module doc)."""
    h, m = p.hidden_size, p.mlp_hidden_dim
    total = 0.0

    def linear(name, rows, k, n, grad_in=True):
        nonlocal total
        rows *= batch
        total += 2 * rows * k * n * (2 if grad_in else 1)
        if name in lora_layers:
            total += 6 * rows * rank * (k + n)

    def attention(tokens):
        nonlocal total
        total += batch * 12 * tokens * tokens * h  # 4 T^2 D forward + 8 T^2 D backward

    N, L, T = img_tokens, txt_tokens, img_tokens + txt_tokens
    linear("img_in", N, p.in_channels, h, grad_in=False)
    linear("txt_in", L, p.context_in_dim, h, grad_in=False)
    for e in ("time_in", "vector_in", "guidance_in"):
        linear(f"{e}.in_layer", 1, 256 if e != "vector_in" else p.vec_in_dim, h, grad_in=False)
        linear(f"{e}.out_layer", 1, h, h, grad_in=False)
    for i in range(p.depth):
        for s, rows in (("img", N), ("txt", L)):
            b = f"double_blocks.{i}.{s}"
            linear(f"{b}_mod.lin", 1, h, 6 * h)
            linear(f"{b}_attn.qkv", rows, h, 3 * h)
            linear(f"{b}_attn.proj", rows, h, h)
            linear(f"{b}_mlp.0", rows, h, m)
            linear(f"{b}_mlp.2", rows, m, h)
        attention(T)
    for i in range(p.depth_single_blocks):
        b = f"single_blocks.{i}"
        linear(f"{b}.modulation.lin", 1, h, 3 * h)
        linear(f"{b}.linear1", T, h, 3 * h + m)
        linear(f"{b}.linear2", T, h + m, h)
        attention(T)
    linear("final_layer.adaLN_modulation.1", 1, h, 2 * h)
    linear("final_layer.linear", N, h, p.out_channels)
    return total


# ---------------------------------------------------------------- one configuration (child)

def bench_params(tiny: bool = False):
    """FLUX.1-dev's shapes, or (tiny) the same structure and input widths with a tiny
    hidden size and 2 + 2 blocks: a CPU smoke test of a harness (also the kohya peer's)."""
    from fluxtrain.params import FluxParams
    if tiny:
        return FluxParams(vec_in_dim=768, context_in_dim=4096, hidden_size=256, num_heads=2,
                          depth=2, depth_single_blocks=2)
    return FluxParams()


def random_fp8_model(params, device, seed: int = 0, host: bool = False):
    """Flux with random float8_e4m3fn weights drawn on the GPU one tensor at a time
    (same scaling as fluxtrain.synthetic: N(0, (0.5/sqrt(fan_in))^2), biases 0.02,
    norm scales 1). `host`: weights land in host memory (for offload), the rest on
    the GPU."""
    import torch
    from fluxtrain.flux import Flux
    from fluxtrain.synthetic import BIAS_STD, WEIGHT_GAIN

    model = Flux(params, device="cpu" if host else device, dtype=torch.float8_e4m3fn)
    g = torch.Generator(device=device)
    with torch.no_grad():
        for name, t in model.named_parameters():
            if name.endswith(".scale"):
                value = torch.ones(t.shape, device=device)
            else:
                g.manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
                value = torch.randn(t.shape, generator=g, device=device)
                value *= WEIGHT_GAIN / t.shape[1] ** 0.5 if t.dim() == 2 else BIAS_STD
            if t.dim() == 2:
                t.copy_(value.to(torch.float8_e4m3fn))
            else:  # biases and norm scales: bf16, as in released float8 files' small tensors
                t.data = value.to(torch.bfloat16)
    return model


def run_config(cfg: dict) -> dict:
    """One configuration, through the engine's own placement (plan_placement, then
    apply_placement) and training step (MicroStep, optimizer_step). The configuration's
    keys pick the plan: mode fast / lean / auto (the planner), offload none / aimdo /
    pinned, compute bf16 / fp8, compile, graphs; experiment keys (fp8_recipe,
    fp8_keep_transposed, fp8_backward, resident_gb, compile_dynamic) override the plan."""
    offload_kind = cfg.get("offload", "none")
    if offload_kind == "aimdo" or cfg["mode"] == "auto":
        from fluxtrain import offload as _offload
        _offload.init_aimdo()      # before torch touches the device: aimdo hooks the driver
    import dataclasses
    import resource

    import torch
    from fluxtrain import fp8, memory
    from fluxtrain.layers import enable_fp8_compute
    from fluxtrain.adapters import adapter_cost, attach_adapters, save_adapter_file
    from fluxtrain.placement import (DeviceInfo, apply_placement, compile_blocks,
                                     plan_placement)
    from fluxtrain.train import (MicroStep, TrainConfig, make_optimizer, optimizer_step,
                                 step_generator)

    device = torch.device(cfg.get("device", "cuda"))
    cuda = device.type == "cuda"
    torch.ones(1, device=device)
    ballast = None
    if cfg.get("free_gb") and cuda:
        free, _ = torch.cuda.mem_get_info()
        keep = int(cfg["free_gb"] * 1e9)
        if free > keep:
            ballast = torch.empty(free - keep, dtype=torch.uint8, device=device)
    probed = DeviceInfo.probe(device)
    free_at_start = probed.free_bytes if cuda else 80 * 2**30

    params = bench_params(bool(cfg.get("tiny")))
    res = cfg["resolution"]
    img_tokens = (res // 16) ** 2
    txt_tokens = cfg.get("t5_len", 512)
    mode = cfg["mode"]
    config = TrainConfig(rank=cfg["rank"], alpha=float(cfg["rank"]), targets="all", seed=0,
                         memory="offload" if mode == "lean" and offload_kind != "none" else mode,
                         learning_rate=cfg.get("lr", 1e-4), fp8_compute=cfg["compute"] == "fp8",
                         compile_blocks=bool(cfg.get("compile")), cuda_graphs=bool(cfg.get("graphs")),
                         adapter=cfg.get("adapter", "lora"), lokr_factor=cfg.get("lokr_factor", 16),
                         lokr_full_matrix=cfg.get("lokr_full_matrix", True))
    cost = adapter_cost(config.adapter_config(), params)
    job = memory.Job(params, img_tokens, txt_tokens, 1, cost.parameters, 1.0, steps=1000,
                     extra_units=cost.extra_units, extra_block_elements=cost.extra_block_elements)
    # The benchmark asks for its switches by name: each is on when asked and possible here.
    plan = plan_placement(job, config, dataclasses.replace(probed, free_bytes=free_at_start)
                          if cuda else probed)
    plan = dataclasses.replace(
        plan, compile_blocks=bool(cfg.get("compile")) and cuda,
        fp8_compute=cfg["compute"] == "fp8" and fp8.supports_fp8_matmul(device),
        fp8_keep_transposed=bool(cfg.get("fp8_keep_transposed")) and not plan.offload,
        fp8_recipe=fp8.Fp8Recipe(**cfg.get("fp8_recipe", {})),
        offload_backend="pinned" if offload_kind == "pinned" else "aimdo",
        resident_bytes=(int(cfg["resident_gb"] * 1e9) if cfg.get("resident_gb") is not None
                        else plan.resident_bytes))
    if plan.offload and offload_kind == "none":
        offload_kind = "aimdo"

    t0 = time.perf_counter()
    model = random_fp8_model(params, device, seed=0, host=plan.offload)
    model.requires_grad_(False)
    build_s = time.perf_counter() - t0

    adapters = attach_adapters(model, config.adapter_config(), seed=config.seed, device=device)
    for a in adapters.values():
        if cfg.get("random_up"):  # nonzero up: every LoRA factor gets a gradient
            with torch.no_grad():
                gen = torch.Generator(device=device).manual_seed(1)
                a.up.copy_(torch.randn(a.up.shape, generator=gen, device=device) * 1e-3)
    offloader = apply_placement(model, dataclasses.replace(
        plan, compile_blocks=plan.compile_blocks and cfg.get("compile_dynamic") is None), device)
    if plan.compile_blocks and cfg.get("compile_dynamic") is not None:
        compile_blocks(model, dynamic=cfg["compile_dynamic"])
    if plan.fp8_compute and cfg.get("fp8_backward") is False:   # float8 forward only
        enable_fp8_compute(model, device, backward=False, recipe=plan.fp8_recipe)
    n_fp8 = sum(getattr(m, "fp8", None) is not None for m in model.modules())
    lora_params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = make_optimizer(config, lora_params, device)
    micro_step = MicroStep(model, lora_params, config, device)

    def make_batch(res):
        g = torch.Generator(device=device).manual_seed(123)
        h = w = res // 8
        return {"latent": torch.randn(1, 16, h, w, generator=g, device=device),
                "t5": torch.randn(1, txt_tokens, 4096, generator=g, device=device) * 0.2,
                "clip": torch.randn(1, 768, generator=g, device=device)}
    batch = make_batch(res)

    times, losses = [], []
    warmup, steps = cfg["warmup"], cfg["steps"]
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    grads_saved = None

    def one_step(step: int) -> float:
        nonlocal grads_saved
        generator = step_generator(config.seed, step, device)
        loss = micro_step(batch, generator)
        if step == 0 and cfg.get("grads_file"):
            grads_saved = {f"{n}.{k}": getattr(a, k).grad.detach().float().cpu()
                           for n, a in adapters.items() for k in ("down", "up")}
        optimizer_step(micro_step, optimizer, config)
        return loss

    other_sizes_s = None
    t_other = time.perf_counter()
    if cfg.get("other_sizes") and cfg.get("prepare_graphs", True):
        micro_step.prepare([make_batch(r) for r in [*cfg["other_sizes"], res]],
                           step_generator(config.seed, 0, device))
    if cfg.get("other_sizes"):
        # As a dataset with several buckets does: steps at other sizes first, so that the
        # compiled blocks have seen more than one shape (dynamo then recompiles them with
        # dynamic shapes, or per size with compile_dynamic false) before the timed size.
        for other in cfg["other_sizes"]:
            batch = make_batch(other)
            for _ in range(2):
                one_step(0)
        batch = make_batch(res)
        if cuda:
            torch.cuda.synchronize()
        other_sizes_s = time.perf_counter() - t_other
    t_first = time.perf_counter()
    first_steps_s = None
    for step in range(warmup + steps):
        if step == warmup:
            first_steps_s = time.perf_counter() - t_first
        start, end = StepTimer(cuda), StepTimer(cuda)
        start.record()
        loss = one_step(step)
        end.record()
        end.synchronize()
        losses.append(loss)
        if step >= warmup:
            times.append(start.elapsed_time(end) / 1e3)
    if grads_saved is not None:
        torch.save(grads_saved, cfg["grads_file"])
    kernels = None
    if cfg.get("profile") and cuda:
        kernels = profile_steps(lambda s: one_step(warmup + steps + s), steps=3)

    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = bf16_peak(name)
    flops = model_flops(params, img_tokens, txt_tokens, cfg["rank"], set(adapters))
    med = statistics.median(times)
    out = dict(cfg, offload=offload_kind,
               s_per_step=med, s_per_step_min=min(times), s_per_step_max=max(times),
               steps_timed=len(times), step_times=times,
               tflop_per_step=flops / 1e12, achieved_tflops=flops / med / 1e12,
               mfu=(flops / med / peak) if peak else None, bf16_peak_tflops=(peak or 0) / 1e12,
               peak_vram_allocated_gib=(torch.cuda.max_memory_allocated() if cuda else 0) / 2**30,
               peak_vram_reserved_gib=(torch.cuda.max_memory_reserved() if cuda else 0) / 2**30,
               vram_reserved_after_gib=(torch.cuda.memory_reserved() if cuda else 0) / 2**30,
               peak_host_rss_gib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
               free_vram_at_start_gib=free_at_start / 2**30,
               ballast_gib=(ballast.numel() / 2**30) if ballast is not None else 0.0,
               build_s=build_s, other_sizes_s=other_sizes_s, warmup_s=first_steps_s,
               losses=losses, losses_finite=all(map(lambda v: v == v and abs(v) < 1e30, losses)),
               fp8_layers=n_fp8, lora_layers=len(adapters),
               lora_params=sum(p.numel() for p in lora_params),
               device=name, torch=torch.__version__,
               plan=plan.memory.to_dict() if plan.memory is not None else None,
               placement=plan.summary,
               offload_stats=offloader.stats() if offloader is not None else None,
               # graphs asked for but off at the end: a capture failed (out of memory?)
               graphs_captured=len(micro_step.graphs.graphs) if micro_step.graphs else 0,
               kernels=kernels)
    est = memory.estimate(job, model.recomputed_double, model.recomputed_single,
                          resident_bytes=(offloader.stats()["resident_bytes"] if offloader else None),
                          fp8_compute=cfg["compute"] == "fp8", compiled=bool(cfg.get("compile")))
    out["predicted_peak_gib"] = est["total"] / 2**30
    # the adapter file as training writes it (bf16; alpha and DoRA's magnitude float32)
    with tempfile.TemporaryDirectory() as folder:
        written = save_adapter_file(Path(folder) / "adapter.safetensors", adapters, config.adapter_config())
        out["file_bytes"] = os.path.getsize(written)
    out["predicted"] = {k: v / 2**30 for k, v in est.items()}
    return out


def profile_steps(step, steps: int = 3, top: int = 30) -> dict:
    """Where the GPU time of `steps` more steps goes: per-step milliseconds of the top
    kernels and of kernel families (matmul, attention, fused/elementwise, copy)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for s in range(steps):
            step(s)
        torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        ms = getattr(e, "device_time_total", getattr(e, "cuda_time_total", 0)) / 1e3 / steps
        if ms > 0 and e.device_type.name == "CUDA":
            rows.append((e.key, ms, e.count // steps))
    families = {}
    for name, ms, _ in rows:
        families[_kernel_family(name)] = families.get(_kernel_family(name), 0.0) + ms
    rows.sort(key=lambda r: -r[1])
    return {"ms_per_step_total": sum(r[1] for r in rows),
            "families_ms": {k: round(v, 2) for k, v in sorted(families.items(), key=lambda kv: -kv[1])},
            "top": [{"kernel": n[:120], "ms": round(ms, 3), "calls": c} for n, ms, c in rows[:top]]}


def _kernel_family(name: str) -> str:
    n = name.lower()
    if "triton" in n:        # before matmul: inductor names kernels after the ops around them
        return "fused (triton)"
    if "flash" in n or "fmha" in n or "attention" in n:
        return "attention"
    if any(k in n for k in ("gemm", "cutlass", "sm90", "nvjet", "xmma", "matmul", "scaled_mm")):
        return "matmul"
    if "memcpy" in n or "copy" in n or "memset" in n:
        return "copy"
    if "reduce" in n or "norm" in n:
        return "reduction"
    return "elementwise/other"


class StepTimer:
    """CUDA event, or a host clock on a CPU (smoke tests of the harness)."""

    def __init__(self, cuda: bool):
        import torch
        self.event = torch.cuda.Event(enable_timing=True) if cuda else None
        self.t = 0.0

    def record(self):
        if self.event is not None:
            self.event.record()
        else:
            self.t = time.perf_counter()

    def synchronize(self):
        if self.event is not None:
            self.event.synchronize()

    def elapsed_time(self, end) -> float:
        if self.event is not None:
            return self.event.elapsed_time(end.event)
        return (end.t - self.t) * 1e3


# ---------------------------------------------------------------- driver (parent)

def configs_from_args(args) -> list[dict]:
    out = []
    for res in args.resolutions:
        for mode in args.modes:
            for compute in args.compute:
                out.append(dict(resolution=res, mode=mode, compute=compute, rank=args.rank,
                                steps=args.steps, warmup=args.warmup, offload=args.offload,
                                free_gb=args.free_gb, t5_len=args.t5_len,
                                device=args.device, tiny=args.tiny, compile=args.compile,
                                graphs=args.graphs))
    return out


PEERS = {"kohya": "kohya_flux.py", "comfyui": "comfyui_trainlora.py"}


def run_peer(cfg: dict, timeout: float) -> dict:
    """A peer trainer's step on the same random weights (benchmarks/peers/), in its own
    child process; its JSON mapped onto this benchmark's keys. fast = no checkpointing,
    lean = every block checkpointed, as for our own configurations."""
    import tempfile
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "peer.json"
        cmd = [sys.executable, str(Path(__file__).parent / "peers" / PEERS[cfg["peer"]]),
               "--resolution", str(cfg["resolution"]),
               "--checkpointing", "off" if cfg["mode"] == "fast" else "on",
               "--steps", str(cfg["steps"]), "--warmup", str(cfg["warmup"]), "--rank", str(cfg["rank"]),
               "--t5-len", str(cfg["t5_len"]), "--seed", "0", "--device", cfg["device"],
               "--out", str(out)] + (["--tiny"] if cfg.get("tiny") else [])
        began = time.perf_counter()
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return dict(cfg, error=f"timed out after {timeout:.0f} s")
        if not out.exists():
            detail = (p.stderr or p.stdout).strip().splitlines()[-1:]
            return dict(cfg, error=f"peer wrote no result (exit {p.returncode}) {detail}"[:400])
        peer = json.loads(out.read_text())
    res = dict(cfg, peer_result=peer, wall_s=time.perf_counter() - began, compute=peer.get("peer", cfg["peer"]))
    if not peer.get("ok"):
        return dict(res, error="peer cannot run here: " + str(peer.get("reason", "?"))[:300])
    return dict(res, s_per_step=peer["step_s_median"], step_times=peer.get("step_s"),
                peak_vram_allocated_gib=peer["peak_alloc_gib"],
                peak_vram_reserved_gib=peer["peak_reserved_gib"],
                peak_host_rss_gib=peer["peak_rss_gib"], mfu=None, achieved_tflops=0.0)


def run_child(cfg: dict, timeout: float) -> dict:
    if cfg.get("peer"):
        return run_peer(cfg, timeout)
    cmd = [sys.executable, __file__, "--child", json.dumps(cfg)]
    began = time.perf_counter()
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return dict(cfg, error=f"timed out after {timeout:.0f} s")
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr or p.stdout).strip().splitlines()[-40:]
        err = next((ln for ln in reversed(tail) if "Error" in ln or "error" in ln), tail[-1] if tail else "")
        return dict(cfg, error=err[:400], stderr_tail=tail, returncode=p.returncode)
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_s"] = time.perf_counter() - began
    return res


def compare_grads(results: list[dict]) -> None:
    """Configurations sharing a grads_file prefix ('<group>.<name>.pt') are compared with
    the first of their group (the uncapped reference): bitwise, and max relative error."""
    import torch
    groups: dict[str, dict] = {}
    for r in results:
        f = r.get("grads_file")
        if not f or "error" in r or not Path(f).exists():
            continue
        group = Path(f).name.split(".")[0]
        if group not in groups:
            groups[group] = r
            continue
        ref = torch.load(groups[group]["grads_file"])
        got = torch.load(f)
        worst, equal = 0.0, True
        for k, g in ref.items():
            d = got[k]
            equal &= torch.equal(g, d)
            worst = max(worst, ((g - d).norm() / g.norm().clamp_min(1e-30)).item())
        r["grads_vs_reference"] = dict(reference=groups[group]["grads_file"], bitwise_equal=equal,
                                       max_rel_error=worst, tensors=len(ref))


def table(results: list[dict]) -> str:
    rows = ["res  mode compute  offload free | s/step   MFU   TFLOP/s | alloc resvd pred GiB | RSS  | grads"]
    for r in results:
        if r.get("peer"):
            r = dict(r, compute=r["peer"], offload="peer")
        comp = (r["compute"] + ("-fw" if r["compute"] == "fp8" and r.get("fp8_backward") is False
                                else "") + ("T" if r.get("fp8_keep_transposed") else "")
                + ("+c" if r.get("compile") else "") + ("+g" if r.get("graphs") else ""))
        if r.get("adapter", "lora") != "lora":
            comp += f" {r['adapter']}"
        head = (f"{r['resolution']:<4} {r['mode']:<4} {comp:<8} {r.get('offload','none'):<7}"
                f" {str(r.get('free_gb') or '-'):>4} |")
        if "error" in r:
            rows.append(head + " ERROR " + r["error"][:90])
            continue
        mfu = f"{100 * r['mfu']:5.1f}%" if r.get("mfu") else "  -  "
        rows.append(head + f" {r['s_per_step']:.3f} {mfu} {r['achieved_tflops']:6.0f} |"
                    f" {r['peak_vram_allocated_gib']:5.1f} {r['peak_vram_reserved_gib']:5.1f}"
                    f" {r.get('predicted_peak_gib', 0):5.1f}    |"
                    f" {r['peak_host_rss_gib']:4.1f} | {_grads(r)}"
                    + (f" | file {r['file_bytes'] / 2**20:.0f} MiB" if r.get("file_bytes") else ""))
    return "\n".join(rows + peer_ratios(results))


def peer_ratios(results: list[dict]) -> list[str]:
    """Peer step time over ours, same resolution and memory mode (our fastest such run)."""
    ours: dict[tuple, float] = {}
    for r in results:
        if not r.get("peer") and "error" not in r and r.get("offload", "none") == "none" \
                and r["mode"] in ("fast", "lean"):
            key = (r["resolution"], r["mode"])
            ours[key] = min(ours.get(key, float("inf")), r["s_per_step"])
    rows = []
    for r in results:
        key = (r.get("resolution"), r.get("mode"))
        if r.get("peer") and "error" not in r and key in ours:
            rows.append(f"{r['peer']} {key[0]} {key[1]}: {r['s_per_step']:.3f} s/step = "
                        f"{r['s_per_step'] / ours[key]:.2f}x our {ours[key]:.3f}")
    return rows


def _grads(r) -> str:
    g = r.get("grads_vs_reference")
    if not g:
        return "ref" if r.get("grads_file") else ""
    return "bitwise" if g["bitwise_equal"] else f"rel {g['max_rel_error']:.1e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolutions", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--modes", nargs="+", default=["fast", "lean"], choices=["fast", "lean", "auto"])
    ap.add_argument("--compute", nargs="+", default=["bf16", "fp8"], choices=["bf16", "fp8"])
    ap.add_argument("--offload", default="none", choices=["none", "aimdo", "pinned"])
    ap.add_argument("--free-gb", type=float, default=None,
                    help="leave only this many GB of VRAM free (ballast allocation)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--t5-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="stop starting new configurations after this many seconds")
    ap.add_argument("--compile", action="store_true", help="torch.compile every block")
    ap.add_argument("--graphs", action="store_true", help="replay each step as a CUDA graph")
    ap.add_argument("--tiny", action="store_true", help="tiny widths: a CPU smoke test of the harness")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--configs", type=str, default=None,
                    help="JSON list of configuration dicts (overrides the grid)")
    ap.add_argument("--suite", type=str, default=None,
                    help="a named list of configurations from benchmarks/suites.json")
    ap.add_argument("--child", type=str, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.child is not None:
        print("RESULT " + json.dumps(run_config(json.loads(args.child))), flush=True)
        return

    if args.suite:
        suites = json.loads((Path(__file__).parent / "suites.json").read_text())
        cfgs = [c for name in args.suite.split(",") for c in suites[name]]
    elif args.configs:
        cfgs = json.loads(args.configs)
    else:
        cfgs = configs_from_args(args)
    defaults = dict(rank=args.rank, steps=args.steps, warmup=args.warmup, offload=args.offload,
                    free_gb=args.free_gb, t5_len=args.t5_len, device=args.device, tiny=args.tiny,
                    compile=args.compile, graphs=args.graphs)
    results = []
    began = time.perf_counter()
    for cfg in cfgs:
        cfg = {**defaults, **cfg}
        if args.budget_s and time.perf_counter() - began > args.budget_s:
            results.append(dict(cfg, error="not run: the invocation's time budget was spent"))
            continue
        r = run_child(cfg, args.timeout)
        results.append(r)
        brief = {k: r.get(k) for k in ("resolution", "mode", "compute", "offload", "free_gb",
                                       "s_per_step", "peak_vram_allocated_gib", "file_bytes", "error")}
        print(json.dumps(brief), flush=True)
        if args.out:
            _write(args.out, args, results)
    compare_grads(results)
    if args.out:
        _write(args.out, args, results)
    print(table(results))


def _write(path: Path, args, results):
    from fluxtrain.files import atomic_write_bytes
    doc = {"command": " ".join([Path(sys.executable).name] + sys.argv),
           "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "flop_count": "exact matmul count, model FLOPs only (no recompute): frozen linear "
                         "2MKN fwd + 2MKN input-grad; LoRA 6Mr(K+N); attention 4T^2D fwd + 8T^2D bwd",
           "results": results}
    atomic_write_bytes(path, json.dumps(doc, indent=1).encode())


if __name__ == "__main__":
    main()
