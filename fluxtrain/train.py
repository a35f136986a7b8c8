"""The training loop: LoRA on a frozen Flux, rectified flow, guidance fed 1.0.

`MicroStep` is the step's arithmetic (flow inputs, velocity loss, backward; eager
or a CUDA graph replay); `train` is the loop around it (sample, micro-steps,
clip, optimizer step, log, checkpoint). The ComfyUI node, the headless command
and the benchmark all run this same code.

Every random draw of step N (noise, timesteps, caption dropout, LoRA dropout)
comes from generators seeded with (seed, N). A resumed run therefore needs no
saved RNG state to continue exactly where it stopped.
"""

from __future__ import annotations

import gc
import json
import math
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from . import __version__
from .dataset import BucketBatchSampler, EncodedDataset, collate
from .flux import Flux, pack_latents, text_ids
from .graphs import GraphCaptureFailed, StepGraphs, graph_unavailable_reason
from .adapters import (ADAPTERS, AdapterConfig, adapter_state_dict, attach_adapters,
                       load_adapter_state_dict, save_adapter_file)
from .lora import RUN_ID_KEY, LoRAConfig, check_lora_replaceable
from .state import (TrainingState, check_same_inputs, latest_state_info, load_latest_state,
                    record_inputs, run_identity, run_label, save_state)
from .timesteps import METHODS as TIMESTEP_METHODS, sample_timesteps

MEMORY_MODES = ("auto", "fast", "lean", "offload")
OPTIMIZERS = ("adamw", "adafactor")
SCHEDULES = ("constant", "cosine")
LOSSES = ("mse", "huber")


def setting(default, help: str, **limits):
    """A TrainConfig field with the help text and limits that the CLI and the node show."""
    return field(default=default, metadata={"help": help, **limits})


