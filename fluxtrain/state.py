"""Resumable training state: safetensors for tensors, JSON for the rest, never pickle.

A run's state lives in its own folder (`run_folder`: `<runs root>/<name>.run/`), which
never holds another run's: a run named `adv/x` lives in `adv/x.run/`, beside `adv.run/`,
not inside it, so starting `adv` over cannot touch `adv/x`. The folder holds:

    run.json              the run's identity (a random id, kept when the run starts over);
                          LoRA files carry it, so a run overwrites only its own LoRA
    inputs.json           the base and dataset the run was started on
    latest.json           {"checkpoint": <folder name>, "step": N}, replaced atomically
    checkpoints/step-000100/        lora, optimizer (safetensors) and state.json

A checkpoint is written into a temporary folder and renamed to a name no folder has
yet (`step-000100`, or `step-000100.2` when that step was saved before), and only
then does latest.json point at it: at every instant latest.json names a complete
checkpoint. The checkpoint it names and the newest one of an earlier step are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .files import (UnsafePathError, atomic_write_json, atomic_write_safetensors, fsync_folder,
                    remove_leftovers, safe_join, temp_path)

RUN_SUFFIX = ".run"
RUN_FILES = ("latest.json", "inputs.json", "checkpoints")   # what starting over removes
IDENTITY_FILE = "run.json"


@dataclass
class TrainingState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict            # torch optimizer state_dict, tensors included
    sampler: dict              # batch sampler position
    config: dict               # the TrainConfig it was started with
    losses: list[float]        # loss per finished step, for curves after resume
    path: Path | None = None


# --------------------------------------------------------------------------- run folders

def run_folder(runs_root: str | os.PathLike, name: str) -> Path:
    """The state folder of run `name` under `runs_root`: `<name>.run`. No part of a name but
    the last may end in '.run', so no run's folder is ever inside another run's."""
    where = safe_join(runs_root, name, what="run name", example="dev2pro/my_lora")
    parts = where.relative_to(runs_root).parts
    clash = [p for p in parts[:-1] if p.lower().endswith(RUN_SUFFIX)]
    if clash:
        raise UnsafePathError(
            f"run name {name!r} has a folder part {clash[0]!r} ending in {RUN_SUFFIX!r}, which "
            f"would put it inside the state of run {clash[0][:-len(RUN_SUFFIX)]!r}; rename that "
            "part (e.g. 'dev2pro/my_lora')")
    return safe_join(runs_root, where.relative_to(runs_root).as_posix() + RUN_SUFFIX,
                     what="run name", example="dev2pro/my_lora")


def run_label(run_dir: Path) -> str:
    """The run's name as logs show it: the folder name without the '.run' suffix."""
    name = Path(run_dir).name
    return name[:-len(RUN_SUFFIX)] if name.endswith(RUN_SUFFIX) else name


def adopt_old_layout(runs_root: str | os.PathLike, name: str, run_dir: Path) -> bool:
    """Earlier versions kept a run's files directly in `<runs root>/<name>/`, where other
    runs' folders could nest. Move such a run's own files into its `.run` folder once."""
    old = safe_join(runs_root, name, what="run name")
    if run_dir.exists() or not (old / "latest.json").is_file():
        return False
    run_dir.mkdir(parents=True)
    for entry in RUN_FILES:
        if (old / entry).exists():
            os.replace(old / entry, run_dir / entry)
    fsync_folder(run_dir)
    return True


def start_over(run_dir: Path) -> None:
    """Remove the run's checkpoints and records; its identity stays, so its own LoRA
    file may still be replaced by the new start."""
    for entry in RUN_FILES:
        path = Path(run_dir) / entry
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def run_identity(run_dir: Path, create: bool = True) -> str | None:
    """The run's random id, kept in run.json; made on first use (None if not yet made and
    not `create`)."""
    record = Path(run_dir) / IDENTITY_FILE
    try:
        return json.loads(record.read_text())["run_id"]
    except FileNotFoundError:
        if not create:
            return None
        run_id = uuid.uuid4().hex
        atomic_write_json(record, {"run_id": run_id})
        return run_id
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{record} is damaged ({e}); delete it to give the run a new identity "
                         "(its LoRA file is then no longer recognised as its own)") from e


