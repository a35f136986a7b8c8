"""Timestep sampling for rectified-flow training.

`x_t = (1 - s) * x0 + s * noise`: `s` near 1 is mostly noise. Each method below
draws `s` in (0, 1) for a batch. The sigmoid-of-normal methods follow kohya
sd-scripts (`--timestep_sampling`): "shift" and "flux_shift" shift a
logit-normal draw `u = sigmoid(mean + std * z)`; both are a shift of the logit
by a constant, `logit(s) = logit(u) + log(S)`, with S fixed ("shift") or
chosen from the image size as Flux's sampler does ("flux_shift": S = e^mu,
mu from 0.5 at 256 tokens to 1.15 at 4096 tokens, i.e. 512² to 1024² images).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

DEFAULT_SHIFT = 3.1582  # e^1.15: flux_shift's value for a 1024x1024 image
BASE_TOKENS, MAX_TOKENS = 256, 4096
BASE_MU, MAX_MU = 0.5, 1.15
EPS = 1e-6  # keeps s strictly inside (0, 1)


def tokens_for_latent(latent_height: int, latent_width: int) -> int:
    """Image tokens of a latent after the 2x2 patchify (the `tokens` of flux_shift)."""
    if latent_height % 2 or latent_width % 2:
        raise ValueError(f"latent size {latent_height}x{latent_width} is not even; "
                         "Flux patchifies 2x2, so bucket sizes must be multiples of 16 image pixels")
    return (latent_height // 2) * (latent_width // 2)


def flux_shift_mu(tokens: int) -> float:
    """Flux's resolution-dependent shift: linear in the token count,
    0.5 at 256 tokens, 1.15 at 4096 (extrapolated outside that range)."""
    return BASE_MU + (MAX_MU - BASE_MU) * (tokens - BASE_TOKENS) / (MAX_TOKENS - BASE_TOKENS)


def shift_timesteps(u: torch.Tensor, shift: float) -> torch.Tensor:
    """S*u / (1 + (S-1)*u): moves mass toward noise for S > 1. With S = e^mu this is
    Flux's time shift e^mu / (e^mu + (1/u - 1)), without its division by u."""
    return shift * u / (1 + (shift - 1) * u)


def _sigmoid_normal(n, gen, mean, std):
    return torch.sigmoid(mean + std * torch.randn(n, generator=gen, device=gen.device))


def _logit_normal(n, gen, *, mean, std, shift, tokens):
    return _sigmoid_normal(n, gen, mean, std)


def _shift(n, gen, *, mean, std, shift, tokens):
    return shift_timesteps(_sigmoid_normal(n, gen, mean, std), shift)


def _flux_shift(n, gen, *, mean, std, shift, tokens):
    if tokens is None:
        raise ValueError("timestep method 'flux_shift' depends on the image size: pass "
                         "image_tokens= (image tokens after 2x2 patchify, e.g. tokens_for_latent(h, w) "
                         "of the latent; 4096 for a 1024x1024 image)")
    if tokens <= 0:
        raise ValueError(f"image_tokens must be positive, got {tokens}")
    return shift_timesteps(_sigmoid_normal(n, gen, mean, std), math.exp(flux_shift_mu(tokens)))


def _uniform(n, gen, *, mean, std, shift, tokens):
    return torch.rand(n, generator=gen, device=gen.device)


METHODS: dict[str, tuple[Callable, str]] = {
    "logit_normal": (_logit_normal, "sigmoid(mean + std * normal); SD3 / kohya 'sigmoid'"),
    "shift": (_shift, "logit_normal then S*u/(1+(S-1)*u), S = shift (default e^1.15)"),
    "flux_shift": (_flux_shift, "logit_normal shifted by Flux's resolution-dependent mu"),
    "uniform": (_uniform, "uniform on (0, 1)"),
}
TIMESTEP_METHODS = tuple(METHODS)


def sample_timesteps(method: str, batch_size: int, generator: torch.Generator, *,
                     image_tokens: int | None = None, shift: float = DEFAULT_SHIFT,
                     mean: float = 0.0, std: float = 1.0, device=None) -> torch.Tensor:
    """Draw `batch_size` timesteps in (0, 1) (float32) with one of `METHODS`.

    Deterministic given `generator`: the draw happens on the generator's device,
    then moves to `device`, so a seed gives the same values everywhere.
    `image_tokens` is needed by "flux_shift"; `mean`/`std` set the normal
    behind the sigmoid (logit_normal, shift, flux_shift).
    """
    if method not in METHODS:
        raise ValueError(f"unknown timestep method {method!r}; expected one of "
                         f"{', '.join(repr(m) for m in METHODS)}")
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator (got {type(generator).__name__}); "
                        "make one with torch.Generator().manual_seed(seed) so training is repeatable")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    if not std > 0:
        raise ValueError(f"std must be positive, got {std}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    fn, _ = METHODS[method]
    s = fn(batch_size, generator, mean=mean, std=std, shift=shift, tokens=image_tokens)
    s = s.float().clamp(EPS, 1 - EPS)
    return s if device is None else s.to(device)
