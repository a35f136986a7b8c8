"""CUDA graphs for the forward and backward of a training step.

At 512x512 a Flux step is a few thousand small kernels, and the Python that
launches them (autograd, the compiled blocks' wrappers, FrozenLinear) takes
longer than the GPU needs to run them. A CUDA graph records the kernels of one
forward + backward once and then replays them with a single launch.

What a replay needs, and how this module provides it:
- the same addresses every time: the step's inputs are copied into static
  tensors captured with the graph, and the LoRA gradients are accumulated in
  place (the caller zeroes them with `set_to_none=False`, never frees them);
- the same shapes: one graph per input shape (bucket), all sharing one memory
  pool. `prepare` captures every bucket before training, all warm-ups first and
  then all captures: a new shape's warm-up runs eagerly in the ordinary pool, and
  after a capture the shared pool keeps that graph's activations, so warming up
  shape by shape as they come would hold two steps' activations at once (at
  1024x1024 fast with three sizes, more than 104 GiB instead of 58). A shape that
  was not prepared (a bucket's smaller last batch) is captured when first seen;
- nothing on the host inside the step: no LoRA dropout (its random mask would be
  frozen into the graph), no offloaded weights (their faults are host decisions).

The optimizer step, gradient clipping and the loss check stay outside the graph,
exactly as in eager mode, so a graphed run computes the same numbers.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from .layers import FrozenLinear

# Eager runs of a new shape before its capture: the first compiles the blocks (when
# compiled) and lets cuBLAS / autotuning pick kernels, the second runs them warm.
WARMUP_RUNS = 2


def graph_unavailable_reason(model: torch.nn.Module, device: torch.device,
                             lora_dropout: float) -> str | None:
    """Why the step of `model` cannot be captured (None when it can)."""
    if torch.device(device).type != "cuda":
        return f"CUDA graphs need a CUDA device, this run is on {torch.device(device).type}"
    if lora_dropout:
        return "LoRA dropout draws a new random mask every step, which a graph cannot replay"
    if any(isinstance(m, FrozenLinear) and m.streamed is not None for m in model.modules()):
        return "offloaded weights are fetched by host-side decisions that a graph cannot replay"
    return None


class GraphCaptureFailed(RuntimeError):
    """Warm-up or capture of a new shape failed (out of memory, an op that cannot be
    captured); the gradients are as they were before, so the step can run eagerly."""


class CudaGraphBackend:
    """torch.cuda graphs: capture on a side stream, replay on the current one."""

    def __init__(self):
        self.pool = None

    def warm_up(self, fn: Callable[[], object]) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            fn()
        torch.cuda.current_stream().wait_stream(stream)

    def capture(self, fn: Callable[[], torch.Tensor]):
        # Cached blocks freed by the warm-up can not serve the graph's own pool.
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = fn()
        self.pool = graph.pool()
        return graph.replay, out


class StepGraphs:
    """Runs `loss = loss_fn(inputs, target); loss.backward()` as CUDA graph replays.

    `params` are the trained parameters; their `.grad` must be zeroed with
    `set_to_none=False` between optimizer steps so the graph keeps accumulating
    into the same tensors. (CPU tests swap CudaGraphBackend for a recorder that
    re-runs the captured function on the static tensors, which is what a replay does.)"""

    def __init__(self, loss_fn: Callable[[dict, torch.Tensor], torch.Tensor],
                 params: list[torch.Tensor], warmup_runs: int = WARMUP_RUNS):
        self.loss_fn = loss_fn
        self.params = list(params)
        self.backend = CudaGraphBackend()
        self.warmup_runs = warmup_runs
        self.graphs: dict[tuple, tuple] = {}   # shape key -> (replay, static inputs, static target, loss)

    def __call__(self, inputs: dict, target: torch.Tensor) -> torch.Tensor:
        """Forward and backward of one micro-batch; returns the (static) loss tensor:
        read it before the next call."""
        key = _shape_key(inputs, target)
        if key not in self.graphs:
            self.graphs[key] = self._capture(inputs, target)
        replay, static_inputs, static_target, loss = self.graphs[key]
        for name, value in inputs.items():
            if value is not None:
                static_inputs[name].copy_(value)
        static_target.copy_(target)
        replay()
        return loss

    def prepare(self, examples: list[tuple[dict, torch.Tensor]], labels: list[str],
                log: Callable[[str], None] = lambda _: None,
                should_stop: Callable[[], bool] = lambda: False) -> int:
        """Capture one graph per shape among `examples` ((inputs, target) pairs; only
        their shapes matter; `labels` name them in the log): every warm-up first, then
        every capture. `should_stop` is asked before each warm-up (with compiling, one
        can take a minute); when it says stop, nothing is captured. Returns how many
        graphs were captured."""
        todo: dict[tuple, tuple[dict, torch.Tensor, str]] = {}
        for (inputs, target), label in zip(examples, labels):
            todo.setdefault(_shape_key(inputs, target), (inputs, target, label))
        todo = {k: v for k, v in todo.items() if k not in self.graphs}
        with self._gradients_kept():
            for i, (inputs, target, label) in enumerate(todo.values()):
                if should_stop():
                    return 0
                log(f"[fluxtrain] CUDA graphs: warming up {label} ({i + 1} of {len(todo)} shapes, "
                    "all captured before the first step)")
                self._warm_up(inputs, target)
            for key, (inputs, target, _) in todo.items():
                self.graphs[key] = self._capture_warm(inputs, target)
        return len(todo)

    def _capture(self, inputs: dict, target: torch.Tensor):
        with self._gradients_kept():
            self._warm_up(inputs, target)
            return self._capture_warm(inputs, target)

    @contextlib.contextmanager
    def _gradients_kept(self):
        """Warm-ups add to the gradients: keep what earlier micro-batches of this step
        accumulated and put it back afterwards (also when a capture fails, which then
        raises GraphCaptureFailed)."""
        kept = None
        try:
            kept = [None if p.grad is None else p.grad.clone() for p in self.params]
            yield
        except Exception as error:
            raise GraphCaptureFailed(f"{type(error).__name__}: {error}"[:300]) from error
        finally:
            if kept is not None:
                self._restore(kept)

    def release(self) -> None:
        """Drop every captured graph, so that their memory pool can be freed."""
        self.graphs.clear()
        self.backend.pool = None

    def _restore(self, kept: list) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params, kept):
                if saved is not None:
                    p.grad.copy_(saved)
                elif p.grad is not None:
                    p.grad.zero_()

    def _warm_up(self, inputs: dict, target: torch.Tensor) -> None:
        def step():
            loss = self.loss_fn(inputs, target)
            loss.backward()

        for _ in range(self.warmup_runs):
            self.backend.warm_up(step)

    def _capture_warm(self, inputs: dict, target: torch.Tensor):
        for p in self.params:
            if p.grad is None:     # a parameter the loss does not reach still needs a slot
                p.grad = torch.zeros_like(p)

        static_inputs = {k: (None if v is None else v.clone()) for k, v in inputs.items()}
        static_target = target.clone()

        def captured():
            loss = self.loss_fn(static_inputs, static_target)
            loss.backward()
            return loss.detach()

        replay, loss = self.backend.capture(captured)
        return replay, static_inputs, static_target, loss


def _shape_key(inputs: dict, target: torch.Tensor) -> tuple:
    return tuple((k, None if v is None else (tuple(v.shape), v.dtype, v.device))
                 for k, v in sorted(inputs.items())) + ((tuple(target.shape), target.dtype),)
