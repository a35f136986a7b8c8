"""Resumable training state: safetensors for tensors, JSON for the rest, never pickle.

A run folder holds checkpoints `checkpoints/step-000100/` (written to a temporary
folder, then renamed, so a crash never leaves a half checkpoint) and a
`latest.json` pointer, replaced atomically after the folder is in place. The two
newest checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from .files import atomic_write_json, atomic_write_safetensors, fsync_folder

KEEP_CHECKPOINTS = 2


@dataclass
class TrainingState:
    step: int
    lora: dict[str, torch.Tensor]
    optimizer: dict            # torch optimizer state_dict, tensors included
    sampler: dict              # batch sampler position
    config: dict               # the TrainConfig it was started with
    losses: list[float]        # loss per finished step, for curves after resume
    path: Path | None = None


def save_state(run_dir: Path, state: TrainingState) -> Path:
    run_dir = Path(run_dir)
    checkpoints = run_dir / "checkpoints"
    checkpoints.mkdir(parents=True, exist_ok=True)
    final = checkpoints / f"step-{state.step:06d}"
    tmp = checkpoints / f".step-{state.step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()

    # Each write is fsynced with its folder, so the folder is durable before the rename.
    optim_tensors, optim_json = _split_optimizer_state(state.optimizer)
    atomic_write_safetensors(state.lora, tmp / "lora.safetensors")
    atomic_write_safetensors(optim_tensors, tmp / "optimizer.safetensors")
    atomic_write_json(tmp / "state.json", {
        "step": state.step, "optimizer": optim_json, "sampler": state.sampler,
        "config": state.config, "losses": state.losses})
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_folder(checkpoints)
    atomic_write_json(run_dir / "latest.json", {"checkpoint": final.name, "step": state.step})
    for old in sorted(p for p in checkpoints.glob("step-*") if p.is_dir())[:-KEEP_CHECKPOINTS]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_latest_state(run_dir: Path) -> TrainingState | None:
    """The newest complete checkpoint of a run, or None when the run has none."""
    pointer = Path(run_dir) / "latest.json"
    if not pointer.exists():
        return None
    folder = Path(run_dir) / "checkpoints" / json.loads(pointer.read_text())["checkpoint"]
    if not (folder / "state.json").exists():
        raise FileNotFoundError(
            f"{pointer} points at {folder.name}, which is missing or incomplete; delete "
            f"latest.json to start the run over, or restore the checkpoint folder")
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