def check_same_inputs(run_dir: Path, inputs: dict) -> None:
    """A run resumes only on the base and dataset it was started on (inputs.json)."""
    record = Path(run_dir) / "inputs.json"
    if not record.is_file():
        return
    saved = json.loads(record.read_text())
    differ = [k for k in inputs if saved.get(k) != inputs[k]]
    if differ:
        raise ValueError(
            f"run {run_label(run_dir)!r} was started on other inputs ({', '.join(differ)}: "
            f"saved {[saved.get(k) for k in differ]}, now {[inputs[k] for k in differ]}); use "
            "a new run name (or run folder), or start that run over to replace it")


def record_inputs(run_dir: Path, inputs: dict) -> None:
    """Keep the base and dataset a run starts on, for check_same_inputs."""
    if not (Path(run_dir) / "inputs.json").is_file():
        atomic_write_json(Path(run_dir) / "inputs.json", inputs)


# --------------------------------------------------------------------------- checkpoints

def save_state(run_dir: Path, state: TrainingState) -> Path:
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    remove_leftovers(checkpoints)   # what saves killed before left
    final = _free_name(checkpoints, f"step-{state.step:06d}")
    tmp = temp_path(final)
    tmp.mkdir()

    # Each write is fsynced with its folder, so the folder is durable before the rename.
    optim_tensors, optim_json = _split_optimizer_state(state.optimizer)
    atomic_write_safetensors(state.lora, tmp / "lora.safetensors")
    atomic_write_safetensors(optim_tensors, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {
        "step": state.step, "optimizer": optim_json, "sampler": state.sampler,
        "config": state.config, "losses": state.losses})
    os.replace(tmp, final)      # onto a name no folder has: never over a checkpoint
    fsync_folder(checkpoints)
    atomic_write_json(run_dir / "latest.json", {"checkpoint": final.name, "step": state.step})
    _prune(checkpoints, keep=final)
    return final


def _free_name(folder: Path, name: str) -> Path:
    """`folder/name`, or `folder/name.2`, `.3`... if a checkpoint of that step exists."""
    path, n = folder / name, 1
    while path.exists():
        n += 1
        path = folder / f"{name}.{n}"
    return path


_CHECKPOINT_NAME = re.compile(r"step-(\d+)(?:\.(\d+))?")


def _save_order(path: Path) -> tuple[int, int] | None:
    """(step, save of that step) of a checkpoint folder name, None for other names."""
    match = _CHECKPOINT_NAME.fullmatch(path.name)
    return (int(match.group(1)), int(match.group(2) or 1)) if match else None


def _prune(checkpoints: Path, keep: Path) -> None:
    """Keep `keep` (latest.json's) and the newest checkpoint of an earlier step."""
    saved = sorted((p for p in checkpoints.iterdir()
                    if p != keep and p.is_dir() and _save_order(p) is not None), key=_save_order)
    earlier = [p for p in saved if _save_order(p)[0] < _save_order(keep)[0]]
    for old in saved:
        if not earlier or old != earlier[-1]:
            shutil.rmtree(old, ignore_errors=True)


def _latest_folder(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    folder = Path(run_dir) / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
    if not (folder / "state.json").exists():
        raise FileNotFoundError(
            f"{pointer} points at {folder.name}, which is missing or incomplete; delete "
            f"latest.json to start the run over, or restore the checkpoint folder")
    return folder


def latest_state_info(run_dir: Path) -> dict | None:
    """{"step", "config", ...} of the newest checkpoint, from its state.json alone (no
    tensors read), or None when the run has none."""
    folder = _latest_folder(run_dir)
    return None if folder is None else json.loads((folder / "state.json").read_text())


def load_latest_state(run_dir: Path) -> TrainingState | None:
    """The newest complete checkpoint of a run, or None when the run has none."""
    folder = _latest_folder(run_dir)
    if folder is None:
        return None
    meta = json.loads((folder / "state.json").read_text())
    optimizer = _join_optimizer_state(load_file(str(folder / "optimizer.safetensors")),
                                      meta["optimizer"])
    return TrainingState(step=meta["step"], lora=load_file(str(folder / "lora.safetensors")),
                         optimizer=optimizer, sampler=meta["sampler"], config=meta["config"],
                         losses=meta["losses"], path=folder)


def _split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state_dict -> (flat tensors, JSON-able rest)."""
    tensors, scalars = {}, {}
    for index, slots in sd["state"].items():
        for name, value in slots.items():
            key = f"{index}.{name}"
            if torch.is_tensor(value):
                tensors[key] = value
            else:
                scalars[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in [*tensors.items(), *meta["scalars"].items()]:
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}
