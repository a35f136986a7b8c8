"""GPU check of Dev2ProBaseFromModel: training on the MODEL ComfyUI's UNETLoader loaded.

    COMFYUI_PATH=.peers/ComfyUI python benchmarks/model_base_gpu.py --out model_base.json
    python benchmarks/model_base_gpu.py --tiny --out /tmp/mbg.json        # CPU, logic only

Real ComfyUI in this process (imported as a library, as benchmarks/peers/comfyui_trainlora.py
does it; this pack imported as a custom-node package the way ComfyUI's loader does), and
the nodes' own code:

1. a random float8_e4m3fn Flux file (benchmarks/bench_train.random_fp8_model, written with
   fluxtrain.synthetic.write_bfl: float8 weights, bf16 biases and norm scales, BFL keys,
   as released float8 files) in a throwaway models/diffusion_models folder; full size by
   default (11.9 GB, --depth for fewer blocks: the path is the same per block);
2. nodes.UNETLoader().load_unet(name, "fp8_e4m3fn");
3. KSampler (nodes.common_ksampler, euler/simple, a few steps, 64x64 px) on that MODEL with
   random T5/pooled conditioning: the "before" latent;
4. Dev2ProBaseFromModel.execute and Dev2ProTrainLoRA.execute (class clones with the hidden
   inputs ComfyUI's executor gives: prompt, unique_id) on a one-sample random encoded
   dataset at --resolution; the engine's train() is wrapped only to look at the model it
   gets: every FrozenLinear weight must be a tensor of ComfyUI's model (same data_ptr),
   still float8;
5. KSampler again with the same seed: the latent must be bitwise equal (ComfyUI's model
   untouched, and still samples).

Checks (JSON "checks", "ok" = all true): weights_shared (every frozen weight's data_ptr is
one of ComfyUI's), float8_kept (no frozen 2-D weight in another dtype), no_second_copy
(CUDA: peak allocated during training minus ComfyUI's resident model < the model's size;
a bf16 copy would add twice the model), loss_finite, lora_written, samples_before_finite,
samples_after_identical.

PromptServer: the Train node sends progress through server.PromptServer.instance; here a
stub records those messages (ComfyUI's server module needs its web stack and database).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import math
import resource
import shutil
import sys
import time
import traceback
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 1024 ** 3
PACK = "comfyui_dev2pro_pack"


def _peer_module():
    spec = importlib.util.spec_from_file_location(
        "comfyui_trainlora_peer", ROOT / "benchmarks" / "peers" / "comfyui_trainlora.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class _Server:
    """Stands in for server.PromptServer.instance: keeps what the nodes send."""

    client_id = None

    def __init__(self):
        self.messages = []

    def send_sync(self, event, data, sid=None):
        self.messages.append(event)


def stub_prompt_server() -> _Server:
    instance = _Server()
    module = sys.modules.get("server")
    if module is None:
        module = types.ModuleType("server")
        module.__dict__["__comfy_peer_stub__"] = True
        sys.modules["server"] = module
    cls = getattr(module, "PromptServer", None)
    if cls is None:
        cls = type("PromptServer", (), {})
        module.PromptServer = cls
    cls.instance = instance
    return instance


def import_pack():
    """This repository as a custom-node package (ComfyUI's load_custom_node does the same:
    a module spec on the folder's __init__.py)."""
    if PACK in sys.modules:
        return sys.modules[PACK]
    spec = importlib.util.spec_from_file_location(PACK, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PACK] = module
    spec.loader.exec_module(module)
    import importlib as il
    return il.import_module(PACK + ".nodes")


def setup_folders(work: Path) -> dict:
    import folder_paths

    dirs = {k: work / k for k in ("output", "input", "temp")}
    dirs["diffusion_models"] = work / "models" / "diffusion_models"
    dirs["loras"] = work / "models" / "loras"
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    folder_paths.set_output_directory(str(dirs["output"]))
    folder_paths.set_input_directory(str(dirs["input"]))
    folder_paths.set_temp_directory(str(dirs["temp"]))
    folder_paths.add_model_folder_path("diffusion_models", str(dirs["diffusion_models"]), is_default=True)
    folder_paths.add_model_folder_path("loras", str(dirs["loras"]), is_default=True)
    return dirs


def write_model(path: Path, params, device, seed: int) -> dict:
    import torch
    from benchmarks.bench_train import random_fp8_model
    from fluxtrain.synthetic import write_bfl

    started = time.monotonic()
    model = random_fp8_model(params, device, seed)
    sd = {k: v.detach().to("cpu") for k, v in model.state_dict().items()}
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    write_bfl(sd, path)
    size = sum(t.numel() * t.element_size() for t in sd.values())
    del sd
    gc.collect()
    return {"file": str(path), "bytes": size, "write_s": round(time.monotonic() - started, 1)}


def conditioning(params, t5_len: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    t5 = torch.randn(1, t5_len, params.context_in_dim, generator=g)
    pooled = torch.randn(1, params.vec_in_dim, generator=g)
    return [[t5, {"pooled_output": pooled, "guidance": 3.5}]]


def sample(patcher, cond, size: int, steps: int, seed: int):
    import torch
    import nodes

    latent = {"samples": torch.zeros(1, 16, size // 8, size // 8)}
    out = nodes.common_ksampler(patcher, seed, steps, 1.0, "euler", "simple", cond, cond, latent,
                                denoise=1.0)[0]["samples"]
    return out.detach().float().cpu().clone()


def write_dataset(folder: Path, params, resolution: int, t5_len: int, seed: int) -> dict:
    import torch
    from fluxtrain.dataset import EncodedDatasetWriter

    g = torch.Generator().manual_seed(seed + 7)
    with EncodedDatasetWriter(folder, resolution=resolution, overwrite=True,
                              encoders={"t5": "random", "clip": "random"}) as w:
        w.set_empty_caption(torch.zeros(t5_len, params.context_in_dim),
                            torch.zeros(params.vec_in_dim))
        w.add(torch.randn(16, resolution // 8, resolution // 8, generator=g),
              torch.randn(t5_len, params.context_in_dim, generator=g),
              torch.randn(params.vec_in_dim, generator=g), "random sample")
    return {"path": str(folder), "key": f"random-{resolution}-{t5_len}-{seed}"}


def comfy_tensors(patcher) -> dict:
    return {k: t for k, t in patcher.model.diffusion_model.state_dict().items()
            if hasattr(t, "data_ptr")}


def run(args, result: dict) -> None:
    """Everything ComfyUI would run as a prompt runs under torch.inference_mode(), as its
    executor does (execution.py); the Train node leaves it itself."""
    import torch

    with torch.inference_mode():
        _run(args, result)


def _run(args, result: dict) -> None:
    peer = _peer_module()
    cpu = args.tiny and args.device is None or args.device == "cpu"
    env = peer.import_comfyui(cpu=cpu, comfy_kitchen=args.comfy_kitchen)
    import torch
    import comfy.model_management as mm
    import nodes
    from comfy_api.latest import io as comfy_io
    from fluxtrain.params import FluxParams

    server = stub_prompt_server()
    pack_nodes = import_pack()
    peer.comfy_first()
    device = mm.get_torch_device()
    cuda = device.type == "cuda"
    if args.tiny:
        params = peer.tiny_params()
    elif args.depth:
        params = FluxParams(depth=args.depth[0], depth_single_blocks=args.depth[1])
    else:
        params = FluxParams()
    res = args.resolution or (64 if args.tiny else 512)
    t5_len = args.t5_len or (8 if args.tiny else 512)
    memory = args.memory or ("fast" if args.tiny else "lean")
    settings = result["settings"]
    settings.update(device=str(device), gpu=torch.cuda.get_device_name(device) if cuda else None,
                    torch=torch.__version__, comfyui=env["comfyui_path"], comfyui_version=env["version"],
                    av_stub=env["av_stub"], comfy_kitchen=env["comfy_kitchen"],
                    prompt_server="stub (records the nodes' messages)",
                    model=f"{params.depth}+{params.depth_single_blocks} blocks, hidden {params.hidden_size}",
                    resolution=res, t5_len=t5_len, memory=memory, steps=args.steps, rank=args.rank,
                    sample=f"KSampler euler/simple {args.sample_steps} steps cfg 1.0, "
                           f"{args.sample_size}px, seed {args.seed}, guidance 3.5")
    work = Path(args.work)
    dirs = setup_folders(work)
    checks = result["checks"]

    name = f"model-base-gpu-{params.depth}-{params.depth_single_blocks}-s{args.seed}.safetensors"
    path = dirs["diffusion_models"] / name
    if not (args.keep and path.is_file()):
        result["model_file"] = write_model(path, params, device, args.seed)
    result["model_file_bytes"] = path.stat().st_size

    started = time.monotonic()
    patcher = nodes.UNETLoader().load_unet(name, "fp8_e4m3fn")[0]
    result["unetloader_s"] = round(time.monotonic() - started, 1)
    cond = conditioning(params, min(t5_len, 64), args.seed)
    before = sample(patcher, cond, args.sample_size, args.sample_steps, args.seed)
    checks["samples_before_finite"] = bool(torch.isfinite(before).all())
    tensors = comfy_tensors(patcher)
    model_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    result["comfy_model_gib"] = model_bytes / GIB
    result["comfy_weight_dtypes"] = sorted({str(t.dtype).replace("torch.", "") for t in tensors.values()})
    # The Train node unloads ComfyUI's models and loads this one again (new device
    # tensors): a reference kept here would hold the old ones, a second model's worth.
    del tensors
    if cuda:
        result["allocated_after_sampling_gib"] = torch.cuda.memory_allocated() / GIB

    prompt = {"unet": {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "fp8_e4m3fn"}},
              "base": {"class_type": "Dev2ProBaseFromModel", "inputs": {"model": ["unet", 0], "variant": "auto"}},
              "train": {"class_type": "Dev2ProTrainLoRA", "inputs": {"base": ["base", 0]}}}

    def clone(node, uid):
        return node.PREPARE_CLASS_CLONE({"hidden_inputs": {comfy_io.Hidden.prompt: prompt,
                                                           comfy_io.Hidden.unique_id: uid}})

    base_out = clone(pack_nodes.Dev2ProBaseFromModel, "base").execute(model=patcher, variant="auto")
    handle = base_out.args[0]
    result["base_info"] = base_out.args[1]
    checks["handle_holds_the_model"] = handle.get("model") is patcher

    dataset = write_dataset(work / "dataset", params, res, t5_len, args.seed)
    train_mod = sys.modules[PACK + ".nodes.train"]
    layers_mod = sys.modules[PACK + ".fluxtrain.layers"]
    original_train = train_mod.train
    seen = {}

    def inspecting_train(model, *a, **k):
        comfy_ptrs = {t.data_ptr() for t in comfy_tensors(patcher).values()}
        frozen = [m for m in model.modules() if isinstance(m, layers_mod.FrozenLinear)]
        weights = [m.weight for m in frozen]
        seen.update(
            frozen_layers=len(frozen),
            shared=sum(w.data_ptr() in comfy_ptrs for w in weights),
            float8=sum(w.dtype == torch.float8_e4m3fn for w in weights),
            other_dtypes=sorted({str(w.dtype) for w in weights if w.dtype != torch.float8_e4m3fn}),
            weight_devices=sorted({str(w.device) for w in weights}),
            comfy_tensors_on=sorted({str(t.device) for t in comfy_tensors(patcher).values()}),
            allocated_at_train_start_gib=torch.cuda.memory_allocated() / GIB if cuda else None)
        return original_train(model, *a, **k)

    defaults = {f.name: f.default for f in train_mod.config_fields()}
    settings_in = dict(defaults, steps=args.steps, rank=args.rank, alpha=float(args.rank),
                       memory=memory, checkpoint_every=0, seed=args.seed)
    train_mod.train = inspecting_train
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    started = time.monotonic()
    try:
        out = clone(pack_nodes.Dev2ProTrainLoRA, "train").execute(
            base=handle, dataset=dataset, name="model_base_gpu/run", resume=False, **settings_in)
    finally:
        train_mod.train = original_train
    result["train_s"] = round(time.monotonic() - started, 1)
    run_info = out.args[1]
    losses = list(run_info["losses"])
    result["losses"] = losses
    result["training"] = seen
    result["progress_messages"] = len(server.messages)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
        result["peak_alloc_train_gib"] = peak / GIB
        result["peak_reserved_train_gib"] = torch.cuda.max_memory_reserved() / GIB
        result["extra_over_model_gib"] = (peak - model_bytes) / GIB
        checks["no_second_copy"] = peak - model_bytes < model_bytes
    checks["weights_shared"] = seen.get("frozen_layers", 0) > 0 and seen["shared"] == seen["frozen_layers"]
    checks["float8_kept"] = seen.get("frozen_layers", 0) > 0 and seen["float8"] == seen["frozen_layers"]
    checks["loss_finite"] = len(losses) == args.steps and all(math.isfinite(x) for x in losses)
    lora = dirs["loras"] / "model_base_gpu" / "run.safetensors"
    checks["lora_written"] = lora.is_file()

    after = sample(patcher, cond, args.sample_size, args.sample_steps, args.seed)
    checks["samples_after_identical"] = bool(torch.equal(before, after))
    result["sample_abs_diff"] = float((before - after).abs().max())
    result["ok"] = all(checks.values())
    if not result["ok"]:
        result["reason"] = "failed checks: " + ", ".join(k for k, v in checks.items() if not v)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--work", default="/tmp/model_base_gpu", help="throwaway folders and the model file")
    ap.add_argument("--tiny", action="store_true", help="1+1 block Flux on the CPU (logic check)")
    ap.add_argument("--device", default=None, help="cpu to force the CPU")
    ap.add_argument("--depth", type=int, nargs=2, metavar=("DOUBLE", "SINGLE"),
                    help="fewer blocks than FLUX.1 (19 38)")
    ap.add_argument("--resolution", type=int, default=None, help="training resolution (512; tiny 64)")
    ap.add_argument("--t5-len", type=int, default=None, help="512; tiny 8")
    ap.add_argument("--memory", default=None, help="engine memory mode (lean; tiny fast)")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-size", type=int, default=64)
    ap.add_argument("--sample-steps", type=int, default=2)
    ap.add_argument("--comfy-kitchen", choices=("auto", "off"), default="auto")
    ap.add_argument("--keep", action="store_true", help="reuse the model file and work folder")
    args = ap.parse_args(argv)
    if not args.keep:
        shutil.rmtree(args.work, ignore_errors=True)
    result = {"check": "Dev2ProBaseFromModel on a UNETLoader MODEL", "ok": False, "reason": None,
              "checks": {}, "settings": {}}
    try:
        run(args, result)
    except BaseException as e:  # noqa: BLE001 - the JSON must say why
        result["ok"] = False
        result["reason"] = f"{type(e).__name__}: {e}"
        result["traceback"] = traceback.format_exc()[-6000:]
        print(result["traceback"], file=sys.stderr, flush=True)
    finally:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GIB
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1, default=str))
        print(json.dumps({k: result.get(k) for k in ("ok", "reason", "checks", "peak_alloc_train_gib",
                                                     "extra_over_model_gib", "peak_rss_gib")}),
              flush=True)
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
