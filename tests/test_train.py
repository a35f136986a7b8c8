"""The training loop: guidance fed 1.0, exact resume and recovery of a planted change for
every adapter, errors, the CLI."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import signal

import pytest
import torch
from safetensors.torch import save_file

from fluxtrain import cli
from fluxtrain.flux import Flux
from fluxtrain.adapters import AdapterConfig, adapter_delta, adapter_state_dict, attach_adapters
from fluxtrain.lora import (RUN_ID_KEY, LoRAFileError, adapter_deltas,
                            load_lora_file, lora_deltas)
from fluxtrain.params import TINY
from fluxtrain.state import load_latest_state, run_identity
from fluxtrain.synthetic import write_bfl
from fluxtrain.train import (TrainConfig, TrainingDiverged, flow_inputs, learning_rate_at, train,
                             velocity_loss)



def tiny_model(tiny_sd) -> Flux:
    model = Flux(TINY)
    model.load_state_dict(tiny_sd)
    return model


def cpu_config(**overrides) -> TrainConfig:
    settings = dict(steps=6, learning_rate=1e-3, rank=4, alpha=4.0, compute_dtype="float32",
                    checkpoint_every=0, seed=3)
    settings.update(overrides)
    return TrainConfig(**settings)


@pytest.fixture
def dataset(make_dataset, tmp_path):
    return make_dataset(tmp_path / "data")


@pytest.mark.parametrize("guidance", [1.0, 3.5])
def test_guidance_embedding_receives_exactly_the_configured_value(tiny_sd, dataset, tmp_path, guidance):
    model = tiny_model(tiny_sd)
    seen = []
    model.guidance_in.register_forward_pre_hook(lambda module, args: seen.append(args[0].clone()))
    config = cpu_config(steps=4, batch_size=2, guidance=guidance)
    train(model, dataset, config, tmp_path / "run", log=lambda _: None)
    values = torch.cat(seen)
    assert len(seen) == 4 and values.numel() > 4       # every step, batches of 1 and 2 samples
    assert torch.equal(values, torch.full_like(values, guidance))


def test_timesteps_and_guidance_reach_the_embedders_in_float32_under_bf16_compute(tiny_sd, dataset,
                                                                                  tmp_path):
    """ComfyUI samples with float32 timesteps; rounded to bf16 on the way in, the conditioning
    the LoRA learns under would differ from the one it is used under."""
    model = tiny_model(tiny_sd)
    seen = {"time_in": [], "guidance_in": []}
    for name, values in seen.items():
        getattr(model, name).register_forward_pre_hook(lambda module, args, v=values: v.append(args[0]))
    train(model, dataset, cpu_config(steps=3, compute_dtype="bfloat16", guidance=1.01),
          tmp_path / "run", log=lambda _: None)
    times, guidance = torch.cat(seen["time_in"]), torch.cat(seen["guidance_in"])
    assert times.dtype == torch.float32 and guidance.dtype == torch.float32
    assert not torch.equal(times, times.bfloat16().float()), "the timesteps were rounded to bf16"
    assert torch.equal(guidance, torch.full_like(guidance, 1.01))


def test_default_guidance_is_one():
    assert TrainConfig().guidance == 1.0


def run_losses(tiny_sd, dataset, run_dir, config, stop_after=None):
    model = tiny_model(tiny_sd)
    done = []

    def should_stop():
        return stop_after is not None and len(done) >= stop_after

    result = train(model, dataset, config, run_dir, on_step=lambda r: done.append(r.loss),
                   should_stop=should_stop, log=lambda _: None)
    adapters = {name: m.lora for name, m in model.named_modules() if getattr(m, "lora", None) is not None}
    return result, adapter_state_dict(adapters)


ADAPTERS = [dict(adapter="lora"), dict(adapter="lokr", lokr_factor=4),
            dict(adapter="lokr", lokr_factor=-1, lokr_full_matrix=False), dict(adapter="loha"),
            dict(adapter="dora")]
ADAPTER_IDS = ["lora", "lokr", "lokr-low-rank", "loha", "dora"]


@pytest.mark.parametrize("adapter", ADAPTERS, ids=ADAPTER_IDS)
def test_resumed_run_equals_uninterrupted_run_bitwise(tiny_sd, dataset, tmp_path, adapter):
    # Dropout, caption dropout and accumulation all draw random numbers: each must resume exactly.
    config = cpu_config(steps=7, dropout=0.1, caption_dropout=0.3, grad_accum=2,
                        lr_schedule="cosine", warmup_steps=2, **adapter)
    straight, straight_deltas = run_losses(tiny_sd, dataset, tmp_path / "straight", config)

    first, _ = run_losses(tiny_sd, dataset, tmp_path / "resumed", config, stop_after=3)
    assert first.cancelled and first.steps_done == 3 and len(first.losses) == 3
    resumed, resumed_deltas = run_losses(tiny_sd, dataset, tmp_path / "resumed", config)

    assert not resumed.cancelled
    assert resumed.losses == straight.losses                   # bitwise: list of Python floats
    assert straight_deltas.keys() == resumed_deltas.keys()
    for name in straight_deltas:
        assert torch.equal(straight_deltas[name], resumed_deltas[name]), name
    assert straight.losses[-1] != straight.losses[0]


def test_resume_with_other_settings_is_refused(tiny_sd, dataset, tmp_path):
    run_losses(tiny_sd, dataset, tmp_path / "run", cpu_config(steps=4), stop_after=2)
    with pytest.raises(ValueError, match=r"learning_rate: saved 0.001, now 0.002"):
        run_losses(tiny_sd, dataset, tmp_path / "run", cpu_config(steps=4, learning_rate=2e-3))


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tiny_sd, dataset, tmp_path):
    model = tiny_model(tiny_sd)
    calls = []

    def poison(module, args, output):   # the 4th forward returns NaN
        calls.append(1)
        return output * float("nan") if len(calls) == 4 else output

    model.final_layer.register_forward_hook(poison)
    with pytest.raises(TrainingDiverged, match=r"at step 4.*step-000002"):
        train(model, dataset, cpu_config(steps=6, checkpoint_every=2), tmp_path / "run",
              log=lambda _: None)
    latest = json.loads((tmp_path / "run" / "latest.json").read_text())
    assert latest["step"] == 2


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipped", "no clipping"])
def test_non_finite_gradient_stops_like_a_non_finite_loss(tiny_sd, dataset, tmp_path, max_grad_norm):
    """A finite loss with a NaN gradient: the run stops naming the step, no NaN reaches the
    LoRA file or a checkpoint, and the last good checkpoint stays the latest."""
    model = tiny_model(tiny_sd)
    calls = []

    def poison_gradient(module, args, output):   # the 4th step's backward turns NaN
        calls.append(1)
        if len(calls) == 4:
            output.register_hook(lambda grad: grad * float("nan"))
        return output

    model.double_blocks[0].img_attn.proj.register_forward_hook(poison_gradient)
    lora = tmp_path / "lora.safetensors"
    with pytest.raises(TrainingDiverged, match=r"gradient norm became nan at step 4.*step-000002"):
        train(model, dataset, cpu_config(steps=6, checkpoint_every=2, max_grad_norm=max_grad_norm),
              tmp_path / "run", lora_path=lora, log=lambda _: None)
    assert not lora.exists()
    latest = load_latest_state(tmp_path / "run")
    assert latest.step == 2 and all(torch.isfinite(t).all() for t in latest.lora.values())


def test_checkpoints_keep_the_two_newest_and_a_broken_pointer_is_named(tiny_sd, dataset, tmp_path):
    run_dir = tmp_path / "run"
    run_losses(tiny_sd, dataset, run_dir, cpu_config(steps=4, checkpoint_every=1))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000003", "step-000004"]
    assert json.loads((run_dir / "latest.json").read_text()) == {"checkpoint": "step-000004", "step": 4}
    shutil.rmtree(run_dir / "checkpoints" / "step-000004")
    with pytest.raises(FileNotFoundError, match="latest.json points at step-000004"):
        run_losses(tiny_sd, dataset, run_dir, cpu_config(steps=4, checkpoint_every=1))


def test_a_finished_run_asked_for_fewer_steps_refuses_and_keeps_its_lora(tiny_sd, dataset, tmp_path):
    run_dir, lora = tmp_path / "run", tmp_path / "loras" / "run.safetensors"
    train(tiny_model(tiny_sd), dataset, cpu_config(steps=6), run_dir, lora_path=lora, log=lambda _: None)
    written = lora.read_bytes()
    with pytest.raises(ValueError, match="already trained 6 steps, more than the 3 asked for"):
        train(tiny_model(tiny_sd), dataset, cpu_config(steps=3), run_dir, lora_path=lora,
              log=lambda _: None)
    assert lora.read_bytes() == written and load_latest_state(run_dir).step == 6

    # The same step count again: nothing trains, the LoRA comes back with its true step count.
    steps = []
    again = train(tiny_model(tiny_sd), dataset, cpu_config(steps=6), run_dir, lora_path=lora,
                  on_step=steps.append, log=lambda _: None)
    assert steps == [] and again.steps_done == 6 and len(again.losses) == 6
    assert json.loads(load_lora_file(lora)[1]["training"])["steps"] == 6
    first, now = load_file_tensors(written), load_lora_file(lora)[0]
    assert first.keys() == now.keys() and all(torch.equal(first[k], now[k]) for k in first)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000006"], \
        "a finished step was saved again"


def load_file_tensors(data: bytes) -> dict:
    from safetensors.torch import load
    return load(data)


def foreign_lora(path):
    """A LoRA file no run of ours wrote (a download, another trainer's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"lora_unet_txt_in.lora_down.weight": torch.ones(1, 48)}, str(path),
              metadata={"ss_network_module": "networks.lora_flux"})
    return path.read_bytes()


