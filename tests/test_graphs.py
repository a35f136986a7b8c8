"""CUDA-graph steps (fluxtrain.graphs): what a replay depends on, checked on a CPU.

A CUDA graph replays the kernels it recorded on the tensors it recorded. The
recorder below does the same on a CPU: it re-runs the captured function on the
captured (static) tensors and writes the result into the captured output. So a
graphed run equals an eager run only if the inputs reach the static tensors,
the warm-up leaves the gradients alone and they accumulate in place."""

from __future__ import annotations

import gc
import weakref

import pytest
import torch

from fluxtrain import graphs
from fluxtrain import train as train_module
from fluxtrain.dataset import collate
from fluxtrain.flux import Flux
from fluxtrain.layers import Streamed
from fluxtrain.lora import attach_lora
from fluxtrain.params import TINY
from fluxtrain.train import MicroStep, TrainConfig, train


class ReplayRecorder:
    captures = 0

    def warm_up(self, fn):
        fn()

    def capture(self, fn):
        ReplayRecorder.captures += 1
        out = fn().clone()       # a real capture records without running; its effects are undone

        def replay():
            out.copy_(fn())
        return replay, out


def run(tiny_sd, dataset, run_dir, log=lambda _: None, **overrides):
    model = Flux(TINY)
    model.load_state_dict(tiny_sd)
    settings = dict(steps=5, learning_rate=1e-3, rank=4, alpha=4.0, compute_dtype="float32",
                    checkpoint_every=0, seed=3, grad_accum=2, lr_schedule="cosine")
    settings.update(overrides)
    losses = train(model, dataset, TrainConfig(**settings), run_dir, log=log).losses
    lora = {k: v.clone() for k, v in model.state_dict().items() if ".lora." in k}
    return losses, lora, model


def test_graphed_training_equals_eager_training(tiny_sd, make_dataset, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4), (4, 6)), per_bucket=3)
    eager_losses, eager_lora, _ = run(tiny_sd, dataset, tmp_path / "eager")

    monkeypatch.setattr(graphs, "CudaGraphBackend", ReplayRecorder)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    ReplayRecorder.captures = 0
    graph_losses, graph_lora, model = run(tiny_sd, dataset, tmp_path / "graphed", cuda_graphs=True)

    assert ReplayRecorder.captures == 2               # one graph per bucket shape
    assert model.recompute_rng is False
    assert graph_losses == eager_losses
    assert graph_lora.keys() == eager_lora.keys()
    for key in eager_lora:
        assert torch.equal(graph_lora[key], eager_lora[key]), key


class FailingCapture(ReplayRecorder):
    def capture(self, fn):
        fn()                      # half-done work that must not reach the gradients
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_failed_capture_falls_back_to_eager_with_the_same_result(tiny_sd, make_dataset, tmp_path,
                                                                 monkeypatch):
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4), (4, 6)), per_bucket=3)
    eager_losses, eager_lora, _ = run(tiny_sd, dataset, tmp_path / "eager")

    monkeypatch.setattr(graphs, "CudaGraphBackend", FailingCapture)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    said = []
    losses, lora, _ = run(tiny_sd, dataset, tmp_path / "fallback", log=said.append, cuda_graphs=True)
    assert [line for line in said if "capturing the step failed" in line and "out of memory" in line]
    assert losses == eager_losses
    assert lora.keys() == eager_lora.keys()
    for key, value in eager_lora.items():
        assert torch.equal(lora[key], value), key


class EventRecorder(ReplayRecorder):
    events: list[str] = []

    def warm_up(self, fn):
        EventRecorder.events.append("warm-up")
        super().warm_up(fn)

    def capture(self, fn):
        EventRecorder.events.append("capture")
        return super().capture(fn)


def test_every_bucket_is_warmed_up_before_any_graph_is_captured(tiny_sd, make_dataset, tmp_path,
                                                               monkeypatch):
    """A captured graph's pool keeps its activations: a bucket warming up after another
    was captured would hold two steps' activations at once."""
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4), (4, 6), (6, 6)), per_bucket=2)
    eager_losses, _, _ = run(tiny_sd, dataset, tmp_path / "eager", grad_accum=1)
    monkeypatch.setattr(graphs, "CudaGraphBackend", EventRecorder)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    EventRecorder.events, ReplayRecorder.captures = [], 0
    said = []
    losses, _, _ = run(tiny_sd, dataset, tmp_path / "graphed", log=said.append, grad_accum=1,
                       cuda_graphs=True)
    warm = graphs.WARMUP_RUNS
    assert EventRecorder.events == ["warm-up"] * (3 * warm) + ["capture"] * 3
    warming = [line for line in said if "CUDA graphs: warming up" in line]
    assert len(warming) == 3 and "(3 of 3 shapes" in warming[-1]
    assert {line.split("warming up ")[1].split(",")[0] for line in warming} == {"32x32", "48x32", "48x48"}
    assert losses == eager_losses


