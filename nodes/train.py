"""Dev2ProTrainLoRA: the engine's training loop as a node.

Every TrainConfig field becomes an input with the engine's own default, limits,
choices and help text, so the node and `python -m fluxtrain.cli` never disagree.
The base is loaded here, trained, and released before the node returns.

Cancel: ComfyUI's progress bar update raises when the queue is interrupted; the
node catches that, lets the engine save a resumable checkpoint (its should_stop
path), then re-raises. Queueing the same run name with the same settings resumes.
"""

from __future__ import annotations

import gc
import time
from dataclasses import MISSING, fields

import torch
from comfy_api.latest import io

from ..fluxtrain.checkpoint import checkpoint_size, content_hash
from ..fluxtrain.placement import BaseTensors, load_base_for_training
from ..fluxtrain.dataset import EncodedDataset
from ..fluxtrain.lora import check_lora_replaceable, load_lora_file
from ..fluxtrain.state import adopt_old_layout, run_identity, start_over
from ..fluxtrain.train import TrainConfig, prepare_run, run_inputs, train
from .common import (CATEGORY, base_hashes_file, base_path, clean_name, dataset_path, forget_lora_list,
                     lora_file, recipe_metadata, run_folder, runs_root)
from .handles import (BaseHandle, BaseType, DatasetHandle, DatasetType, RunHandle, RunType,
                      require)

# Inputs of the node that are not TrainConfig fields.
NODE_INPUTS = ("base", "dataset", "name", "resume", "overwrite_lora")
GUIDANCE_HELP = ("\n\nDev2Pro: keep 1.0. Dev2Pro is FLUX.1-dev fine-tuned with this input held at "
                 "1.0; a LoRA trained there at 1.0, then used on plain dev with any FluxGuidance, is "
                 "reported to beat one trained on dev. For a fair A/B on dev, use the same value.")


def _widget(f):
    """The node input for one TrainConfig field, from the field's own metadata."""
    meta, default = f.metadata, f.default
    tip = meta["help"] + (GUIDANCE_HELP if f.name == "guidance" else "")
    if "choices" in meta:
        return io.Combo.Input(f.name, options=list(meta["choices"]), default=default, tooltip=tip)
    if isinstance(default, bool):
        return io.Boolean.Input(f.name, default=default, tooltip=tip)
    if isinstance(default, int):
        return io.Int.Input(f.name, default=default, min=meta["min"], max=meta["max"], step=1,
                            tooltip=tip, control_after_generate=False)
    if isinstance(default, float):
        step = 1e-6 if f.name == "learning_rate" else 0.01
        return io.Float.Input(f.name, default=default, min=meta["min"], max=meta["max"], step=step,
                              round=step, tooltip=tip)
    return io.String.Input(f.name, default=default, tooltip=tip)


def config_fields():
    return [f for f in fields(TrainConfig) if f.default is not MISSING]


class _Stop:
    """Set when ComfyUI asks the queue to stop; checked by the engine between steps."""

    def __init__(self):
        self.requested = False

    def __call__(self) -> bool:
        import comfy.model_management as mm

        if mm.processing_interrupted():
            self.requested = True
        return self.requested