@dataclass
class TrainConfig:
    steps: int = setting(1000, "optimizer steps to train", min=1, max=1_000_000)
    learning_rate: float = setting(1e-4, "AdamW learning rate; 1e-4 suits rank 16 on Flux", min=1e-7, max=1.0)
    batch_size: int = setting(1, "images per forward pass (one bucket shape per batch)", min=1, max=64)
    grad_accum: int = setting(1, "batches whose gradients add up before one optimizer step", min=1, max=256)
    optimizer: str = setting("adamw", "adamw (fused on CUDA) or adafactor (less memory)", choices=OPTIMIZERS)
    weight_decay: float = setting(0.0, "decoupled weight decay on the LoRA weights", min=0.0, max=1.0)
    lr_schedule: str = setting("constant", "after warm-up: constant, or cosine down to zero", choices=SCHEDULES)
    warmup_steps: int = setting(0, "steps of linear learning-rate warm-up", min=0, max=100_000)
    max_grad_norm: float = setting(1.0, "gradient clipping norm; 0 turns clipping off", min=0.0, max=1000.0)
    rank: int = setting(16, "LoRA rank (dimension of the low-rank update)", min=1, max=512)
    alpha: float = setting(16.0, "LoRA alpha; the update is scaled by alpha / rank", min=0.01, max=1024.0)
    dropout: float = setting(0.0, "dropout on the LoRA input during training", min=0.0, max=0.9)
    targets: str = setting("all", "layers that get a LoRA: all (304 on Flux), attention, mlp, "
                           "single_blocks, or ranges like 'double:0-7,single:10-20'")
    guidance: float = setting(1.0, "value fed to Flux's guidance embedding while training. Dev2Pro was "
                              "fine-tuned with 1.0 to undo dev's guidance distillation, so a LoRA "
                              "trained on it must see 1.0 too; use 1.0 on dev as well for a fair A/B "
                              "(kohya's default is 3.5)", min=0.0, max=100.0)
    timestep_sampling: str = setting("shift", "how training timesteps are drawn: shift (S=3.1582, the "
                                     "recommended Flux setting), flux_shift (by resolution), "
                                     "logit_normal, uniform", choices=tuple(TIMESTEP_METHODS))
    shift: float = setting(3.1582, "S of the shift sampling, e^1.15", min=0.1, max=100.0)
    loss: str = setting("mse", "mse on the velocity, or huber (robust to outliers)", choices=LOSSES)
    huber_delta: float = setting(1.0, "delta of the huber loss", min=1e-4, max=100.0)
    caption_dropout: float = setting(0.0, "share of samples trained on the empty caption", min=0.0, max=0.99)
    seed: int = setting(0, "seed of every random draw; the same seed repeats the run exactly",
                        min=0, max=2 ** 63 - 1)
    checkpoint_every: int = setting(250, "steps between resumable checkpoints; 0 = only at the end",
                                    min=0, max=1_000_000)
    memory: str = setting("auto", "where memory goes: auto plans from the free VRAM (checkpoints only as "
                          "many blocks as needed, offloads weights to host memory through comfy-aimdo "
                          "when even that does not fit); fast = no checkpointing; lean = every block "
                          "checkpointed (about 15 GiB at 1024x1024); offload = lean plus weights "
                          "streamed from host memory", choices=MEMORY_MODES)
    fp8_compute: bool = setting(True, "run the transformer blocks' matmuls in float8 where it pays: on "
                                "GPUs whose float8 tensor cores the recipe was validated on (Hopper) "
                                "and with compiled blocks; LoRA math stays bf16, and the loss curve and "
                                "the LoRA match bf16's within run-to-run noise. Off: never")
    compile_blocks: bool = setting(True, "torch.compile every transformer block where it pays: on CUDA "
                                   "with Triton, for runs long enough to earn back the compile time "
                                   "(cached after the first run). Off: never")
    compute_dtype: str = setting("bfloat16", "dtype the frozen base computes in (LoRA weights stay "
                                 "float32)", choices=("bfloat16", "float16", "float32"))
    # New settings go last: saved workflows list the Train node's widget values by position.
    cuda_graphs: bool = setting(True, "replay each step's forward and backward as a CUDA graph where "
                                "possible (CUDA, weights resident, no LoRA dropout): removes the launch "
                                "overhead that dominates small images; every image size is captured "
                                "before the first step, a few seconds each. Off: never")
    adapter: str = setting("lora", "what is trained on each targeted layer: lora (two low-rank factors); "
                           "lokr (Kronecker product of a small and a large factor, lokr_factor and "
                           "lokr_full_matrix; often a fraction of LoRA's file); loha (Hadamard product "
                           "of two rank-`rank` pairs); dora (LoRA plus a trained magnitude per input "
                           "column). All load in ComfyUI's standard LoRA loader",
                           choices=tuple(ADAPTERS))
    lokr_factor: int = setting(16, "LoKr: each dimension is split as factor x rest (3072 = 16 x 192); "
                               "-1 splits as evenly as possible (48 x 64)", min=-1, max=4096)
    lokr_full_matrix: bool = setting(True, "LoKr: the large Kronecker factor is a full matrix (scale 1, "
                                     "alpha unused, as in LyCORIS); off: a rank-`rank` product scaled by "
                                     "alpha / rank")

    def __post_init__(self):
        for f in fields(self):
            value, meta = getattr(self, f.name), f.metadata
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{f.name} {value!r} is not one of {', '.join(meta['choices'])}")
            if "min" in meta and not meta["min"] <= value <= meta["max"]:
                raise ValueError(f"{f.name} must be between {meta['min']} and {meta['max']}, got {value}")
        # The field limits above are the ranges a user may set; what the adapter's arithmetic
        # accepts (a targets value naming a layer set, a LoKr factor that splits) is checked
        # by its own config, built here so that a bad setting fails now, not after loading.
        self.adapter_config()

    def lora_config(self) -> LoRAConfig:
        return self.adapter_config().lora_config()

    def adapter_config(self) -> AdapterConfig:
        return AdapterConfig(rank=self.rank, alpha=self.alpha, dropout=self.dropout, targets=self.targets,
                             adapter=self.adapter, lokr_factor=self.lokr_factor,
                             lokr_full_matrix=self.lokr_full_matrix)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training settings {unknown}; known: {sorted(known)}")
        return cls(**d)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class StepReport:
    step: int                 # steps finished so far (1-based after the first step)
    total: int
    loss: float
    learning_rate: float
    seconds: float            # wall time of this step


@dataclass
class TrainResult:
    steps_done: int
    losses: list[float]
    cancelled: bool
    lora_path: Path | None
    state_path: Path | None
    config: TrainConfig = field(repr=False)