def test_a_stop_asked_for_while_the_graphs_warm_up_captures_nothing_and_cancels(
        tiny_sd, make_dataset, tmp_path, monkeypatch):
    """Warming up every size can take minutes with compiling: a stop is heard between sizes."""
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4), (4, 6), (6, 6)), per_bucket=2)
    monkeypatch.setattr(graphs, "CudaGraphBackend", EventRecorder)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    EventRecorder.events = []
    model = Flux(TINY)
    model.load_state_dict(tiny_sd)
    config = TrainConfig(steps=3, rank=4, alpha=4.0, compute_dtype="float32", checkpoint_every=0,
                         cuda_graphs=True)
    result = train(model, dataset, config, tmp_path / "run", log=lambda _: None,
                   should_stop=lambda: "warm-up" in EventRecorder.events)   # after the first size
    assert result.cancelled and result.steps_done == 0 and result.state_path is not None
    assert EventRecorder.events == ["warm-up"] * graphs.WARMUP_RUNS      # one size, no capture


class FailingLateCapture(ReplayRecorder):
    def capture(self, fn):
        if ReplayRecorder.captures == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return super().capture(fn)


def test_a_shape_captured_late_beside_other_graphs_says_why_if_it_fails(tiny_sd, make_dataset,
                                                                        tmp_path, monkeypatch):
    # Batches of 2 from buckets of 3 samples: the last batch of each bucket has 1 sample,
    # a shape that is captured when first seen, beside the two prepared graphs.
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4), (4, 6)), per_bucket=3)
    eager_losses, _, _ = run(tiny_sd, dataset, tmp_path / "eager", batch_size=2, grad_accum=1)
    monkeypatch.setattr(graphs, "CudaGraphBackend", FailingLateCapture)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    ReplayRecorder.captures = 0
    said = []
    losses, _, _ = run(tiny_sd, dataset, tmp_path / "late", log=said.append, batch_size=2,
                       grad_accum=1, cuda_graphs=True)
    failed = [line for line in said if "capturing the step failed" in line]
    assert len(failed) == 1 and "2 graph(s) of other shapes held their memory" in failed[0]
    assert "a batch size that divides every bucket" in failed[0]
    assert losses == eager_losses


class FailingWithActivations(ReplayRecorder):
    """Fails the warm-up of the second shape the way an OOM does: with tensors (its
    activations) alive in the frames of the traceback, and a captured graph held."""
    alive: list = []

    def warm_up(self, fn):
        if ReplayRecorder.captures:
            activations = torch.empty(1000)
            FailingWithActivations.alive = [weakref.ref(activations), weakref.ref(self)]
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        super().warm_up(fn)


def test_a_capture_failing_among_the_prepared_ones_does_not_blame_a_late_shape(
        tiny_sd, make_dataset, tmp_path, monkeypatch):
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4), (4, 6), (6, 6)), per_bucket=2)
    monkeypatch.setattr(graphs, "CudaGraphBackend", FailingLateCapture)   # the third capture fails
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    ReplayRecorder.captures = 0
    said = []
    run(tiny_sd, dataset, tmp_path / "prepared", log=said.append, grad_accum=1, cuda_graphs=True)
    failed = [line for line in said if "capturing the step failed" in line]
    assert len(failed) == 1 and "captured when first seen" not in failed[0]


def test_after_a_failed_capture_the_eager_step_runs_with_the_failures_memory_freed(
        tiny_sd, make_dataset, tmp_path, monkeypatch):
    # Batch 2 from buckets of 3: each bucket's last batch is a shape captured late.
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4),), per_bucket=3)
    monkeypatch.setattr(graphs, "CudaGraphBackend", FailingWithActivations)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    ReplayRecorder.captures, FailingWithActivations.alive = 0, []
    seen_at_eager_steps = []
    velocity_loss = train_module.velocity_loss

    def loss_watching_memory(*args):
        if FailingWithActivations.alive:   # after the failure: nothing of it may be left
            seen_at_eager_steps.append([ref() is not None for ref in FailingWithActivations.alive])
        return velocity_loss(*args)
    monkeypatch.setattr(train_module, "velocity_loss", loss_watching_memory)
    gc.disable()                          # only the fallback's own collection may free cycles
    try:
        eager_losses, _, _ = run(tiny_sd, dataset, tmp_path / "eager", batch_size=2, grad_accum=1,
                                 steps=3)
        losses, _, _ = run(tiny_sd, dataset, tmp_path / "graphed", batch_size=2, grad_accum=1,
                           steps=3, cuda_graphs=True)
    finally:
        gc.enable()
    assert seen_at_eager_steps and all(not any(alive) for alive in seen_at_eager_steps)
    assert losses == eager_losses


