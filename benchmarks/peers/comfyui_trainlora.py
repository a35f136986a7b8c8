"""Peer benchmark (issue 5): ComfyUI's built-in TrainLoraNode loop on the same weights.

    COMFYUI_PATH=.peers/ComfyUI python benchmarks/peers/comfyui_trainlora.py \
        --resolution 1024 --checkpointing on --steps 10 --warmup 3 --rank 16 \
        --t5-len 512 --seed 0 --out result.json [--device cuda] [--tiny]

What runs is ComfyUI's own code, in this process:

- the weights: benchmarks/bench_train.random_fp8_model(FluxParams(), device, seed), the
  random float8_e4m3fn Flux our benchmark trains, handed as a BFL-key state dict to
  comfy.sd.load_diffusion_model_state_dict(sd, {"dtype": torch.float8_e4m3fn}), which is
  what UNETLoader does with weight_dtype fp8_e4m3fn after reading the file (ComfyUI
  detects a Flux, builds comfy.model_base.Flux / comfy.ldm.flux.model.Flux with
  manual-cast ops and float8 storage, copies the weights in). Our copy is then freed.
- the training: comfy_extras.nodes_train.TrainLoraNode.execute itself, called with the
  node's list inputs (is_input_list) and its defaults except batch 1, rank, steps and
  gradient_checkpointing: algorithm LoRA on every module with a weight_function (every
  Linear / norm of the transformer: weight LoRA, and BiasDiff on biases and 1-D
  weights: the node's default target), AdamW lr 5e-4, MSE, training and LoRA dtype
  bf16, seed. The node builds its adapters, optimizer, checkpoint patches
  (torch.utils.checkpoint on every top-level child of the transformer), loads the model
  with load_models_gpu(force_full_load=True) and runs TrainGuider + TrainSampler.
- the data: one latent [1, 16, res/8, res/8] (LATENT dict) and one CONDITIONING
  [[T5 [1, t5_len, 4096], {"pooled_output": [1, 768]}]] with no "guidance" key, so
  comfy.model_base.Flux feeds its default guidance 3.5 (what a conditioning without a
  FluxGuidance node gives).

Measurement only (no change to what is computed): _create_optimizer is wrapped so each
optimizer.zero_grad() (the end of a TrainSampler step) records a CUDA event, and
TrainSampler.sample records one at its start; step i = event[i] - event[i-1], median
over --steps after --warmup. Peaks: torch.cuda max_memory_allocated / reserved (reset
after our copy of the weights is freed, so they include ComfyUI's model on the GPU),
ru_maxrss of this process.

`--tiny`: a 1 double + 1 single block Flux (ComfyUI's detection fixes hidden 3072, 24
heads, T5 width 4096) on the CPU, float8 storage cast to bf16 per layer as on the GPU:
a smoke test of this path, not a measurement.

On any failure the JSON still gets written, with ok false and the reason.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_COMFYUI = ROOT / ".peers" / "ComfyUI"
GIB = 1024 ** 3


# ---------------------------------------------------------------- importing ComfyUI

def comfyui_path() -> Path:
    path = Path(os.environ.get("COMFYUI_PATH") or DEFAULT_COMFYUI).expanduser().resolve()
    if not (path / "comfy" / "sd.py").is_file():
        raise FileNotFoundError(f"no ComfyUI at {path} (set COMFYUI_PATH to a ComfyUI checkout)")
    return path


def comfyui_version(path: Path) -> str:
    """'v0.8.0 <commit>': comfyui_version.py, and git or the COMMIT file packaging wrote."""
    version = "?"
    try:
        text = (path / "comfyui_version.py").read_text()
        version = "v" + text.split("__version__ = ")[1].split()[0].strip("\"'")
    except (OSError, IndexError):
        pass
    commit = ""
    if (path / "COMMIT").is_file():      # a copy without .git (packaging wrote the commit)
        commit = (path / "COMMIT").read_text().strip()[:10]
    elif (path / ".git").exists():
        try:
            commit = subprocess.run(["git", "-C", str(path), "rev-parse", "--short=10", "HEAD"],
                                    capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return f"{version} {commit or 'unknown commit'}"


class _AvAny:
    def __init__(self, *args, **kwargs):
        raise RuntimeError("PyAV is not installed here (a stub stands in for it): no video I/O")


def _stub_module(name: str) -> types.ModuleType:
    def attr(a):
        if a.startswith("__"):
            raise AttributeError(a)
        return type(a, (_AvAny,), {})

    module = types.ModuleType(name)
    module.__getattr__ = attr
    module.__path__ = []
    module.__dict__["__comfy_peer_stub__"] = True
    return module


def stub_av_if_missing() -> bool:
    """comfy_api imports PyAV at module level for its video types only. Where PyAV is not
    installed, a stub that fails on use stands in (nothing here touches video)."""
    try:
        importlib.import_module("av")
        return False
    except ImportError:
        for name in ("av", "av.container", "av.subtitles", "av.subtitles.stream"):
            sys.modules[name] = _stub_module(name)
        return True


def import_comfyui(cpu: bool, comfy_kitchen: str = "auto") -> dict:
    """Put ComfyUI first on sys.path (its nodes.py must win over this repository's nodes/
    package) and import it as a library (ComfyUI's defaults: no command-line parsing).
    comfy_kitchen "off": ComfyUI imports as on an install without the comfy-kitchen
    package (its own fallback: "No comfy kitchen, using old apply_rope functions")."""
    path = comfyui_path()
    if comfy_kitchen == "off":
        sys.modules["comfy_kitchen"] = None   # import comfy_kitchen -> ImportError
    sys.path[:] = [str(path)] + [p for p in sys.path if Path(p or ".").resolve() != path]
    if str(ROOT) not in sys.path:
        sys.path.insert(1, str(ROOT))
    env = {"comfyui_path": str(path), "av_stub": stub_av_if_missing()}
    import comfy.options  # noqa: F401  (args_parsing stays False: defaults)
    import comfy.cli_args
    if cpu:
        comfy.cli_args.args.cpu = True
    import nodes as comfy_nodes
    if Path(comfy_nodes.__file__).resolve().parent != path:
        raise ImportError(f"'nodes' resolved to {comfy_nodes.__file__}, not ComfyUI's nodes.py")
    import comfy.model_management  # noqa: F401  (reads args at import)
    import comfy.sd  # noqa: F401
    importlib.import_module("comfy_extras.nodes_train")
    try:
        import comfy_kitchen  # noqa: F401
        env["comfy_kitchen"] = True
    except ImportError:
        env["comfy_kitchen"] = False   # only quantised (mixed-precision) checkpoints need it
    env["version"] = comfyui_version(path)
    return env


def comfy_first() -> None:
    path = str(comfyui_path())
    sys.path[:] = [path] + [p for p in sys.path if p != path]


def tiny_params():
    """The smallest Flux ComfyUI's detection accepts (hidden 3072 / 24 heads / T5 4096 fixed)."""
    from fluxtrain.params import FluxParams

    return FluxParams(depth=1, depth_single_blocks=1)


def load_into_comfyui(params, device, seed: int):
    """Our benchmark's random float8 Flux, loaded by ComfyUI as UNETLoader(fp8_e4m3fn) loads a
    file's state dict. Our copy is freed before this returns."""
    import gc

    import torch
    import comfy.sd
    from benchmarks.bench_train import random_fp8_model

    comfy_first()      # bench_train puts this repository first on sys.path

    model = random_fp8_model(params, device, seed)
    sd = dict(model.state_dict())          # BFL keys, no prefix
    keys = len(sd)
    patcher = comfy.sd.load_diffusion_model_state_dict(sd, model_options={"dtype": torch.float8_e4m3fn})
    if patcher is None:
        raise RuntimeError("ComfyUI did not detect a model in the state dict")
    del sd, model
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
    return patcher, keys


# ---------------------------------------------------------------- timing hooks

class StepClock:
    """Events at the start of TrainSampler.sample and after each optimizer.zero_grad()."""

    def __init__(self, cuda: bool):
        import torch

        self.cuda, self.torch, self.marks = cuda, torch, []

    def mark(self):
        if self.cuda:
            e = self.torch.cuda.Event(enable_timing=True)
            e.record()
            self.marks.append(e)
        else:
            self.marks.append(time.perf_counter())

    def step_seconds(self) -> list[float]:
        if self.cuda:
            self.torch.cuda.synchronize()
            return [a.elapsed_time(b) / 1000 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def instrument(nt, clock: StepClock) -> dict:
    """Wrap, without changing what they compute, the node's optimizer factory and the
    sampler's entry. Returns what was replaced, for restore()."""
    saved = {"_create_optimizer": nt._create_optimizer, "sample": nt.TrainSampler.sample}
    seen = {}

    def create_optimizer(name, parameters, lr):
        parameters = list(parameters)
        opt = saved["_create_optimizer"](name, parameters, lr)
        zero_grad = opt.zero_grad

        def timed_zero_grad(*a, **k):
            out = zero_grad(*a, **k)
            clock.mark()
            return out

        opt.zero_grad = timed_zero_grad
        seen["optimizer"] = type(opt).__name__
        seen["optimizer_defaults"] = {k: v for k, v in opt.defaults.items()
                                      if isinstance(v, (int, float, bool, type(None)))}
        seen["lora_tensors"] = len(parameters)
        seen["lora_params"] = sum(p.numel() for p in parameters)
        return opt

    def sample(self, *a, **k):
        clock.mark()
        return saved["sample"](self, *a, **k)

    nt._create_optimizer = create_optimizer
    nt.TrainSampler.sample = sample
    saved["seen"] = seen
    return saved


def restore(nt, saved):
    nt._create_optimizer = saved["_create_optimizer"]
    nt.TrainSampler.sample = saved["sample"]


# ---------------------------------------------------------------- the run

def node_inputs(patcher, latent, cond, pooled, steps: int, rank: int, seed: int,
                checkpointing: bool) -> dict:
    """TrainLoraNode's inputs as ComfyUI's executor passes them (is_input_list: all lists),
    the node's defaults except batch, steps, rank, seed and checkpointing."""
    values = dict(model=patcher, latents={"samples": latent}, positive=[[cond, {"pooled_output": pooled}]],
                  batch_size=1, steps=steps, grad_accumulation_steps=1, learning_rate=0.0005,
                  rank=rank, optimizer="AdamW", loss_function="MSE", seed=seed,
                  training_dtype="bf16", lora_dtype="bf16", algorithm="LoRA",
                  gradient_checkpointing=checkpointing, existing_lora="[None]", bucket_mode=False)
    return {k: [v] for k, v in values.items()}


def node_defaults(nt) -> dict:
    """The node's declared defaults, to show they match what node_inputs passes."""
    schema = nt.TrainLoraNode.define_schema()
    return {i.id: getattr(i, "default", None) for i in schema.inputs
            if getattr(i, "default", None) is not None}


def run(args, result: dict) -> None:
    cpu = args.tiny and args.device is None
    env = import_comfyui(cpu=cpu or (args.device == "cpu"), comfy_kitchen=args.comfy_kitchen)
    result["peer"] = f"ComfyUI TrainLoraNode ({env['version']})"
    import torch
    import comfy.model_management as mm
    import comfy_extras.nodes_train as nt
    from fluxtrain.params import FluxParams

    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    if args.device and torch.device(args.device).type != device.type:
        raise RuntimeError(f"--device {args.device} but ComfyUI picked {device}")
    params = tiny_params() if args.tiny else FluxParams()
    settings = result["settings"]
    settings.update(
        device=str(device), gpu=torch.cuda.get_device_name(device) if cuda else None,
        torch=torch.__version__, comfyui=env["comfyui_path"], comfyui_version=env["version"],
        av_stub=env["av_stub"], comfy_kitchen=env["comfy_kitchen"],
        model=("tiny: " if args.tiny else "") + f"{params.depth}+{params.depth_single_blocks} blocks, "
              f"hidden {params.hidden_size}",
        weights="benchmarks.bench_train.random_fp8_model -> comfy.sd.load_diffusion_model_state_dict"
                "(dtype float8_e4m3fn) (as UNETLoader fp8_e4m3fn)",
        batch=1, rank=args.rank, t5_len=args.t5_len, seed=args.seed,
        steps=args.steps, warmup=args.warmup,
        latent=[1, 16, args.resolution // 8, args.resolution // 8],
        conditioning=f"T5 [1, {args.t5_len}, {params.context_in_dim}] + pooled [1, {params.vec_in_dim}], "
                     "no guidance key (comfy.model_base.Flux default 3.5)",
        called="comfy_extras.nodes_train.TrainLoraNode.execute (the node's own code), under "
               "torch.inference_mode() as ComfyUI's executor runs nodes; "
               "instrumented: _create_optimizer (zero_grad records an event), TrainSampler.sample "
               "(start event)")

    # ComfyUI's executor runs a whole prompt under torch.inference_mode() (execution.py): the
    # loader, the tensors from upstream nodes and TrainLoraNode (which leaves it itself).
    started = time.monotonic()
    with torch.inference_mode():
        patcher, keys = load_into_comfyui(params, device, args.seed)
    dm = patcher.model.diffusion_model
    dtypes = {}
    for p in dm.parameters():
        dtypes[str(p.dtype).replace("torch.", "")] = dtypes.get(str(p.dtype).replace("torch.", ""), 0) + p.numel()
    settings.update(load_s=round(time.monotonic() - started, 1), state_dict_keys=keys,
                    comfy_model=f"{type(patcher.model).__module__}.{type(patcher.model).__name__} / "
                                f"{type(dm).__module__}.{type(dm).__name__}",
                    comfy_weight_dtypes=dtypes,
                    comfy_manual_cast_dtype=str(patcher.model.manual_cast_dtype).replace("torch.", ""))

    g = torch.Generator().manual_seed(args.seed)
    h = args.resolution // 8
    with torch.inference_mode():
        latent = torch.randn(1, 16, h, h, generator=g)
        cond = torch.randn(1, args.t5_len, params.context_in_dim, generator=g)
        pooled = torch.randn(1, params.vec_in_dim, generator=g)

    clock = StepClock(cuda)
    saved = instrument(nt, clock)
    total = args.warmup + args.steps
    inputs = node_inputs(patcher, latent, cond, pooled, total, args.rank, args.seed,
                         args.checkpointing == "on")
    settings["node_defaults"] = node_defaults(nt)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    try:
        began = time.monotonic()
        with torch.inference_mode():
            out = nt.TrainLoraNode.execute(**inputs)
        wall = time.monotonic() - began
    finally:
        restore(nt, saved)
    times = clock.step_seconds()
    losses = list(out.args[2]["loss"]) if hasattr(out, "args") else []
    if len(times) != total:
        raise RuntimeError(f"timed {len(times)} steps, expected {total}")
    measured = times[args.warmup:]
    settings.update(saved["seen"], train_wall_s=round(wall, 2))
    result.update(
        ok=all(map(_finite, losses)) and len(losses) == total,
        step_s_median=statistics.median(measured) if measured else None,
        step_s=[round(t, 4) for t in measured], warmup_step_s=[round(t, 4) for t in times[:args.warmup]],
        losses=losses,
        peak_alloc_gib=torch.cuda.max_memory_allocated() / GIB if cuda else None,
        peak_reserved_gib=torch.cuda.max_memory_reserved() / GIB if cuda else None)
    if not result["ok"]:
        result["reason"] = f"losses not finite or missing: {losses}"


def _finite(x) -> bool:
    return x == x and abs(x) != float("inf")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--checkpointing", choices=("on", "off"), default="on")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--t5-len", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cuda (default on a GPU) or cpu")
    ap.add_argument("--tiny", action="store_true", help="1+1 block Flux on the CPU: smoke test")
    ap.add_argument("--comfy-kitchen", choices=("auto", "off"), default="auto",
                    help="off: import ComfyUI as without the comfy-kitchen package. ComfyUI v0.8.0 "
                         "with comfy-kitchen uses its apply_rope op, which has no autograd formula: "
                         "TrainLoraNode cannot train a Flux then (backward raises)")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    result = {"peer": "ComfyUI TrainLoraNode", "resolution": args.resolution,
              "checkpointing": args.checkpointing, "ok": False, "reason": None,
              "step_s_median": None, "step_s": [], "peak_alloc_gib": None,
              "peak_reserved_gib": None, "peak_rss_gib": None, "settings": {}}
    try:
        run(args, result)
    except BaseException as e:   # noqa: BLE001 - the JSON must say why, whatever it was
        result["ok"] = False
        result["reason"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-6000:]
        if "modified by an inplace operation" in str(e) and args.checkpointing == "off":
            result["reason"] += (" [ComfyUI's Flux adds in place into a block's input (comfy/ldm/flux/"
                                 "layers.py, SingleStreamBlock 'x += apply_mod(...)' and the double "
                                 "block's 'img +=' / 'txt +='): without gradient checkpointing "
                                 "autograd still needs those inputs, so TrainLoraNode with "
                                 "gradient_checkpointing off cannot train a Flux]")
        if "no autograd formula" in str(e) and "comfy_kitchen" in str(e):
            result["reason"] += (" [comfy-kitchen's apply_rope has no backward; --comfy-kitchen off "
                                 "imports ComfyUI as without that package]")
        print(result["traceback"], file=sys.stderr, flush=True)
    finally:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        summary = {k: result[k] for k in ("peer", "resolution", "checkpointing", "ok", "reason",
                                          "step_s_median", "peak_alloc_gib", "peak_reserved_gib",
                                          "peak_rss_gib")}
        print(json.dumps(summary), flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
