"""Dev2ProApplyLoRA: a trained LoRA onto the Flux-dev MODEL of the standard loaders.

The same path LoraLoaderModelOnly takes (comfy.sd.load_lora_for_models), so the
result feeds KSampler / SamplerCustomAdvanced + FluxGuidance unchanged. The LoRA
comes from a run (the file a Train node of this graph just wrote: no refresh
needed) or from the models/loras list.
"""

from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..fluxtrain.files import safe_join
from .common import CATEGORY
from .handles import RunHandle, RunType, require

FROM_RUN = "(from run input)"


class Dev2ProApplyLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProApplyLoRA",
            display_name="Apply LoRA to MODEL (Dev2Pro)",
            category=CATEGORY,
            description="Applies a LoRA to a MODEL, typically FLUX.1-dev from Load Diffusion Model: "
                        "train on Dev2Pro, sample on dev. Strength 0 returns the model unchanged.",
            inputs=[
                io.Model.Input("model", tooltip="The Flux-dev MODEL to sample with."),
                io.Combo.Input("lora_name", options=[FROM_RUN] + folder_paths.get_filename_list("loras"),
                               default=FROM_RUN,
                               tooltip="A LoRA from models/loras, or '(from run input)' to use the "
                                       "file the connected Train node wrote."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="How strongly the LoRA changes the model; 0 = not at all."),
                RunType.Input("run", optional=True,
                              tooltip="A Train node's run output; used when lora_name is "
                                      "'(from run input)'."),
            ],
            outputs=[io.Model.Output(display_name="model")],
        )

    @classmethod
    def execute(cls, model, lora_name, strength, run=None) -> io.NodeOutput:
        import comfy.sd
        import comfy.utils

        if lora_name == FROM_RUN:
            if run is None:
                raise ValueError("lora_name is '(from run input)' but no run is connected: connect a "
                                 "Train node's 'run' output, or pick a LoRA file from the list")
            lora_name = require(run, RunHandle, "run").lora
        if strength == 0:
            return io.NodeOutput(model)
        # Every loras folder LoraLoaderModelOnly lists; links placed there are followed.
        roots = folder_paths.get_folder_paths("loras")
        path = next((p for p in (safe_join(root, lora_name, what="LoRA name", follow_links=True)
                                 for root in roots) if p.is_file()), None)
        if path is None:
            raise FileNotFoundError(f"LoRA {lora_name!r} is not in {', '.join(roots)}; train it "
                                    "first or pick a file from the list")
        lora = comfy.utils.load_torch_file(str(path), safe_load=True)
        patched, _ = comfy.sd.load_lora_for_models(model, None, lora, strength, 0)
        return io.NodeOutput(patched)
