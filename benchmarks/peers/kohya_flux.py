#!/usr/bin/env python3
"""Peer runner (issue 5): kohya sd-scripts' Flux LoRA training step, base in float8 (--fp8_base).

Runs, on the same random float8_e4m3fn FLUX.1-dev weights bench_train.py builds
(`random_fp8_model(FluxParams(), device, seed)`), the per-step work of

    accelerate launch flux_train_network.py --mixed_precision bf16 --fp8_base
        --network_module networks.lora_flux --network_dim 16 --network_alpha 16
        --network_train_unet_only --optimizer_type AdamW --learning_rate 1e-4
        --timestep_sampling shift --discrete_flow_shift 3.1582 --model_prediction_type raw
        --guidance_scale 1.0 --cache_latents --cache_text_encoder_outputs --sdpa
        [--gradient_checkpointing]

(the Flux LoRA command of kohya's README), with kohya's own `library/flux_models.Flux` and
`networks/lora_flux.py`, batch 1, one random latent / T5 / CLIP-pooled sample. sd-scripts is
NOT part of this repository: a checkout is found through $KOHYA_SD_SCRIPTS (default
<repo>/.peers/sd-scripts, git-ignored) and put on sys.path.

How --fp8_base is reproduced (sd-scripts 48d368f):
  * flux_train_network.py:103-124  an fp8 checkpoint is loaded as is (no cast);
  * train_network.py:829-847       fp8_base -> unet_weight_dtype = float8_e4m3fn and
                                   `unet.to(dtype=float8_e4m3fn)`: EVERY floating parameter,
                                   biases and RMSNorm scales included, becomes float8;
  * train_network.py:849-851       requires_grad_(False), cast again (cast_unet() is True);
  * train_network.py:880 -> 360    accelerator.prepare(unet): device placement, and (bf16
                                   mixed precision) forward wrapped in autocast(bf16) with
                                   outputs converted to float32;
  * flux_train_network.py:363-377  the DiT call runs under accelerator.autocast() (bf16):
                                   every nn.Linear gets its float8 weight and bias cast to
                                   bf16 by autocast on each call (the cast copy is what
                                   autograd saves for the input gradient); nothing computes
                                   in float8; RMSNorm does `self.scale.float()`
                                   (flux_models.py:586-591); LoRA weights stay float32 and
                                   are autocast to bf16 as well.

The step (timed with CUDA events, as bench_train): noise, shift timestep sampling and the
noisy input (flux_train_utils.py:486-529), pack + img_ids (flux_utils.py:417-438),
guidance vector, the requires_grad_ of the inputs under checkpointing
(flux_train_network.py:348-356), the model call, unpack, raw prediction, target
noise - latents, l2 loss mean per sample x loss weight, mean (train_network.py:467-480),
backward (accelerate divides by the accumulation steps, 1), then what train_network.py's
loop does each step (1445-1475): accelerator.reduce of every LoRA gradient (a clone in a
single process), clip_grad_norm_(1.0), network.update_grad_norms() / update_norms(),
optimizer.step(), lr_scheduler.step(), zero_grad(set_to_none=True), the norms' and the
loss' .item() for the progress bar. update_grad_norms() is not guarded by the GGPO options
(lora_flux.py:284-302): every step it forms a full [out, in] matrix per LoRA layer (fp16
autocast). --bare-step leaves out the reduce clone, the norm updates and the .item()s.

    python benchmarks/peers/kohya_flux.py --resolution 1024 --checkpointing on --out r.json
    python benchmarks/peers/kohya_flux.py --tiny --resolution 64 --steps 2 --warmup 1 --out t.json

Always writes --out (and prints `RESULT <json>`), with "ok": false and the reason when
anything fails (import, out of memory, ...).
"""

from __future__ import annotations

import argparse
import gc
import importlib
import importlib.abc
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_SD_SCRIPTS = ROOT / ".peers" / "sd-scripts"
WHEELS = ROOT / ".whl"
ENV_VAR = "KOHYA_SD_SCRIPTS"