def test_a_lora_file_the_run_did_not_write_is_kept_unless_overwrite_is_asked(tiny_sd, dataset, tmp_path):
    lora = tmp_path / "loras" / "precious.safetensors"
    precious = foreign_lora(lora)
    steps = []
    with pytest.raises(LoRAFileError, match="precious.safetensors already exists.*overwrite_lora"):
        train(tiny_model(tiny_sd), dataset, cpu_config(steps=2), tmp_path / "run", lora_path=lora,
              on_step=steps.append, log=lambda _: None)
    assert lora.read_bytes() == precious and steps == [], "refused only after training"

    train(tiny_model(tiny_sd), dataset, cpu_config(steps=2), tmp_path / "run", lora_path=lora,
          overwrite_lora=True, log=lambda _: None)
    assert load_lora_file(lora)[1][RUN_ID_KEY] == run_identity(tmp_path / "run")
    # Its own earlier output: resumed with more steps, the run writes over it without asking.
    train(tiny_model(tiny_sd), dataset, cpu_config(steps=3), tmp_path / "run", lora_path=lora,
          log=lambda _: None)
    assert json.loads(load_lora_file(lora)[1]["training"])["steps"] == 3
    # Another run's output is not this run's.
    with pytest.raises(LoRAFileError, match="another training run's output"):
        train(tiny_model(tiny_sd), dataset, cpu_config(steps=2), tmp_path / "other", lora_path=lora,
              log=lambda _: None)


