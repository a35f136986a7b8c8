"""Run inside a ComfyUI's own Python: load a Flux with ComfyUI's diffusion-model loader,
apply each LoRA file with ComfyUI's standard LoraLoaderModelOnly, and write what the
patched diffusion model outputs on given inputs, with the "lora key not loaded" lines
ComfyUI logged for that file.

    python comfy_patched_forward.py COMFYUI FLUX LORA_DIR INPUTS OUT NAME [NAME ...]

INPUTS is a safetensors of x [B, 16, H, W], timesteps, context, y, guidance; OUT gets
`base` (no LoRA), `base_again` (after every LoRA was unloaded) and one output per NAME,
plus OUT.json with the log lines. Weights load as float32 (on the CPU ComfyUI merges a
LoRA in float32), so its outputs compare with the engine's to float32 round-off.
"""

import importlib
import importlib.abc
import importlib.machinery
import json
import logging
import sys
import types


class _AbsentPackage(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """ComfyUI's core imports torchvision and torchaudio at module level for models other
    than Flux; where the checkout's Python lacks them (or has a build that does not load),
    empty stand-ins let those imports pass. Nothing on the Flux / LoRA path touches them."""

    def __init__(self, roots):
        self.roots = set(roots)

    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in self.roots:
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        return None

    def create_module(self, spec):
        module = types.ModuleType(spec.name)
        module.__path__ = []

        def missing(attr):
            if attr.startswith("__"):
                raise AttributeError(attr)
            return type(attr, (), {"__init__": _refuse})
        module.__getattr__ = missing
        return module

    def exec_module(self, module):
        pass


def _refuse(*_, **__):
    raise ImportError("a stand-in for a package this ComfyUI Python lacks")


def stand_in_for_absent(*roots):
    absent = []
    for root in roots:
        try:
            importlib.import_module(root)
        except Exception:
            for name in [n for n in sys.modules if n == root or n.startswith(root + ".")]:
                del sys.modules[name]
            absent.append(root)
    if absent:
        sys.meta_path.insert(0, _AbsentPackage(absent))
    return absent


class _Lines(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


def main(comfyui, flux, lora_dir, inputs_path, out_path, *names):
    sys.path.insert(0, comfyui)
    absent = stand_in_for_absent("torchvision", "torchaudio")
    import torch
    from safetensors.torch import load_file, save_file
    from comfy.cli_args import args
    args.cpu = True
    import comfy.model_management
    import comfy.sd
    import folder_paths
    import nodes

    folder_paths.add_model_folder_path("loras", lora_dir, is_default=True)
    lines = _Lines()
    logging.getLogger().addHandler(lines)
    logging.getLogger().setLevel(logging.INFO)

    inputs = load_file(inputs_path)
    model = comfy.sd.load_diffusion_model(flux, model_options={"dtype": torch.float32})

    def forward(patcher):
        comfy.model_management.load_models_gpu([patcher])
        with torch.no_grad():
            out = patcher.model.diffusion_model(
                inputs["x"], inputs["timesteps"], inputs["context"], y=inputs["y"],
                guidance=inputs["guidance"])
        comfy.model_management.unload_all_models()
        return out.float().contiguous()

    outputs, logs = {"base": forward(model)}, {}
    loader = nodes.LoraLoaderModelOnly()
    for name in names:
        start = len(lines.lines)
        (patched,) = loader.load_lora_model_only(model, name, 1.0)
        outputs[name] = forward(patched)
        logs[name] = [l for l in lines.lines[start:] if "lora key not loaded" in l]
    outputs["base_again"] = forward(model)
    save_file(outputs, out_path)
    with open(out_path + ".json", "w") as f:
        json.dump({"not_loaded": logs, "stand_ins": absent,
                   "weight_dtype": str(model.model.diffusion_model.img_in.weight.dtype)}, f)


if __name__ == "__main__":
    main(*sys.argv[1:])