def test_graph_keeps_gradients_of_earlier_micro_batches():
    # Capturing a new shape in the middle of an accumulated step must not lose or double
    # what the earlier micro-batches added.
    w = torch.nn.Parameter(torch.ones(3))
    w.grad = torch.full((3,), 5.0)
    step = graphs.StepGraphs(lambda inputs, target: (w * inputs["x"]).sum() - target.sum(), [w])
    step.backend = ReplayRecorder()
    loss = step({"x": torch.tensor([1.0, 2.0, 3.0])}, torch.zeros(()))
    assert loss.item() == 6.0
    assert torch.equal(w.grad, torch.tensor([6.0, 7.0, 8.0]))
    loss = step({"x": torch.tensor([0.0, 1.0, 0.0])}, torch.ones(()))   # replay: new inputs
    assert loss.item() == 0.0
    assert torch.equal(w.grad, torch.tensor([6.0, 8.0, 8.0]))


def test_graphs_are_refused_with_the_reason():
    model = Flux(TINY)
    assert "CUDA device" in graphs.graph_unavailable_reason(model, torch.device("cpu"), 0.0)
    assert "dropout" in graphs.graph_unavailable_reason(model, torch.device("cuda"), 0.1)
    model.img_in.streamed = Streamed(object())
    assert "offloaded" in graphs.graph_unavailable_reason(model, torch.device("cuda"), 0.0)


def test_cpu_run_asking_for_graphs_says_why_and_trains_eagerly(tiny_sd, make_dataset, tmp_path):
    dataset = make_dataset(tmp_path / "data")
    model = Flux(TINY)
    model.load_state_dict(tiny_sd)
    said = []
    config = TrainConfig(steps=2, rank=4, alpha=4.0, compute_dtype="float32", checkpoint_every=0,
                         cuda_graphs=True)
    result = train(model, dataset, config, tmp_path / "run", log=said.append)
    assert result.steps_done == 2
    assert any("CUDA graphs off" in line and "CUDA device" in line for line in said)
    assert model.recompute_rng is True


def test_graphed_micro_step_keeps_its_gradient_tensors_across_optimizer_steps(tiny_sd, make_dataset,
                                                                                tmp_path, monkeypatch):
    # A replay writes into the gradient tensors it was captured with: zero_grad must zero
    # them in place, never free them. (Eager steps free them, as optimizer.zero_grad does.)
    dataset = make_dataset(tmp_path / "data", buckets=((4, 4),), per_bucket=1)
    batch = collate([dataset[0]], 0.0, torch.Generator(), dataset.empty_caption)
    monkeypatch.setattr(graphs, "CudaGraphBackend", ReplayRecorder)
    monkeypatch.setattr(train_module, "graph_unavailable_reason", lambda *args: None)
    for cuda_graphs in (True, False):
        model = Flux(TINY)
        model.load_state_dict(tiny_sd)
        model.requires_grad_(False)
        config = TrainConfig(rank=4, alpha=4.0, compute_dtype="float32", cuda_graphs=cuda_graphs)
        params = [p for a in attach_lora(model, config.lora_config()).values() for p in a.parameters()]
        step = MicroStep(model, params, config, torch.device("cpu"), log=lambda _: None)
        step(batch, torch.Generator().manual_seed(0))
        grads = [p.grad for p in params]
        assert all(g is not None for g in grads) and any(g.abs().sum() > 0 for g in grads)
        step.zero_grad()
        if cuda_graphs:
            assert all(p.grad is g for p, g in zip(params, grads))
            assert all(not g.any() for g in grads)
        else:
            assert all(p.grad is None for p in params)


def test_resuming_a_checkpoint_written_before_a_setting_existed():
    old = TrainConfig().to_dict()
    del old["huber_delta"]                       # as if written before the setting existed
    train_module._check_resumable(old, TrainConfig())          # the default: accepted
    with pytest.raises(ValueError, match="huber_delta: saved 1.0, now 2.0"):
        train_module._check_resumable(old, TrainConfig(huber_delta=2.0))


def test_a_run_may_resume_on_another_card_with_other_speed_settings():
    saved = TrainConfig(memory="fast", fp8_compute=True, compile_blocks=True, cuda_graphs=True).to_dict()
    train_module._check_resumable(saved, TrainConfig(memory="offload", fp8_compute=False,
                                                     compile_blocks=False, cuda_graphs=False))
    with pytest.raises(ValueError, match="rank: saved 16, now 8"):
        train_module._check_resumable(saved, TrainConfig(rank=8, alpha=16.0))
