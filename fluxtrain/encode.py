"""Encoding images and captions into an on-disk dataset, cached by content.

The encoders are plain callables, so ComfyUI's VAE / CLIP objects, or anything
else, can be passed in:

    encode_image(Tensor [1, H, W, 3] float32 in [0, 1]) -> raw VAE latent [1, 16, H/8, W/8]
    encode_text(caption: str) -> (t5 [L, D], pooled [C])   (a leading batch dim of 1 is accepted)

Each image is put in its aspect-ratio bucket (resize + center crop), encoded,
and moved into model space, `(z - 0.1159) * 0.3611`. With `flip`, a mirrored
copy of every image is encoded as its own sample.

The cache folder is `cache_root/<dataset_cache_key>`: a hash of every image's
pixels, caption and repeats, the resolution, flip, the encoders' identity and
the format version. A complete folder there is reused without encoding; a new
one is built in a temporary folder and renamed into place only when finished,
so an interrupted encode never looks complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from PIL import Image

from .buckets import assign_bucket, latent_size, make_buckets, resize_and_crop
from .dataset import INDEX_NAME, LATENT_CHANNELS, DatasetError, EncodedDataset, EncodedDatasetWriter
from .files import remove_leftovers, temp_path
from .images import image_to_tensor, to_rgb

LATENT_SHIFT = 0.1159
LATENT_SCALE = 0.3611
CACHE_VERSION = 1
BUCKET_STEP = 64
MAX_ASPECT = 2.0

log = logging.getLogger(__name__)

ImageEncoder = Callable[[torch.Tensor], torch.Tensor]
TextEncoder = Callable[[str], tuple[torch.Tensor, torch.Tensor]]
Progress = Callable[[int, int, str], None]


class EncodeError(ValueError):
    """Images or encoders cannot be encoded into a dataset. The message says what to do."""


@dataclass(frozen=True)
class EncodeItem:
    image: Image.Image
    caption: str
    repeats: int = 1
    source: str = ""  # where the image came from, for messages only (not part of the cache key)


def to_model_space(latent: torch.Tensor) -> torch.Tensor:
    """Raw Flux VAE latent -> what the transformer sees."""
    return (latent - LATENT_SHIFT) * LATENT_SCALE


def pixel_hash(image: Image.Image) -> str:
    """SHA-256 of an image's RGB pixels and size (not of its file: metadata does not count)."""
    rgb = to_rgb(image)
    digest = hashlib.sha256(f"{rgb.width}x{rgb.height}:".encode())
    digest.update(rgb.tobytes())
    return digest.hexdigest()


def dataset_cache_key(items: list[EncodeItem], *, resolution: int, flip: bool,
                      encoder_identity: dict[str, str]) -> str:
    """The cache folder name for these inputs (24 hex digits)."""
    recipe = {
        "version": CACHE_VERSION, "resolution": int(resolution), "flip": bool(flip),
        "bucket_step": BUCKET_STEP, "max_aspect": MAX_ASPECT,
        "latent": [LATENT_SHIFT, LATENT_SCALE],
        "encoders": {str(k): str(v) for k, v in sorted(encoder_identity.items())},
        "items": [[pixel_hash(i.image), i.caption, int(i.repeats)] for i in items],
    }
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:24]


def encode_dataset(items: list[EncodeItem], *, encode_image: ImageEncoder, encode_text: TextEncoder,
                   cache_root: str | Path, resolution: int, flip: bool,
                   encoder_identity: dict[str, str], on_progress: Progress | None = None
                   ) -> EncodedDataset:
    """Encode `items` into `cache_root/<key>` and open it, or open the complete folder
    already there. The returned dataset carries `.reused` (True when nothing was
    encoded) and `.cache_key`. `on_progress(done, total, message)` is called per image."""
    if not items:
        raise EncodeError("no images to encode; give at least one image with its caption")
    if not encoder_identity or not all(str(v).strip() for v in encoder_identity.values()):
        raise EncodeError(f"encoder_identity is {encoder_identity!r}; name every encoder (for example "
                          "{'vae': 'ae.safetensors', 'text': 't5xxl + clip_l'}) so the cache "
                          "cannot mix encodings of different models")
    try:
        buckets = make_buckets(resolution, step=BUCKET_STEP, max_aspect=MAX_ASPECT)
    except ValueError as e:
        raise EncodeError(str(e)) from e

    cache_root = Path(cache_root)
    key = dataset_cache_key(items, resolution=resolution, flip=flip, encoder_identity=encoder_identity)
    folder = cache_root / key
    cached = _open_complete(folder)
    if cached is not None:
        log.info("dataset cache hit: %s (%d samples), nothing encoded", folder, len(cached))
        return _tagged(cached, key, reused=True)

    cache_root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(cache_root, key)       # what an encode of this dataset killed before left
    work = temp_path(folder)
    work.mkdir()
    try:
        _encode_into(work, items, buckets, encode_image, encode_text, resolution, flip,
                     encoder_identity, on_progress)
        if folder.exists():  # an unfinished or unreadable folder of an earlier run
            shutil.rmtree(folder)
        work.rename(folder)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)
    return _tagged(EncodedDataset.open(folder), key, reused=False)