def plant(target, kind: str, rank: int) -> AdapterConfig:
    """A known random change of the attention layers of `target`, about the weights' own
    scale: Kronecker-structured for LoKr, else of rank `rank`, which LoRA, LoHa (one pair
    holding it, the other all ones) and DoRA (m = the new column norms) can each represent
    exactly. Returns the config of the adapter that must learn it."""
    student = AdapterConfig(rank=rank, alpha=rank, targets="attention", lokr_factor=4, adapter=kind)
    g = torch.Generator().manual_seed(11)
    planted = attach_adapters(target, dataclasses.replace(
        student, adapter="lokr" if kind == "lokr" else "lora"), seed=5)
    with torch.no_grad():
        for name, adapter in planted.items():
            weight = target.get_submodule(name).weight
            for p in adapter.parameters():
                p.copy_(torch.randn(p.shape, generator=g))
            wanted = weight.std() / 3 ** 0.5      # what a kaiming-scaled LoRA of up ~ N(0, 1) gives
            first = next(adapter.parameters())
            first.mul_(wanted / adapter_delta(adapter, weight).std())
    target.requires_grad_(False)
    return student


# LoHa's Hadamard product has to learn to hold a low-rank change in one of its pairs (the
# other turning constant): it gets there, in 3x LoRA's steps (89% closed after 1600).
STEPS = {"loha": 2400}