class Dev2ProTrainLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProTrainLoRA",
            display_name="Train Flux LoRA (Dev2Pro, guidance 1.0)",
            category=CATEGORY,
            description="Trains a LoRA on a frozen Flux transformer (Flux-Dev2Pro recommended) with "
                        "the guidance embedding fed 1.0. The LoRA file goes to models/loras/<name>."
                        "safetensors (LoraLoaderModelOnly lists it) with its recipe in the metadata. "
                        "Cancel leaves a resumable checkpoint; queue the same name and settings to "
                        "continue.",
            inputs=[
                BaseType.Input("base", tooltip="From Load Training Base or Training Base from MODEL."),
                DatasetType.Input("dataset", tooltip="From Encode Dataset."),
                io.String.Input("name", default="dev2pro/my_lora",
                                tooltip="Run name: the LoRA is written to models/loras/<name>.safetensors "
                                        "and the resumable state to output/dev2pro/runs/<name>.run/. "
                                        "Sub-folders are fine; '..' and absolute paths are refused."),
                io.Boolean.Input("resume", default=True, label_on="resume", label_off="start over",
                                 tooltip="resume: continue this run name's last checkpoint when the "
                                         "settings match (more steps may be added). start over: "
                                         "delete this run's checkpoints first."),
                *[_widget(f) for f in config_fields()],
                # Last: saved workflows list the widget values by position.
                io.Boolean.Input("overwrite_lora", default=False,
                                 tooltip="Off: an existing LoRA file of this name is written over "
                                         "only when this run wrote it (its metadata says so); "
                                         "any other file is kept and the run refused. On: "
                                         "replace whatever file has this name."),
            ],
            outputs=[
                io.LoraModel.Output(display_name="lora",
                                    tooltip="The LoRA weights, for Load LoRA Model or Apply LoRA."),
                RunType.Output(display_name="run",
                               tooltip="What this run made: LoRA file, base, guidance, losses."),
                io.LossMap.Output(display_name="loss", tooltip="Loss per step."),
                io.String.Output(display_name="lora_name",
                                 tooltip="The file name as LoraLoaderModelOnly lists it."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.extra_pnginfo, io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def validate_inputs(cls, name):
        # Only `name`: ComfyUI skips its own range checks for every input named here.
        from ..fluxtrain.files import UnsafePathError

        if name is None:        # linked: checked when the node runs
            return True
        try:
            lora_file(name)
            run_folder(name)
        except UnsafePathError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, base, dataset, name, resume, overwrite_lora=False, **settings) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils
        from server import PromptServer

        require(base, BaseHandle, "base")
        require(dataset, DatasetHandle, "dataset")
        config = TrainConfig.from_dict(settings)
        name = clean_name(name)
        lora_path, lora_name = lora_file(name)
        run_dir = run_folder(name)
        adopt_old_layout(runs_root(), name, run_dir)
        if not resume:     # refused for a foreign LoRA before anything is deleted
            check_lora_replaceable(lora_path, run_identity(run_dir, create=False), overwrite_lora)
            start_over(run_dir)
        data = EncodedDataset.open(dataset_path(dataset))
        base_file = base_path(base)                # None for a MODEL without a known file
        size = checkpoint_size(base_file) if base_file else base.size
        inputs = run_inputs(base.name, size, data)
        prepare_run(run_dir, config, inputs=inputs, lora_path=lora_path, overwrite_lora=overwrite_lora)

        node_id = cls.hidden.unique_id
        base_hash = content_hash(base_file, base_hashes_file()) if base_file else ""
        metadata = {"name": base.name, "hash": base_hash,
                    "variant": base.variant, "dataset": dataset.key,
                    **recipe_metadata(cls.hidden.prompt, cls.hidden.extra_pnginfo)}

        mm.unload_all_models()          # make room: ComfyUI's own models leave the GPU
        mm.soft_empty_cache()
        device = mm.get_torch_device()
        pbar = comfy.utils.ProgressBar(config.steps, node_id=node_id)
        stop = _Stop()
        began = None    # (step, time) before the first step trained here: a resumed run
                        # starts past 0, and loading the base is not training time

        def on_step(r):
            nonlocal began
            now = time.monotonic()
            if began is None:
                began = (r.step - 1, now - r.seconds)
            first_step, since = began
            eta = (now - since) / (r.step - first_step) * (r.total - r.step)
            print(f"[dev2pro] {name} step {r.step}/{r.total} loss {r.loss:.5f} "
                  f"lr {r.learning_rate:.2e} {r.seconds:.2f}s/step eta {eta:.0f}s", flush=True)
            PromptServer.instance.send_sync("dev2pro.progress", {
                "node": node_id, "run": name, "step": r.step, "total": r.total, "loss": r.loss,
                "lr": r.learning_rate, "seconds": r.seconds, "eta_seconds": eta},
                PromptServer.instance.client_id)
            try:
                pbar.update_absolute(r.step, r.total)
            except mm.InterruptProcessingException:
                stop.requested = True   # the engine saves a checkpoint before the next step

        placed = None
        try:
            # ComfyUI runs nodes under inference_mode; training needs autograd back.
            with torch.inference_mode(False), torch.enable_grad():
                source = shared_base(base, device) if base.model is not None else base_file
                placed = load_base_for_training(source, config, data, device,
                                                log=lambda line: print(line, flush=True))
                del source         # the references to ComfyUI's tensors live in the model only
                print(f"[dev2pro] training {name} on {base.summary}, {len(data)} samples, "
                      f"guidance {config.guidance:g}, {config.steps} steps", flush=True)
                result = train(placed.model, data, config, run_dir, lora_path=lora_path,
                               base_metadata=metadata, inputs=inputs, overwrite_lora=overwrite_lora,
                               on_step=on_step, should_stop=stop,
                               log=lambda line: print(line, flush=True))
        finally:
            if placed is not None:
                placed.release()
            del placed             # the 12 GB base must not outlive the node
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        if result.cancelled or stop.requested:
            print(f"[dev2pro] {name} cancelled at step {result.steps_done}; queue it again with the "
                  "same name and settings to resume", flush=True)
            raise mm.InterruptProcessingException()

        forget_lora_list()
        run = RunHandle(name=name, lora=lora_name, base=base.name, variant=base.variant,
                        guidance=config.guidance, settings=config.to_dict(),
                        losses=tuple(result.losses), steps=result.steps_done, dataset=dataset.key)
        lora = load_lora_file(lora_path)[0]
        ui = {"dev2pro_losses": [{"run": name, "losses": list(run.losses), "base": base.name,
                                  "variant": base.variant, "guidance": config.guidance}],
              "text": [f"{lora_name}: {result.steps_done} steps, final loss "
                       f"{result.losses[-1] if result.losses else float('nan'):.4f}"]}
        return io.NodeOutput(lora, run, {"loss": list(run.losses)}, lora_name, ui=ui)


def shared_base(base: BaseHandle, device) -> BaseTensors:
    """The weights of a MODEL handle (Dev2ProBaseFromModel) as a BaseTensors that shares
    ComfyUI's tensors. ComfyUI's model is never modified: our Flux's FrozenLinear modules
    (and the LoRA adapters on them) merely reference the same weight tensors.

    - The weights are put on the training device the way ComfyUI does it for sampling
      (load_models_gpu, full load); on a CPU they already are there.
    - A scaled-fp8 weight (comfy.quant_ops.QuantizedTensor with a per-tensor scale) is
      shared as its float8 data plus its scale, no copy. Any other quantised layout is
      dequantised: a copy of that one tensor in its real dtype (said in the console)."""
    import comfy.model_management as mm
    from comfy.quant_ops import QuantizedTensor

    from .base import model_tensors

    patcher = base.model
    mm.load_models_gpu([patcher], force_full_load=True)
    sd, scales, copied = {}, {}, []
    for key, t in model_tensors(patcher).items():
        if isinstance(t, QuantizedTensor):
            qdata, scale = _per_tensor_fp8(t)
            if qdata is not None and key.endswith(".weight"):
                sd[key], scales[key[: -len(".weight")]] = qdata, scale
                continue
            t = t.dequantize()      # a copy: this layout has no float8-with-one-scale form
            copied.append(key)
        sd[key] = t
    if copied:
        print(f"[dev2pro] {len(copied)} quantised weights of {base.name} were dequantised "
              f"(copied) for training, e.g. {copied[:3]}", flush=True)
    return BaseTensors(base.name, sd, scales)


def _per_tensor_fp8(t):
    """(float8 data, float32 scalar scale) of a QuantizedTensor in a per-tensor float8
    layout, sharing its storage; (None, None) for any other layout."""
    qdata = getattr(t, "_qdata", None)
    scale = getattr(getattr(t, "_params", None), "scale", None)
    if (isinstance(qdata, torch.Tensor) and qdata.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
            and tuple(qdata.shape) == tuple(t.shape) and isinstance(scale, torch.Tensor)
            and scale.numel() == 1):
        return qdata, scale.float().reshape(())
    return None, None