# Imported by the sd-scripts modules we use (library/utils.py:8-13, networks/lora_flux.py:14-15)
# only for image I/O, schedulers and text-encoder type hints: stubbed when not importable.
STUB_ROOTS = ("diffusers", "transformers", "torchvision", "cv2", "PIL")
# Needed for real (flux_models.py:18, lora_flux via sdxl_original_unet.py:32): pure-python
# wheels, imported straight from <repo>/.whl/*.whl when not installed.
PURE_PYTHON = ("einops",)

KOHYA_ARGS = dict(
    mixed_precision="bf16", fp8_base=True, network_module="networks.lora_flux",
    network_train_unet_only=True, train_blocks="all (default)", split_qkv=False,
    optimizer_type="AdamW", learning_rate=1e-4, lr_scheduler="constant", max_grad_norm=1.0,
    timestep_sampling="shift", discrete_flow_shift=3.1582, sigmoid_scale=1.0,
    model_prediction_type="raw", guidance_scale=1.0, loss_type="l2", apply_t5_attn_mask=False,
    cache_latents=True, cache_text_encoder_outputs=True, sdpa=True, blocks_to_swap=0,
    gradient_accumulation_steps=1, batch_size=1,
)
NUM_TRAIN_TIMESTEPS = 1000  # FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)


# ---------------------------------------------------------------- imports

def sd_scripts_dir() -> Path:
    return Path(os.environ.get(ENV_VAR) or DEFAULT_SD_SCRIPTS).expanduser().resolve()


def sd_scripts_commit(path: Path) -> str | None:
    f = path / "COMMIT"
    if f.is_file():
        return f.read_text().strip() or None
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except Exception:
        return None


class _StubMeta(type):
    """A stub class whose attributes are stub classes too (PIL.Image.Resampling, ...)."""

    def __getattr__(cls, name):
        if name.startswith("__"):
            raise AttributeError(name)
        sub = _stub_class(name, cls.__module__)
        setattr(cls, name, sub)
        return sub


def _stub_class(name: str, module: str) -> type:
    return _StubMeta(name, (), {"__module__": module, "__init__": lambda self, *a, **k: None})


class _StubModule(types.ModuleType):
    """Any attribute is a do-nothing class (usable as a base class, in type hints)."""

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        cls = _stub_class(name, self.__name__)
        setattr(self, name, cls)
        return cls