def learning_rate_at(config: TrainConfig, step: int) -> float:
    """Warm-up (linear from lr/warmup to lr), then constant or cosine to zero."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    if config.lr_schedule == "constant":
        return config.learning_rate
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def flow_inputs(batch: dict, config: TrainConfig, generator: torch.Generator,
                guidance_embed: bool = True) -> tuple[dict, torch.Tensor]:
    """Rectified flow: x_t = (1 - t) x0 + t noise, and the velocity noise - x0 to predict.
    Returns the model's keyword arguments and that target (float32)."""
    device, dtype = generator.device, getattr(torch, config.compute_dtype)
    x0, img_ids = pack_latents(batch["latent"].to(device, torch.float32))
    batch_size = x0.shape[0]
    noise = torch.randn(x0.shape, generator=generator, device=device, dtype=torch.float32)
    t = sample_timesteps(config.timestep_sampling, batch_size, generator,
                         image_tokens=x0.shape[1], shift=config.shift, device=device)
    x_t = (1.0 - t[:, None, None]) * x0 + t[:, None, None] * noise
    txt = batch["t5"].to(device, dtype)
    # Timesteps and guidance stay float32 into the embedders, as ComfyUI samples: rounded to
    # bf16 they would shift the conditioning the LoRA learns under by up to ~0.2%.
    inputs = dict(img=x_t.to(dtype), img_ids=img_ids, txt=txt,
                  txt_ids=text_ids(batch_size, txt.shape[1], device=device),
                  timesteps=t.float(), y=batch["clip"].to(device, dtype),
                  guidance=(torch.full((batch_size,), config.guidance, device=device,
                                       dtype=torch.float32) if guidance_embed else None))
    return inputs, noise - x0


