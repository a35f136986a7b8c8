"""Aspect-ratio buckets: which (height, width) an image is trained at, and how
it is resized and center-cropped to get there.

Sizes here are image pixels, (height, width). Buckets are multiples of 64 by
default, so the VAE latent (1/8) is a multiple of 8 and patchifies 2x2 evenly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from PIL import Image

VAE_SCALE = 8  # image pixels per latent pixel


def make_buckets(resolution: int, step: int = 64, max_aspect: float = 2.0) -> list[tuple[int, int]]:
    """(height, width) pairs, multiples of `step`, each with an area close to
    `resolution`² (nearest multiple of `step`, so within about step/(2*side) of it),
    aspect ratio up to `max_aspect` either way. Sorted from tallest to widest;
    symmetric (every landscape bucket has its portrait twin)."""
    if step <= 0 or step % (2 * VAE_SCALE):
        raise ValueError(f"bucket step {step} must be a positive multiple of {2 * VAE_SCALE} "
                         "(latent sides must be even for Flux's 2x2 patchify); 64 is usual")
    if resolution < step:
        raise ValueError(f"resolution {resolution} is below the bucket step {step}; "
                         "use 512 or 1024 for Flux")
    if not max_aspect >= 1:
        raise ValueError(f"max_aspect must be at least 1 (1 = square only), got {max_aspect}")
    area = resolution * resolution
    found = set()
    width = step
    while width <= resolution * math.sqrt(max_aspect) + step:
        height = max(step, round(area / width / step) * step)
        if height <= width and width / height <= max_aspect:
            found.add((height, width))
            found.add((width, height))
        width += step
    return sorted(found, key=lambda hw: (-hw[0] / hw[1], hw[0]))


def assign_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest (in log ratio) to height x width."""
    if not buckets:
        raise ValueError("no buckets given; make them with make_buckets(resolution)")
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    target = math.log(height / width)
    return min(buckets, key=lambda hw: abs(math.log(hw[0] / hw[1]) - target))


@dataclass(frozen=True)
class CropPlan:
    """Resize the image to resized_height x resized_width (keeping its aspect),
    then cut height x width at (top, left): a center crop onto the bucket."""
    resized_height: int
    resized_width: int
    top: int
    left: int
    height: int
    width: int

    @property
    def pil_box(self) -> tuple[int, int, int, int]:
        """(left, upper, right, lower), the box `PIL.Image.crop` takes."""
        return (self.left, self.top, self.left + self.width, self.top + self.height)


def crop_plan(height: int, width: int, bucket: tuple[int, int]) -> CropPlan:
    """Scale so the image covers the bucket on both sides, then center-crop the excess."""
    bh, bw = bucket
    if height <= 0 or width <= 0:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    scale = max(bh / height, bw / width)
    rh, rw = max(bh, round(height * scale)), max(bw, round(width * scale))
    return CropPlan(rh, rw, (rh - bh) // 2, (rw - bw) // 2, bh, bw)


def resize_and_crop(image: Image.Image, bucket: tuple[int, int]) -> Image.Image:
    """Apply `crop_plan` to a PIL image (Lanczos resize, center crop)."""
    plan = crop_plan(image.height, image.width, bucket)
    if (image.height, image.width) != (plan.resized_height, plan.resized_width):
        image = image.resize((plan.resized_width, plan.resized_height), Image.Resampling.LANCZOS)
    return image.crop(plan.pil_box)


def latent_size(bucket: tuple[int, int]) -> tuple[int, int]:
    """Latent (height, width) of an image bucket."""
    bh, bw = bucket
    if bh % VAE_SCALE or bw % VAE_SCALE:
        raise ValueError(f"bucket {bh}x{bw} is not a multiple of {VAE_SCALE}")
    return bh // VAE_SCALE, bw // VAE_SCALE