class _StubFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, fullname, path=None, target=None):
        if fullname.split(".")[0] in self.roots:
            return importlib.util.spec_from_loader(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        return _StubModule(spec.name)

    def exec_module(self, module):
        module.__path__ = []
        module.__kohya_peer_stub__ = True


def prepare_imports(sd_dir: Path, stub_all: bool = False) -> dict:
    """Make sd-scripts' library/ and networks/ importable; returns what was done."""
    info = {"sd_scripts": str(sd_dir), "wheels_on_path": [], "stubbed": [], "real": {}}
    if not (sd_dir / "library" / "flux_models.py").is_file():
        raise FileNotFoundError(
            f"no sd-scripts checkout at {sd_dir} (library/flux_models.py missing): set "
            f"{ENV_VAR} to a checkout of https://github.com/kohya-ss/sd-scripts")
    for name in PURE_PYTHON:
        try:
            importlib.import_module(name)
        except ImportError:
            wheels = sorted(WHEELS.glob(f"{name}-*-py3-none-any.whl"))
            if not wheels:
                raise ImportError(f"{name} is not installed and no {WHEELS}/{name}-*-py3-none-any.whl")
            sys.path.append(str(wheels[-1]))  # a pure-python wheel is a zip importable as is
            importlib.import_module(name)
            info["wheels_on_path"].append(wheels[-1].name)
        mod = sys.modules[name]
        info["real"][name] = getattr(mod, "__version__", "?")
    stub = []
    for name in STUB_ROOTS:
        if stub_all:
            stub.append(name)
            continue
        try:
            mod = importlib.import_module(name)
            info["real"][name] = getattr(mod, "__version__", "?")
        except Exception as e:  # noqa: BLE001 - anything that stops the import: stub it
            for k in [k for k in sys.modules if k == name or k.startswith(name + ".")]:
                del sys.modules[k]
            stub.append(name)
            info.setdefault("stub_reasons", {})[name] = f"{type(e).__name__}: {e}"[:200]
    if stub:
        sys.meta_path.insert(0, _StubFinder(stub))
        info["stubbed"] = stub
    sys.path.insert(0, str(sd_dir))
    return info


def import_kohya(sd_dir: Path):
    flux_models = importlib.import_module("library.flux_models")
    lora_flux = importlib.import_module("networks.lora_flux")
    for m in (flux_models, lora_flux):
        f = Path(m.__file__).resolve()
        if sd_dir not in f.parents:
            raise ImportError(f"{m.__name__} came from {f}, not from {sd_dir}: another "
                              "'library' or 'networks' package shadows sd-scripts")
    return flux_models, lora_flux


def _bench_train():
    spec = importlib.util.spec_from_file_location("_bench_train_for_peer",
                                                  ROOT / "benchmarks" / "bench_train.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _fp8_autocast_works(device) -> bool:
    import torch
    try:
        lin = torch.nn.Linear(16, 16, device=device).to(torch.float8_e4m3fn)
        x = torch.randn(2, 16, device=device, requires_grad=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            y = lin(x)
        y.float().sum().backward()
        return bool(torch.isfinite(x.grad).all())
    except Exception:
        return False


# ---------------------------------------------------------------- the run

def run(args, out: dict) -> dict:
    """Fills `out` as it goes (what is there survives a failure)."""
    import torch
    import torch.nn.functional as F

    sd_dir = sd_scripts_dir()
    settings = {"kohya_args": dict(KOHYA_ARGS, network_dim=args.rank, network_alpha=float(args.rank),
                                   gradient_checkpointing=args.checkpointing == "on")}
    out["settings"] = settings
    settings["imports"] = prepare_imports(sd_dir, stub_all=args.stub_all)
    flux_models, lora_flux = import_kohya(sd_dir)
    sys.path.insert(1, str(ROOT))
    from einops import rearrange, repeat
    bench = _bench_train()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    torch.ones(1, device=device)
    out["device"] = torch.cuda.get_device_name(device) if cuda else "cpu"
    out["torch"] = torch.__version__

    # ---- the same random float8 weights as bench_train, in kohya's Flux
    params = bench.bench_params(args.tiny)  # bench_train.py --tiny: real input widths, tiny model
    kp = flux_models.FluxParams(
        in_channels=params.in_channels, vec_in_dim=params.vec_in_dim,
        context_in_dim=params.context_in_dim, hidden_size=params.hidden_size,
        mlp_ratio=params.mlp_ratio, num_heads=params.num_heads, depth=params.depth,
        depth_single_blocks=params.depth_single_blocks, axes_dim=list(params.axes_dim),
        theta=params.theta, qkv_bias=params.qkv_bias, guidance_embed=params.guidance_embed)
    if not args.tiny and kp != flux_models.configs["dev"].params:
        raise ValueError(f"FluxParams() {kp} differ from kohya's configs['dev'] "
                         f"{flux_models.configs['dev'].params}")
    settings["flux_params"] = params.to_dict()
    base_dtype = torch.float8_e4m3fn
    if not cuda and not _fp8_autocast_works(device):
        base_dtype = torch.bfloat16
    settings["base_dtype"] = str(base_dtype).replace("torch.", "")
    if base_dtype != torch.float8_e4m3fn:
        settings["base_dtype_note"] = "float8 Linear under CPU autocast fails with this torch: bf16"

    t0 = time.perf_counter()
    ours = bench.random_fp8_model(params, device, seed=args.seed)
    sd = ours.state_dict()
    with torch.device("meta"):  # as flux_utils.load_flow_model: init_empty_weights + assign
        model = flux_models.Flux(kp)
    want, got = set(model.state_dict()), set(sd)
    if want != got:
        raise KeyError(f"key mismatch: kohya lacks {sorted(got - want)[:5]}, "
                       f"our state_dict lacks {sorted(want - got)[:5]}")
    model.load_state_dict(sd, strict=True, assign=True)  # shares our tensors, no copy
    del ours, sd
    gc.collect()
    # --fp8_base: train_network.py:847, 849-851 (every floating parameter to float8)
    model.to(dtype=base_dtype)
    model.requires_grad_(False)
    model.to(dtype=base_dtype)
    model.to(device)  # accelerator.prepare(unet): device placement (already there)
    if cuda:
        torch.cuda.empty_cache()
    dtypes = {}
    for n, p in model.named_parameters():
        dtypes[str(p.dtype).replace("torch.", "")] = dtypes.get(str(p.dtype).replace("torch.", ""), 0) + 1
    settings["base_param_dtypes"] = dtypes
    settings["base_bytes_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**30

    # ---- LoRA (train_network.py:678-709), checkpointing (:716-727)
    torch.manual_seed(args.seed)
    network = lora_flux.create_network(1.0, args.rank, float(args.rank), None, [None, None], model,
                                       neuron_dropout=None, dropout=None)
    network.apply_to([None, None], model, apply_text_encoder=False, apply_unet=True)
    if args.checkpointing == "on":
        model.enable_gradient_checkpointing()
        network.enable_gradient_checkpointing()
    trainable, _descr = network.prepare_optimizer_params_with_multiple_te_lrs(
        None, None, KOHYA_ARGS["learning_rate"])
    network.to(device)  # accelerator.prepare(network)
    lora_params = [p for g in trainable for p in g["params"]]
    adam_kwargs = {}
    if args.adamw == "fused":
        adam_kwargs["fused"] = True
    elif args.adamw == "foreach":
        adam_kwargs["foreach"] = True
    optimizer = torch.optim.AdamW(trainable, lr=KOHYA_ARGS["learning_rate"], **adam_kwargs)
    # --lr_scheduler constant (train_util.get_scheduler_fix): a LambdaLR stepped every step
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    settings["optimizer"] = (f"torch.optim.AdamW({args.adamw}); kohya's --optimizer_type AdamW builds "
                             "torch.optim.AdamW(params, lr) with no fused/foreach argument "
                             "(library/train_util.py:5095-5098), i.e. torch's default (foreach on CUDA)")
    if args.checkpointing == "on":  # train_network.py:901-912
        model.train()
    else:
        model.eval()
    network.prepare_grad_etc(None, model)
    network.on_epoch_start(None, model)  # network.train()
    settings["lora_modules"] = len(network.unet_loras)
    settings["lora_params"] = sum(p.numel() for p in lora_params)
    settings["lora_param_dtype"] = str(lora_params[0].dtype).replace("torch.", "")
    settings["build_s"] = time.perf_counter() - t0

    # ---- the sample (same draws as bench_train), as cached latents / text-encoder outputs
    g = torch.Generator(device=device).manual_seed(123)
    res = args.resolution
    h = w = res // 8
    weight_dtype = torch.bfloat16
    latents = torch.randn(1, 16, h, w, generator=g, device=device).to(weight_dtype)
    t5 = (torch.randn(1, args.t5_len, params.context_in_dim, generator=g, device=device) * 0.2
          ).to(weight_dtype)
    clip = torch.randn(1, params.vec_in_dim, generator=g, device=device).to(weight_dtype)
    loss_weights = torch.ones(1, device=device)
    settings["inputs"] = {"latents": list(latents.shape), "t5": list(t5.shape),
                          "clip_pooled": list(clip.shape), "dtype": "bfloat16",
                          "txt_ids": "zeros", "t5_attn_mask": None}
    shift = KOHYA_ARGS["discrete_flow_shift"]
    ckpt = args.checkpointing == "on"
    bare = args.bare_step

    def autocast():
        return torch.autocast(device.type, dtype=weight_dtype)

    def step():
        # flux_train_network.py:327-399 and flux_train_utils.py:486-529
        noise = torch.randn_like(latents)
        bsz = latents.shape[0]
        sigmas = torch.randn(bsz, device=device) * KOHYA_ARGS["sigmoid_scale"]
        sigmas = sigmas.sigmoid()
        sigmas = (sigmas * shift) / (1 + (shift - 1) * sigmas)
        timesteps = sigmas * NUM_TRAIN_TIMESTEPS
        sigmas = sigmas.view(-1, 1, 1, 1)
        noisy = ((1.0 - sigmas) * latents + sigmas * noise).to(weight_dtype)
        timesteps = timesteps.to(weight_dtype)
        packed = rearrange(noisy, "b c (h ph) (w pw) -> b (h w) (c ph pw)", ph=2, pw=2)
        ph, pw = noisy.shape[2] // 2, noisy.shape[3] // 2
        img_ids = torch.zeros(ph, pw, 3)  # flux_utils.prepare_img_ids (built on the host)
        img_ids[..., 1] = img_ids[..., 1] + torch.arange(ph)[:, None]
        img_ids[..., 2] = img_ids[..., 2] + torch.arange(pw)[None, :]
        img_ids = repeat(img_ids, "h w c -> b (h w) c", b=bsz).to(device=device)
        guidance_vec = torch.full((bsz,), float(KOHYA_ARGS["guidance_scale"]), device=device)
        # the cached text-encoder outputs a data loader hands over each step
        l_pooled, t5_out = clip.clone(), t5.clone()
        txt_ids = torch.zeros(bsz, t5_out.shape[1], 3, device=device)
        if ckpt:  # flux_train_network.py:348-356
            noisy.requires_grad_(True)
            for t in (l_pooled, t5_out, txt_ids):
                t.requires_grad_(True)
            img_ids.requires_grad_(True)
            guidance_vec.requires_grad_(True)
        with torch.set_grad_enabled(True), autocast():
            with autocast():  # accelerator.prepare(unet) wraps forward in autocast too
                pred = model(img=packed, img_ids=img_ids, txt=t5_out, txt_ids=txt_ids, y=l_pooled,
                             timesteps=timesteps / 1000, guidance=guidance_vec,
                             txt_attention_mask=None, mod_vectors=None)
            pred = pred.float()  # ... and converts its outputs to float32
        pred = rearrange(pred, "b (h w) (c ph pw) -> b c (h ph) (w pw)", h=ph, w=pw, ph=2, pw=2)
        target = noise - latents
        # train_network.py:467-480
        loss = F.mse_loss(pred.float(), target.float(), reduction="none")
        loss = loss.mean(dim=list(range(1, loss.ndim)))
        loss = loss * loss_weights
        loss = loss.mean()
        (loss / KOHYA_ARGS["gradient_accumulation_steps"]).backward()  # accelerator.backward
        # train_network.py:1445-1459
        if not bare:
            for p in network.parameters():  # all_reduce_network: accelerator.reduce clones
                if p.grad is not None:
                    p.grad = p.grad.clone()
        torch.nn.utils.clip_grad_norm_(network.get_trainable_params(), KOHYA_ARGS["max_grad_norm"])
        if not bare:
            network.update_grad_norms()
            network.update_norms()
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if not bare:  # train_network.py:1469-1477, 1511 (progress bar values)
            wn = network.weight_norms()
            _ = wn.mean().item() if wn is not None else None
            gn = network.grad_norms()
            _ = gn.mean().item() if gn is not None else None
            cn = network.combined_weight_norms()
            _ = cn.mean().item() if cn is not None else None
            _ = wn.max().item() if wn is not None else None
            return loss.detach().item()
        return loss.detach()

    times, losses = [], []
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    torch.manual_seed(args.seed)
    out["step_s"] = times
    out["losses"] = losses
    for i in range(args.warmup + args.steps):
        start, end = bench.StepTimer(cuda), bench.StepTimer(cuda)
        start.record()
        loss = step()
        end.record()
        end.synchronize()
        dt = start.elapsed_time(end) / 1e3
        loss = float(loss)
        losses.append(loss)
        print(f"step {i}{' (warm-up)' if i < args.warmup else ''}: loss {loss:.6f}  {dt:.3f} s",
              flush=True)
        if i >= args.warmup:
            times.append(dt)
    out["step_s_median"] = statistics.median(times) if times else None
    out["losses_finite"] = all(v == v and abs(v) < 1e30 for v in losses)
    if not out["losses_finite"]:
        raise FloatingPointError(f"non-finite loss: {losses}")
    return out


def _memory(out: dict, device: str):
    import resource
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    try:
        import torch
        if device.startswith("cuda") and torch.cuda.is_available() and torch.cuda.is_initialized():
            out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
            out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
        else:
            out["peak_alloc_gib"] = out["peak_reserved_gib"] = 0.0
    except Exception:  # noqa: BLE001
        pass


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--checkpointing", choices=["on", "off"], default="on")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--t5-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--device", default=None, help="cuda (default), cpu with --tiny")
    ap.add_argument("--tiny", action="store_true",
                    help="bench_train's tiny Flux (hidden 256, 2+2 blocks): a CPU smoke test")
    ap.add_argument("--adamw", choices=["fused", "foreach", "default"], default="fused",
                    help="torch.optim.AdamW implementation (kohya passes none: 'default')")
    ap.add_argument("--bare-step", action="store_true",
                    help="leave out kohya's per-step grad clone, norm updates and .item()s")
    ap.add_argument("--stub-all", action="store_true",
                    help="stub diffusers/transformers/... even when importable (tests)")
    args = ap.parse_args(argv)
    if args.device is None:
        args.device = "cpu" if args.tiny else "cuda"

    sd_dir = sd_scripts_dir()
    commit = sd_scripts_commit(sd_dir)
    result = {"peer": f"kohya sd-scripts (commit {commit or 'unknown'})", "sd_scripts_commit": commit,
              "resolution": args.resolution, "checkpointing": args.checkpointing,
              "rank": args.rank, "t5_len": args.t5_len, "steps": args.steps,
              "warmup": args.warmup, "seed": args.seed, "tiny": args.tiny, "ok": False}
    began = time.perf_counter()
    try:
        run(args, result)
        result["ok"] = True
    except Exception as e:  # noqa: BLE001 - report, never crash without JSON
        import_error = isinstance(e, (ImportError, FileNotFoundError))
        oom = type(e).__name__ == "OutOfMemoryError" or "out of memory" in str(e).lower()
        kind = "import" if import_error else "out of memory" if oom else "error"
        result["reason"] = f"{kind}: {type(e).__name__}: {str(e)[:1500]}"
        result["traceback"] = traceback.format_exc().splitlines()[-25:]
    _memory(result, args.device)
    result["wall_s"] = time.perf_counter() - began
    text = json.dumps(result, indent=1, default=str)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")
    print("RESULT " + json.dumps(result, default=str), flush=True)
    if result["ok"]:
        print(f"kohya peer {args.resolution}² checkpointing {args.checkpointing}: "
              f"{result['step_s_median']:.3f} s/step, final loss {result['losses'][-1]:.6f}, "
              f"peak alloc {result.get('peak_alloc_gib', 0):.1f} GiB", flush=True)
    else:
        print(f"kohya peer failed: {result['reason']}", flush=True)
    return 0 if result["ok"] else 1


# ---------------------------------------------------------------- for bench_train (parent side)

def run_in_child(resolution: int, checkpointing: bool | str, *, steps: int = 10, warmup: int = 3,
                 rank: int = 16, t5_len: int = 512, seed: int = 0, device: str = "cuda",
                 tiny: bool = False, timeout: float = 600, out: Path | None = None,
                 extra_args: list[str] | None = None, env: dict | None = None) -> dict:
    """Run this peer in a fresh child process (clean peaks) and return its JSON; a child that
    crashes or times out gives {"ok": False, "reason": ...} as well."""
    import tempfile
    ckpt = checkpointing if isinstance(checkpointing, str) else ("on" if checkpointing else "off")
    tmp = None
    if out is None:
        tmp = tempfile.NamedTemporaryFile(suffix=".json", delete=False)
        tmp.close()
        out = Path(tmp.name)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--resolution", str(resolution),
           "--checkpointing", ckpt, "--steps", str(steps), "--warmup", str(warmup),
           "--rank", str(rank), "--t5-len", str(t5_len), "--seed", str(seed),
           "--device", device, "--out", str(out)] + (["--tiny"] if tiny else []) + list(extra_args or [])
    base = {"peer": "kohya sd-scripts", "resolution": resolution, "checkpointing": ckpt, "ok": False}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        return dict(base, reason=f"timed out after {timeout:.0f} s")
    try:
        res = json.loads(Path(out).read_text())
    except Exception:  # noqa: BLE001
        tail = (p.stderr or p.stdout or "").strip().splitlines()[-12:]
        res = dict(base, reason=f"child exited {p.returncode} without JSON: "
                                f"{tail[-1] if tail else ''}"[:500], stderr_tail=tail)
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp.name)
            except OSError:
                pass
    return res


if __name__ == "__main__":
    sys.exit(main())