def _open_complete(folder: Path) -> EncodedDataset | None:
    if not (folder / INDEX_NAME).is_file():
        return None
    try:
        return EncodedDataset.open(folder)
    except DatasetError as e:
        log.warning("dataset cache %s is damaged (%s); encoding again", folder, e)
        return None


def _tagged(dataset: EncodedDataset, key: str, reused: bool) -> EncodedDataset:
    dataset.cache_key, dataset.reused = key, reused
    return dataset


def _encode_into(folder, items, buckets, encode_image, encode_text, resolution, flip,
                 encoder_identity, on_progress) -> None:
    captions = [""] + [i.caption for i in items]
    texts = {c: _check_text(encode_text(c), c) for c in dict.fromkeys(captions)}
    length = _pad_length(texts)

    total, done = len(items) * (2 if flip else 1), 0
    with EncodedDatasetWriter(folder, resolution=resolution, encoders=encoder_identity,
                              overwrite=True) as writer:
        writer.set_empty_caption(*_padded(texts[""], length))
        for n, item in enumerate(items):
            where = item.source or f"image {n}"
            image = to_rgb(item.image)
            bucket = assign_bucket(image.height, image.width, buckets)
            cropped = resize_and_crop(image, bucket)
            variants = [cropped, cropped.transpose(Image.Transpose.FLIP_LEFT_RIGHT)] if flip else [cropped]
            t5, clip = _padded(texts[item.caption], length)
            for variant in variants:
                latent = _check_latent(encode_image(image_to_tensor(variant)), bucket, where)
                writer.add(to_model_space(latent), t5, clip, item.caption, repeats=item.repeats)
                done += 1
                if on_progress is not None:
                    on_progress(done, total, f"encoded {where} at {bucket[1]}x{bucket[0]}")


def _check_text(encoded, caption: str) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        t5, pooled = encoded
    except (TypeError, ValueError) as e:
        raise EncodeError(f"encode_text returned {type(encoded).__name__}; expected a pair "
                          "(t5 [L, D], pooled [C])") from e
    t5, pooled = t5.detach().float().cpu(), pooled.detach().float().cpu()
    if t5.ndim == 3 and t5.shape[0] == 1:
        t5 = t5[0]
    if pooled.ndim == 2 and pooled.shape[0] == 1:
        pooled = pooled[0]
    if t5.ndim != 2 or pooled.ndim != 1:
        raise EncodeError(f"text encoding of {caption!r}: t5 {list(t5.shape)}, pooled "
                          f"{list(pooled.shape)}; expected t5 [L, D] and pooled [C] for one caption "
                          "(T5-XXL sequence and CLIP-L pooled vector)")
    if not (torch.isfinite(t5).all() and torch.isfinite(pooled).all()):
        raise EncodeError(f"text encoding of {caption!r} holds NaN or infinite values; check the "
                          "text encoder files (a CLIP whose weights did not load encodes NaN)")
    return t5, pooled


def _pad_length(texts: dict) -> int:
    widths = {(t5.shape[1], pooled.shape[0]) for t5, pooled in texts.values()}
    if len(widths) > 1:
        raise EncodeError(f"captions were encoded to different widths (t5 width, pooled width) "
                          f"{sorted(widths)}; use one text encoder for every caption")
    lengths = {t5.shape[0] for t5, _ in texts.values()}
    if len(lengths) > 1:
        log.info("T5 sequences have lengths %s; shorter ones are zero-padded to %d so batches "
                 "stack (only long captions exceed the usual 256 tokens)", sorted(lengths), max(lengths))
    return max(lengths)


def _padded(text: tuple[torch.Tensor, torch.Tensor], length: int) -> tuple[torch.Tensor, torch.Tensor]:
    t5, pooled = text
    if t5.shape[0] < length:
        t5 = torch.cat([t5, t5.new_zeros(length - t5.shape[0], t5.shape[1])])
    return t5, pooled


def _check_latent(latent: torch.Tensor, bucket: tuple[int, int], where: str) -> torch.Tensor:
    expected = [1, LATENT_CHANNELS, *latent_size(bucket)]
    if list(latent.shape) == expected[1:]:
        latent = latent.unsqueeze(0)
    if list(latent.shape) != expected:
        raise EncodeError(f"{where}: the VAE returned a latent of shape {list(latent.shape)} for a "
                          f"{bucket[1]}x{bucket[0]} image; expected {expected}: use the 16-channel "
                          "Flux VAE (ae.safetensors)")
    latent = latent[0].detach().float().cpu()
    if not torch.isfinite(latent).all():
        raise EncodeError(f"{where}: the VAE returned NaN or infinite values; check the VAE file "
                          "(a half-loaded or wrong VAE does this)")
    return latent