@pytest.mark.parametrize("kind", ["lora", "lokr", "loha", "dora"])
def test_adapter_recovers_a_planted_change(tiny_sd, dataset, kind):
    """Target = base + a random low-rank (LoKr: Kronecker) change of the attention
    layers (`plant`). Trained on the target's velocities, the adapter from its initial (no-op) state
    must close >= 90% of the base-target gap on held-out noise and timesteps."""
    base, target = tiny_model(tiny_sd), tiny_model(tiny_sd)
    student = plant(target, kind, rank=4)
    config = cpu_config(steps=STEPS.get(kind, 800), learning_rate=1e-2, lr_schedule="cosine",
                        timestep_sampling="uniform")
    buckets = [[dataset[i] for i in range(len(dataset)) if dataset.samples[i].bucket == b]
               for b in sorted({s.bucket for s in dataset.samples})]

    def batches(seed, count):
        gen = torch.Generator().manual_seed(seed)
        for k in range(count):
            group = buckets[k % len(buckets)]
            batch = {key: torch.stack([s[key] for s in group]) for key in ("latent", "t5", "clip")}
            inputs, _ = flow_inputs(batch, config, gen)
            with torch.no_grad():
                wanted = target(**inputs)
            yield inputs, wanted

    def gap(model):
        with torch.no_grad():
            return sum(velocity_loss(model(**x), y, config).item() for x, y in batches(999, 16))

    adapters = attach_adapters(base, student, seed=0)
    before = gap(base)
    params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    for step, (x, y) in enumerate(batches(1, config.steps)):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate_at(config, step)
        velocity_loss(base(**x), y, config).backward()
        optimizer.step()
        optimizer.zero_grad()
    after = gap(base)
    assert before > 1e-3
    print(f"[recovery] {kind}: gap {before:.5f} -> {after:.5f}, {1 - after / before:.1%} closed")
    assert after <= 0.1 * before, f"gap {before:.5f} -> {after:.5f}: only {1 - after / before:.0%} closed"


def test_loss_goes_down_on_a_small_dataset(tiny_sd, make_dataset, tmp_path):
    """Memorising 2 samples: the mean loss of the last steps is well below the first ones."""
    data = make_dataset(tmp_path / "data", buckets=((4, 4),), per_bucket=2)
    result, _ = run_losses(tiny_sd, data, tmp_path / "run",
                           cpu_config(steps=120, learning_rate=3e-3, rank=8, alpha=8.0,
                                      timestep_sampling="uniform"))
    first, last = sum(result.losses[:20]) / 20, sum(result.losses[-20:]) / 20
    assert last < 0.8 * first, (first, last)


def test_lora_file_carries_the_recipe_and_reads_back(tiny_sd, dataset, tmp_path):
    model = tiny_model(tiny_sd)
    lora_path = tmp_path / "loras" / "run.safetensors"
    result = train(model, dataset, cpu_config(steps=3), tmp_path / "run", lora_path=lora_path,
                   base_metadata={"name": "flux-dev2pro-fp8.safetensors", "hash": "abc", "variant": "dev2pro"},
                   log=lambda _: None)
    deltas = lora_deltas(lora_path, TINY)
    _, metadata = load_lora_file(lora_path)
    adapters = {name: m.lora for name, m in model.named_modules() if getattr(m, "lora", None) is not None}
    expected = adapter_deltas(adapters)
    assert deltas.keys() == expected.keys()
    for name, delta in expected.items():    # the file is bf16: compare at bf16 precision
        torch.testing.assert_close(deltas[name], delta, rtol=2e-2, atol=1e-5)
    assert json.loads(metadata["guidance"]) == 1.0
    assert metadata["base_model"] == "flux-dev2pro-fp8.safetensors"
    assert json.loads(metadata["training"])["steps"] == 3
    assert json.loads(metadata["dataset_size"]) == len(dataset)
    assert str(tmp_path) not in json.dumps(metadata)
    assert result.lora_path == lora_path


