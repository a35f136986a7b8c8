"""Resumable run state (fluxtrain.state): one folder per run that holds no other run,
checkpoints that latest.json always finds complete, leftovers of killed saves removed."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from fluxtrain import state as state_module
from fluxtrain.files import UnsafePathError
from fluxtrain.state import (TrainingState, adopt_old_layout, load_latest_state, run_folder,
                             run_identity, save_state, start_over)


def make_state(step: int, value: float = 0.0) -> TrainingState:
    """A small state whose tensors say which save they came from."""
    return TrainingState(
        step=step, lora={"a.lora_down.weight": torch.full((2, 3), value)},
        optimizer={"state": {0: {"step": torch.tensor(float(step)), "exp_avg": torch.full((2,), value)}},
                   "param_groups": [{"lr": 0.1, "params": [0]}]},
        sampler={"epoch": 0, "position": step}, config={"steps": 10}, losses=[value] * step)


def assert_loads(run_dir: Path, step: int, value: float) -> None:
    loaded = load_latest_state(run_dir)
    assert loaded is not None and loaded.step == step
    assert torch.equal(loaded.lora["a.lora_down.weight"], torch.full((2, 3), value))
    assert torch.equal(loaded.optimizer["state"][0]["exp_avg"], torch.full((2,), value))


# ---------------------------------------------------------------- item 1: one folder per run

NESTED = ["adv", "adv/baseline", "adv/baseline/checkpoints/step-000002", "dev2pro/adv"]


def test_no_run_folder_is_inside_another(tmp_path):
    folders = [run_folder(tmp_path, name) for name in NESTED]
    for a in folders:
        for b in folders:
            assert a == b or a not in b.parents, f"{b} is inside {a}"


def test_starting_a_run_over_keeps_every_other_run(tmp_path):
    for n, name in enumerate(NESTED):
        save_state(run_folder(tmp_path, name), make_state(2, value=n))
    start_over(run_folder(tmp_path, "adv"))
    assert load_latest_state(run_folder(tmp_path, "adv")) is None
    for n, name in enumerate(NESTED[1:], start=1):
        assert_loads(run_folder(tmp_path, name), 2, n)


@pytest.mark.parametrize("name", ["adv.run/x", "a/B.RUN/x"])
def test_a_name_that_would_reach_into_a_run_folder_is_refused(tmp_path, name):
    with pytest.raises(UnsafePathError, match="ending in '.run'"):
        run_folder(tmp_path, name)
    assert run_folder(tmp_path, "x.run").name == "x.run.run"     # a last part may: no clash


def test_a_run_of_the_old_layout_moves_into_its_folder_and_resumes(tmp_path):
    old = tmp_path / "adv"
    save_state(old, make_state(4, value=4))
    save_state(tmp_path / "adv" / "inner", make_state(2, value=2))    # an old nested run
    run_dir = run_folder(tmp_path, "adv")
    assert adopt_old_layout(tmp_path, "adv", run_dir)
    assert_loads(run_dir, 4, 4)
    assert not (old / "latest.json").exists() and (old / "inner" / "latest.json").exists()
    assert not adopt_old_layout(tmp_path, "adv", run_dir)     # once only


def test_starting_over_keeps_the_run_identity(tmp_path):
    run_dir = run_folder(tmp_path, "adv")
    identity = run_identity(run_dir)
    save_state(run_dir, make_state(2))
    start_over(run_dir)
    assert run_identity(run_dir) == identity and len(identity) == 32
    assert run_identity(run_folder(tmp_path, "other")) != identity


# ---------------------------------------------------------------- item 4: a crash at any point of a save

class Crash(BaseException):
    """The process dies here: nothing after it runs, not even cleanup handlers' file operations."""


FILE_OPERATIONS = [(os, "replace"), (os, "rename"), (os, "unlink"), (os, "remove"), (os, "rmdir"),
                   (os, "mkdir"), (os, "fsync"), (shutil, "rmtree"), (Path, "write_bytes")]


def crash_at(monkeypatch, k: int) -> list[str]:
    """Make the k-th file operation (and every later one) raise Crash; returns the log of
    operations seen. safetensors' writer counts as one operation."""
    import safetensors.torch

    seen = []

    def wrap(name, real):
        def op(*args, **kwargs):
            seen.append(name)
            if len(seen) >= k:
                raise Crash(f"crash at operation {len(seen)} ({name})")
            return real(*args, **kwargs)
        return op

    for owner, name in FILE_OPERATIONS:
        monkeypatch.setattr(owner, name, wrap(name, getattr(owner, name)))
    monkeypatch.setattr(safetensors.torch, "save_file", wrap("save_file", safetensors.torch.save_file))
    return seen


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in [*run_dir.iterdir(), *(run_dir / "checkpoints").iterdir()]
                  if p.name.startswith("."))


@pytest.mark.parametrize("old_step, new_step", [(6, 6), (4, 6)], ids=["same step again", "next step"])
def test_latest_points_at_a_complete_checkpoint_whatever_operation_a_crash_interrupts(
        tmp_path, monkeypatch, old_step, new_step):
    """Crash between every two file operations of a save: latest.json always names a
    checkpoint that loads (the old or the new one), and the next save cleans up."""
    k = 0
    while True:
        k += 1
        run_dir = tmp_path / f"crash{k}"
        save_state(run_dir, make_state(2, value=0))
        save_state(run_dir, make_state(old_step, value=1))
        with monkeypatch.context() as patch:
            seen = crash_at(patch, k)
            try:
                save_state(run_dir, make_state(new_step, value=2))
                finished = True
            except Crash:
                finished = False
        loaded = load_latest_state(run_dir)
        assert (loaded.step, float(loaded.lora["a.lora_down.weight"][0, 0])) in \
            ((old_step, 1.0), (new_step, 2.0)), f"crash at {seen[-1:]}, operation {k}"
        if finished:
            break
        save_state(run_dir, make_state(new_step + 1, value=3))     # after the restart
        assert_loads(run_dir, new_step + 1, 3)
        assert leftovers(run_dir) == [], f"crash at operation {k} ({seen[-1]}) left {leftovers(run_dir)}"
    assert k > 10, f"only {k - 1} operations were interrupted: the simulation does not reach the save"
    assert_loads(run_dir, new_step, 2)
    assert len(list((run_dir / "checkpoints").iterdir())) == 2


def test_run_files_follow_the_umask(tmp_path, umask_027):
    run_dir = tmp_path / "runs" / "a.run"
    run_dir.parent.mkdir()
    run_identity(run_dir)
    save_state(run_dir, make_state(2))
    save_state(run_dir, make_state(2))
    assert umask_027(run_dir.parent) == []