def velocity_loss(velocity: torch.Tensor, target: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    if config.loss == "huber":
        return F.huber_loss(velocity.float(), target, delta=config.huber_delta)
    return F.mse_loss(velocity.float(), target)


class MicroStep:
    """Forward and backward of one micro-batch, the loss divided by grad_accum.
    Eager, or replayed as a CUDA graph when `config.cuda_graphs` asks for it and the
    run allows it (fluxtrain.graphs). `zero_grad()` after each optimizer step."""

    def __init__(self, model: Flux, params: list, config: TrainConfig, device,
                 log: Callable[[str], None] = print):
        self.model, self.params, self.config = model, list(params), config
        self.log = log
        self.graphs = None
        if config.cuda_graphs:
            reason = graph_unavailable_reason(model, device, config.dropout)
            if reason:
                log(f"[fluxtrain] CUDA graphs off: {reason}")
            else:
                model.recompute_rng = False      # no dropout: nothing random to replay
                self.graphs = StepGraphs(self._loss, self.params)

    def _loss(self, inputs: dict, target: torch.Tensor) -> torch.Tensor:
        return velocity_loss(self.model(**inputs), target, self.config) / self.config.grad_accum

    def prepare(self, batches: list[dict], generator: torch.Generator,
                should_stop: Callable[[], bool] = lambda: False) -> None:
        """Capture the graphs of these batches' shapes (one per bucket) before training,
        so that no shape warms up beside another's captured graph (fluxtrain.graphs)."""
        if self.graphs is None:
            return
        examples = [flow_inputs(b, self.config, generator, self.model.params.guidance_embed)
                    for b in batches]
        labels = [f"{b['latent'].shape[3] * 8}x{b['latent'].shape[2] * 8}, batch {b['latent'].shape[0]}"
                  for b in batches]
        try:
            self.graphs.prepare(examples, labels, self.log, should_stop)
            return
        except GraphCaptureFailed as error:
            failure = str(error)
        self._graphs_failed(failure)

    def __call__(self, batch: dict, generator: torch.Generator) -> float:
        return self.run(*flow_inputs(batch, self.config, generator, self.model.params.guidance_embed))

    def run(self, inputs: dict, target: torch.Tensor) -> float:
        """Forward and backward on prepared model inputs; returns the loss."""
        if self.graphs is not None:
            held = len(self.graphs.graphs)
            try:
                return self.graphs(inputs, target).item()
            except GraphCaptureFailed as error:      # gradients untouched: go on eagerly
                failure = str(error)
            self._graphs_failed(failure, (
                f" {held} graph(s) of other shapes held their memory while this one warmed up "
                "(a bucket's smaller last batch, captured when first seen); a batch size that "
                "divides every bucket avoids it.") if held else "")
        loss = self._loss(inputs, target)
        loss.backward()
        return loss.item()

    def _graphs_failed(self, failure: str, why: str = "") -> None:
        """Turn graphs off and give their memory back before the eager step. Called after
        the `except` block, when the failure's traceback (the frames of the failed warm-up,
        the graphs) is gone; the graphs are dropped, anything left in reference cycles is
        collected, and only then is the cache emptied. (Emptying it inside the `except`
        block left 5.69 GiB in the graphs' pool and the next eager step out of memory.)"""
        self.log(f"[fluxtrain] CUDA graphs off: capturing the step failed ({failure}); "
                 f"training goes on without them.{why}")
        self.graphs.release()
        self.graphs = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def zero_grad(self) -> None:
        # A captured graph accumulates into the same gradient tensors every replay.
        in_place = self.graphs is not None and bool(self.graphs.graphs)
        for p in self.params:
            if not in_place:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()


def optimizer_step(micro_step: MicroStep, optimizer: torch.optim.Optimizer,
                   config: TrainConfig) -> float:
    """The end of every training step: clip the accumulated gradients (when asked), step
    the optimizer, clear the gradients. Returns the gradient norm before clipping; when it
    is not finite the optimizer does not step (the weights stay as they were)."""
    grads = [p.grad for p in micro_step.params if p.grad is not None]
    if not grads:
        norm = 0.0
    elif config.max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(micro_step.params, config.max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    norm = float(norm)
    if math.isfinite(norm):
        optimizer.step()
    micro_step.zero_grad()
    return norm


def step_generator(seed: int, step: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed((seed * 1_000_003 + step) % (2 ** 63))
    return generator


def run_inputs(base_name: str, base_size: int, dataset: EncodedDataset) -> dict:
    """What a run is tied to: its base (name and size in bytes) and its dataset (the folder
    name: the content key of a dataset Encode Dataset made)."""
    return {"base": base_name, "base_size": int(base_size), "dataset": dataset.folder.name}


def prepare_run(run_dir: Path, config: TrainConfig, *, inputs: dict | None = None,
                lora_path: Path | None = None, overwrite_lora: bool = False) -> None:
    """Refuse, before a base is loaded, what would corrupt or lose work: resuming on other
    inputs (run_inputs) or settings than the run started with, asking for fewer steps than
    it has trained, and writing over a LoRA file that is not this run's own output (unless
    `overwrite_lora`). `train` calls it too; callers call it first to fail fast."""
    run_dir = Path(run_dir)
    saved = latest_state_info(run_dir)
    if saved is not None:
        _check_resumable(saved["config"], config)
        if saved["step"] > config.steps:
            raise ValueError(
                f"run {run_label(run_dir)!r} has already trained {saved['step']} steps, more than "
                f"the {config.steps} asked for; ask for {saved['step']} steps to get its LoRA "
                f"again or more to train on, or start it over (a new run name or folder)")
    if inputs is not None:
        check_same_inputs(run_dir, inputs)
    if lora_path is not None:
        check_lora_replaceable(lora_path, run_identity(run_dir, create=False), overwrite_lora)


def train(model: Flux, dataset: EncodedDataset, config: TrainConfig, run_dir: Path, *,
          lora_path: Path | None = None, base_metadata: dict | None = None,
          inputs: dict | None = None, overwrite_lora: bool = False,
          on_step: Callable[[StepReport], None] | None = None,
          should_stop: Callable[[], bool] | None = None,
          log: Callable[[str], None] = print) -> TrainResult:
    """Train a LoRA on `model` (frozen) over `dataset`; resume from `run_dir` if it holds
    a checkpoint of the same settings (and `inputs`, see prepare_run). Writes the LoRA
    file to `lora_path` when done, with the run's identity in its metadata."""
    run_dir = Path(run_dir)
    device = next(model.parameters()).device
    if not model.params.guidance_embed:
        raise ValueError("this base model has no guidance embedding (schnell?): guidance "
                         "training needs FLUX.1-dev or Flux-Dev2Pro")
    prepare_run(run_dir, config, inputs=inputs, lora_path=lora_path, overwrite_lora=overwrite_lora)
    run_id = run_identity(run_dir)
    if inputs is not None:
        record_inputs(run_dir, inputs)
    model.requires_grad_(False)
    # on the compute device also where an offloaded layer keeps its weight on the host
    adapters = attach_adapters(model, config.adapter_config(), seed=config.seed, device=device)
    params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = make_optimizer(config, params, device)
    micro_step = MicroStep(model, params, config, device, log)
    sampler = BucketBatchSampler(dataset, config.batch_size * config.grad_accum, seed=config.seed)

    start, losses = 0, []
    resumed = load_latest_state(run_dir)
    if resumed is not None:
        load_adapter_state_dict(adapters, resumed.lora)
        optimizer.load_state_dict(resumed.optimizer)
        sampler.load_state_dict(resumed.sampler)
        start, losses = resumed.step, list(resumed.losses)
        log(f"[fluxtrain] resuming {run_label(run_dir)} at step {start}/{config.steps}")
    log("[fluxtrain] " + json.dumps(config.to_dict()))

    def checkpoint(step: int) -> Path:
        return save_state(run_dir, TrainingState(
            step=step, lora=adapter_state_dict(adapters), optimizer=optimizer.state_dict(),
            sampler=sampler.state_dict(), config=config.to_dict(), losses=losses))

    state_path = resumed.path if resumed else None
    saved_step = resumed.step if resumed else None    # a step saved once is not saved again
    model.train()
    if micro_step.graphs is not None:  # every bucket's graph up front, from one micro-batch each
        example = step_generator(config.seed, 0, device)
        micro_step.prepare([collate([dataset[i] for i in members[:config.batch_size]], 0.0, example,
                                    dataset.empty_caption)
                            for members in sampler.bucket_members().values()], example,
                           should_stop or (lambda: False))
    for step in range(start, config.steps):
        if should_stop is not None and should_stop():
            if saved_step != step:
                state_path = checkpoint(step)
            log(f"[fluxtrain] cancelled before step {step + 1}; resumable state in {state_path}")
            return TrainResult(step, losses, True, None, state_path, config)
        began = time.perf_counter()
        lr = learning_rate_at(config, step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        generator = step_generator(config.seed, step, device)
        indices = sampler.next_batch()
        loss_sum = 0.0
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(generator.initial_seed())        # LoRA dropout
            for micro in _chunks(indices, config.batch_size):
                batch = collate([dataset[i] for i in micro], config.caption_dropout, generator,
                                dataset.empty_caption)
                value = micro_step(batch, generator)
                if not math.isfinite(value):
                    raise TrainingDiverged(
                        f"loss became {value} at step {step + 1}; the last good checkpoint is "
                        f"{state_path or 'none (no checkpoint yet)'}. Lower the learning rate "
                        "or check the dataset, then resume or restart.")
                loss_sum += value
        norm = optimizer_step(micro_step, optimizer, config)
        if not math.isfinite(norm):     # a finite loss can still have a NaN gradient
            raise TrainingDiverged(
                f"the gradient norm became {norm} at step {step + 1} (loss {loss_sum:.4g}); the "
                f"last good checkpoint is {state_path or 'none (no checkpoint yet)'}, and no "
                "LoRA was written from this step. Lower the learning rate or check the dataset, "
                "then resume or restart.")
        losses.append(loss_sum)
        if on_step is not None:
            on_step(StepReport(step + 1, config.steps, loss_sum, lr, time.perf_counter() - began))
        done = step + 1
        if config.checkpoint_every and done % config.checkpoint_every == 0 and done < config.steps:
            state_path, saved_step = checkpoint(done), done

    if saved_step != config.steps:
        state_path = checkpoint(config.steps)
    if lora_path is not None:
        metadata = {**lora_metadata(config, dataset, base_metadata or {}), RUN_ID_KEY: run_id}
        save_adapter_file(lora_path, adapters, config.adapter_config(), metadata)
        log(f"[fluxtrain] LoRA written to {Path(lora_path).name}")
    return TrainResult(config.steps, losses, False, lora_path, state_path, config)


def lora_metadata(config: TrainConfig, dataset: EncodedDataset, base: dict) -> dict:
    """What a LoRA file says about how it was made. Names and hashes only, no paths."""
    return {
        "fluxtrain_version": __version__,
        "base_model": base.get("name", "unknown"),
        "base_model_hash": base.get("hash", ""),
        "base_variant": base.get("variant", ""),
        "guidance": config.guidance,
        "training": config.to_dict(),
        "dataset_size": len(dataset),
        "buckets": dataset.bucket_counts(),
        **{k: v for k, v in base.items() if k not in ("name", "hash", "variant")},
    }


def make_optimizer(config: TrainConfig, params, device) -> torch.optim.Optimizer:
    if config.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=config.learning_rate, weight_decay=config.weight_decay)
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             fused=device.type == "cuda")


# Settings a resumed run may change: more steps, the checkpoint cadence, and where and
# how fast the same arithmetic runs (a run may move to another card); all else must match.
_RESUME_MAY_CHANGE = {"steps", "checkpoint_every", "memory", "fp8_compute", "compile_blocks",
                      "cuda_graphs"}


def _check_resumable(saved: dict, config: TrainConfig) -> None:
    now = config.to_dict()
    # A setting added since the checkpoint was written counts as its default there.
    saved = {**TrainConfig().to_dict(), **saved}
    differ = {k: (saved.get(k), now[k]) for k in now
              if k not in _RESUME_MAY_CHANGE and saved.get(k) != now[k]}
    if differ:
        detail = ", ".join(f"{k}: saved {a!r}, now {b!r}" for k, (a, b) in differ.items())
        raise ValueError(f"the run folder holds a checkpoint made with other settings ({detail}); "
                         "use the same settings to resume, or a new run name to start over")


def _chunks(items: list, size: int):
    return [items[i:i + size] for i in range(0, len(items), size)]