@pytest.mark.parametrize("step,expected", [(0, 0.25), (3, 1.0), (4, 1.0), (10, 0.5), (16, 0.0)])
def test_cosine_schedule_with_warmup(step, expected):
    config = TrainConfig(steps=16, learning_rate=1.0, warmup_steps=4, lr_schedule="cosine")
    # after warm-up: 0.5 * (1 + cos(pi * (step - 4) / 12))
    reference = (step + 1) / 4 if step < 4 else 0.5 * (1 + math.cos(math.pi * (step - 4) / 12))
    assert learning_rate_at(config, step) == pytest.approx(reference)
    assert learning_rate_at(config, step) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("bad,message", [
    (dict(optimizer="sgd"), "optimizer 'sgd' is not one of adamw, adafactor"),
    (dict(timestep_sampling="sigma"), "timestep_sampling 'sigma' is not one of"),
    (dict(caption_dropout=1.5), "caption_dropout must be between 0.0 and 0.99, got 1.5"),
])
def test_bad_settings_are_named(bad, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**bad)


def test_adafactor_trains(tiny_sd, dataset, tmp_path):
    result, state = run_losses(tiny_sd, dataset, tmp_path / "run", cpu_config(steps=3, optimizer="adafactor"))
    assert any(t.abs().sum() > 0 for k, t in state.items() if k.endswith("lora_up.weight"))


def test_cli_trains_from_a_float8_checkpoint_and_resumes(tiny_sd, dataset, tmp_path, capsys):
    base = tmp_path / "models" / "flux-dev2pro-fp8.safetensors"
    base.parent.mkdir()
    write_bfl(tiny_sd, base, dtype=torch.float8_e4m3fn, prefix="model.diffusion_model.")
    lora = tmp_path / "out" / "lora.safetensors"
    argv = ["--base", str(base), "--dataset", str(dataset.folder), "--lora", str(lora),
            "--run-dir", str(tmp_path / "run"), "--steps", "3", "--rank", "4",
            "--compute-dtype", "float32", "--device", "cpu"]
    assert cli.main(argv) == 0
    assert lora.exists()
    out = capsys.readouterr().out
    assert "step 3/3" in out and "float8_e4m3fn" in out
    argv[argv.index("--steps") + 1] = "5"
    assert cli.main(argv) == 0                          # more steps: resumes at 3
    out = capsys.readouterr().out
    assert "resuming run at step 3/5" in out and "step 4/5" in out and "step 1/5" not in out


def test_cli_refuses_to_resume_a_run_on_another_base_as_the_node_does(tiny_sd, dataset, tmp_path, capsys):
    models = tmp_path / "models"
    models.mkdir()
    write_bfl(tiny_sd, models / "flux-dev2pro.safetensors", dtype=torch.bfloat16)
    write_bfl(tiny_sd, models / "flux1-dev.safetensors", dtype=torch.float32)
    argv = ["--base", str(models / "flux-dev2pro.safetensors"), "--dataset", str(dataset.folder),
            "--lora", str(tmp_path / "lora.safetensors"), "--run-dir", str(tmp_path / "run"),
            "--steps", "2", "--rank", "4", "--compute-dtype", "float32", "--device", "cpu"]
    assert cli.main(argv) == 0
    argv[argv.index("--steps") + 1] = "3"
    argv[1] = str(models / "flux1-dev.safetensors")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "started on other inputs" in err and "flux-dev2pro.safetensors" in err and "step 3/3" not in err


