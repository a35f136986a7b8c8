"""Headless training: the same engine and settings as the ComfyUI node.

    python -m fluxtrain.cli --base flux-dev2pro-fp8.safetensors --dataset encoded/ \
        --lora out/my_lora.safetensors --run-dir runs/my_lora --steps 1500

Every TrainConfig field is an option (--learning-rate, --guidance, ...); --config
reads them from a JSON file first. Re-running the same command resumes the run.
Ctrl-C or SIGTERM saves a checkpoint before the next step and exits (130 / 143).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from dataclasses import fields
from pathlib import Path

import torch

from .checkpoint import checkpoint_size, content_hash, describe_checkpoint
from .dataset import EncodedDataset
from .memory import MemoryPlanError
from .placement import load_base_for_training
from .train import TrainConfig, TrainingDiverged, prepare_run, run_inputs, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fluxtrain.cli", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, type=Path,
                        help="Flux-Dev2Pro or Flux-dev transformer: a .safetensors file or a diffusers folder")
    parser.add_argument("--dataset", required=True, type=Path, help="encoded dataset folder (dataset.json)")
    parser.add_argument("--lora", required=True, type=Path, help="LoRA file to write (.safetensors)")
    parser.add_argument("--run-dir", required=True, type=Path,
                        help="folder for resumable checkpoints; the same folder resumes the run")
    parser.add_argument("--config", type=Path, help="JSON file of training settings")
    parser.add_argument("--overwrite-lora", action="store_true",
                        help="replace the --lora file even when it is not this run's own output "
                             "(by default an existing file another run or tool wrote is kept and "
                             "the run refused)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    for f in fields(TrainConfig):
        option = "--" + f.name.replace("_", "-")
        kind = type(f.default)      # every setting has a default
        # argparse %-formats help texts: a literal % must be doubled
        help_text = f"{f.metadata['help']} (default {f.default})".replace("%", "%%")
        if kind is bool:
            parser.add_argument(option, type=_parse_bool, default=None, metavar="true|false",
                                help=help_text)
        else:
            parser.add_argument(option, type=kind, default=None, help=help_text,
                                choices=f.metadata.get("choices"))
    return parser


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    settings = json.loads(args.config.read_text()) if args.config else {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name)
        if value is not None:
            settings[f.name] = value
    return TrainConfig.from_dict(settings)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = config_from_args(args)
        if args.lora.suffix != ".safetensors":
            raise ValueError(f"--lora must end in .safetensors, got {args.lora.name}")
        dataset = EncodedDataset.open(args.dataset)
        inputs = run_inputs(describe_checkpoint(args.base).name, checkpoint_size(args.base), dataset)
        prepare_run(args.run_dir, config, inputs=inputs, lora_path=args.lora,
                    overwrite_lora=args.overwrite_lora)
        placed = load_base_for_training(args.base, config, dataset, args.device)
    except (ValueError, FileNotFoundError, MemoryPlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    model, info = placed.model, placed.info
    print(f"[fluxtrain] base {info.name}: {info.format}, {info.dtype}, "
          f"{info.params.depth}+{info.params.depth_single_blocks} blocks; dataset {len(dataset)} samples")
    args.lora.parent.mkdir(parents=True, exist_ok=True)
    base = {"name": info.name, "hash": content_hash(args.base), "variant": info.variant}

    def report(r):
        print(f"[fluxtrain] step {r.step}/{r.total} loss {r.loss:.5f} lr {r.learning_rate:.2e} "
              f"{r.seconds:.2f}s", flush=True)

    try:
        with StopOnSignal() as stop:
            result = train(model, dataset, config, args.run_dir, lora_path=args.lora,
                           base_metadata=base, inputs=inputs, overwrite_lora=args.overwrite_lora,
                           on_step=report, should_stop=stop)
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    finally:
        placed.release()
    if result.cancelled:
        print(f"stopped by {stop.signal_name} after step {result.steps_done} of {config.steps}; "
              f"the run is saved in {result.state_path}. Run the same command again to resume.",
              file=sys.stderr)
        return 128 + stop.received
    return 0


class StopOnSignal:
    """SIGINT (Ctrl-C) and SIGTERM ask the run to stop before its next step, where the engine
    saves a checkpoint (its should_stop path); a second signal stops at once, unsaved."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM") if hasattr(signal, name))

    def __init__(self):
        self.received = 0
        self._previous = {}

    def __call__(self) -> bool:
        return bool(self.received)

    @property
    def signal_name(self) -> str:
        return signal.Signals(self.received).name

    def _handle(self, signum, frame):
        if self.received:           # asked twice: the usual behaviour of that signal
            signal.signal(signum, self._previous[signum])
            signal.raise_signal(signum)
            return
        self.received = signum
        print(f"[fluxtrain] {signal.Signals(signum).name}: saving a checkpoint after this step "
              "(send it again to stop at once without saving)", file=sys.stderr, flush=True)

    def __enter__(self) -> "StopOnSignal":
        if threading.current_thread() is threading.main_thread():   # handlers live there only
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


if __name__ == "__main__":
    sys.exit(main())