def test_cli_keeps_a_foreign_lora_unless_told_to_overwrite(tiny_sd, dataset, tmp_path, capsys):
    base = tmp_path / "flux-dev2pro.safetensors"
    write_bfl(tiny_sd, base, dtype=torch.bfloat16)
    lora = tmp_path / "precious.safetensors"
    precious = foreign_lora(lora)
    argv = ["--base", str(base), "--dataset", str(dataset.folder), "--lora", str(lora),
            "--run-dir", str(tmp_path / "run"), "--steps", "1", "--rank", "4",
            "--compute-dtype", "float32", "--device", "cpu"]
    assert cli.main(argv) == 2
    assert "--overwrite-lora" in capsys.readouterr().err and lora.read_bytes() == precious
    assert cli.main(argv + ["--overwrite-lora"]) == 0
    assert RUN_ID_KEY in load_lora_file(lora)[1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_saves_a_checkpoint_on_ctrl_c_or_sigterm_and_resumes(tiny_sd, dataset, tmp_path, signum,
                                                                 monkeypatch, capsys):
    """The signal arrives while step 2 reports, as a Ctrl-C in the terminal would."""
    base = tmp_path / "flux-dev2pro.safetensors"
    write_bfl(tiny_sd, base, dtype=torch.bfloat16)
    run_dir = tmp_path / "run"
    argv = ["--base", str(base), "--dataset", str(dataset.folder), "--lora", str(tmp_path / "l.safetensors"),
            "--run-dir", str(run_dir), "--rank", "4", "--compute-dtype", "float32", "--device", "cpu",
            "--checkpoint-every", "0"]
    real_train = cli.train

    def train_signalled_at_step_2(*args, on_step, **kwargs):
        def report(r):
            on_step(r)
            if r.step == 2:
                os.kill(os.getpid(), signum)
        return real_train(*args, on_step=report, **kwargs)

    monkeypatch.setattr(cli, "train", train_signalled_at_step_2)
    handler = signal.getsignal(signum)
    assert cli.main(argv + ["--steps", "100000"]) == 128 + signum
    err = capsys.readouterr().err
    assert f"stopped by {signal.Signals(signum).name} after step 2 of 100000" in err
    assert "Run the same command again to resume" in err
    saved = load_latest_state(run_dir)
    assert saved.step == 2 and len(saved.losses) == 2
    assert signal.getsignal(signum) == handler, "the run's handler outlived it"

    monkeypatch.setattr(cli, "train", real_train)
    assert cli.main(argv + ["--steps", "3"]) == 0
    assert "resuming run at step 2/3" in capsys.readouterr().out


def test_cli_reports_bad_input_without_a_traceback(dataset, tmp_path, capsys):
    argv = ["--base", str(tmp_path / "missing.safetensors"), "--dataset", str(dataset.folder),
            "--lora", str(tmp_path / "l.safetensors"), "--run-dir", str(tmp_path / "r")]
    assert cli.main(argv) == 2
    assert "missing.safetensors" in capsys.readouterr().err
    argv[argv.index("--dataset") + 1] = str(tmp_path / "no_dataset")
    assert cli.main(argv) == 2
    assert "no_dataset" in capsys.readouterr().err


def test_cli_help_lists_every_setting_with_its_help(capsys):
    # argparse %-formats help texts: a setting whose help says "2%" once broke --help
    from dataclasses import fields
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    for f in fields(TrainConfig):
        assert "--" + f.name.replace("_", "-") in out
        assert " ".join(f.metadata["help"].split())[:40] in out


def test_new_settings_come_after_the_ones_saved_workflows_know():
    # A saved workflow lists the Train node's widget values by position; a setting
    # inserted in the middle would shift every later value into the wrong widget.
    from dataclasses import fields
    from pathlib import Path
    shipped = json.loads((Path(__file__).parent / "data" / "train_settings_order.json").read_text())
    names = [f.name for f in fields(TrainConfig)]
    assert names[:len(shipped["settings"])] == shipped["settings"]
