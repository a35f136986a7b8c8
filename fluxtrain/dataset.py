"""Encoded datasets on disk, and the batches training draws from them.

A dataset folder holds `dataset.json` and one safetensors per sample:

    dataset.json               {"format", "version", "encoders", "resolution",
                                "text_length", "text_width", "clip_width",
                                "samples": [{"file", "caption", "bucket": [h, w], "repeats"}]}
    000000.safetensors         latent [16, h, w] in model space ((z - 0.1159) * 0.3611),
                               t5 [text_length, text_width], clip [clip_width]
    empty_caption.safetensors  t5 / clip of the empty caption (for caption dropout)

`bucket` is the latent size (image pixels / 8). T5 sequences are padded to one
length at encode time, so batches stack directly. `dataset.json` is written
last, so a folder whose encoding was interrupted does not open as a dataset.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from .files import UnsafePathError, atomic_write_json, atomic_write_safetensors, safe_join

FORMAT = "fluxtrain-encoded-dataset"
VERSION = 1
INDEX_NAME = "dataset.json"
EMPTY_CAPTION_NAME = "empty_caption.safetensors"
LATENT_CHANNELS = 16
KEYS = ("latent", "t5", "clip")


class DatasetError(ValueError):
    """An encoded dataset is missing or inconsistent. The message says what to do."""


@dataclass(frozen=True)
class SampleInfo:
    file: str
    caption: str
    bucket: tuple[int, int]  # latent (height, width)
    repeats: int = 1


# --------------------------------------------------------------------------- writing

def _check_sample_tensors(latent, t5, clip, where: str) -> None:
    if latent.ndim != 3 or latent.shape[0] != LATENT_CHANNELS:
        raise DatasetError(f"{where}: latent has shape {list(latent.shape)}, expected "
                           f"[{LATENT_CHANNELS}, h, w] (one image of the 16-channel Flux VAE)")
    if latent.shape[1] % 2 or latent.shape[2] % 2:
        raise DatasetError(f"{where}: latent size {latent.shape[1]}x{latent.shape[2]} is not even; "
                           "crop images to a bucket (multiples of 64 pixels) before encoding")
    _check_text_tensors(t5, clip, where)


def _check_text_tensors(t5, clip, where: str) -> None:
    if t5.ndim != 2:
        raise DatasetError(f"{where}: t5 has shape {list(t5.shape)}, expected [length, width] "
                           "(one caption, no batch dimension)")
    if clip.ndim != 1:
        raise DatasetError(f"{where}: clip has shape {list(clip.shape)}, expected [width] "
                           "(the pooled vector of one caption)")


def write_encoded_sample(path: str | Path, latent: torch.Tensor, t5: torch.Tensor,
                         clip: torch.Tensor, caption: str = "") -> Path:
    """Write one sample file atomically. The caption is also kept in the file's metadata."""
    _check_sample_tensors(latent, t5, clip, str(path))
    return atomic_write_safetensors({"latent": latent, "t5": t5, "clip": clip}, path,
                                    metadata={"caption": caption})


class EncodedDatasetWriter:
    """Builds a dataset folder sample by sample; `finish()` writes `dataset.json`.

        with EncodedDatasetWriter(folder, resolution=512, encoders={...}) as w:
            w.set_empty_caption(t5, clip)
            for ...: w.add(latent, t5, clip, caption, repeats=1)
        dataset = w.dataset
    """

    def __init__(self, folder: str | Path, *, resolution: int, encoders: dict[str, str],
                 overwrite: bool = False):
        self.folder = Path(folder)
        if (self.folder / INDEX_NAME).exists() and not overwrite:
            raise DatasetError(f"{self.folder} already holds an encoded dataset ({INDEX_NAME}); "
                               "choose another name, or pass overwrite=True to replace it")
        self.folder.mkdir(parents=True, exist_ok=True)
        self.resolution = int(resolution)
        self.encoders = {str(k): str(v) for k, v in encoders.items()}
        self.samples: list[SampleInfo] = []
        self._text_shape: tuple[int, int] | None = None
        self._clip_width: int | None = None
        self._has_empty = False
        self.dataset: EncodedDataset | None = None

    def _check_text(self, t5, clip, where):
        shape, width = (t5.shape[0], t5.shape[1]), clip.shape[0]
        if self._text_shape is None:
            self._text_shape, self._clip_width = shape, width
        elif (shape, width) != (self._text_shape, self._clip_width):
            raise DatasetError(
                f"{where}: text encodings t5 {list(shape)} / clip [{width}] differ from the earlier "
                f"ones, t5 {list(self._text_shape)} / clip [{self._clip_width}]; encode every caption "
                "with the same text encoders and pad T5 to one length")

    def set_empty_caption(self, t5: torch.Tensor, clip: torch.Tensor) -> None:
        _check_text_tensors(t5, clip, "empty caption")
        self._check_text(t5, clip, "empty caption")
        atomic_write_safetensors({"t5": t5, "clip": clip}, self.folder / EMPTY_CAPTION_NAME,
                                 metadata={"caption": ""})
        self._has_empty = True

    def add(self, latent: torch.Tensor, t5: torch.Tensor, clip: torch.Tensor, caption: str,
            repeats: int = 1) -> SampleInfo:
        name = f"{len(self.samples):06d}.safetensors"
        if int(repeats) != repeats or repeats < 1:
            raise DatasetError(f"{name}: repeats must be a whole number >= 1, got {repeats}")
        _check_sample_tensors(latent, t5, clip, name)
        self._check_text(t5, clip, name)
        write_encoded_sample(self.folder / name, latent, t5, clip, caption)
        info = SampleInfo(name, caption, (latent.shape[1], latent.shape[2]), int(repeats))
        self.samples.append(info)
        return info

    def finish(self) -> "EncodedDataset":
        if not self.samples:
            raise DatasetError(f"no samples were added to {self.folder}; give at least one image")
        if not self._has_empty:
            raise DatasetError("the empty caption was not encoded; call set_empty_caption(t5, clip) "
                               "with the encoding of '' (caption dropout needs it)")
        atomic_write_json(self.folder / INDEX_NAME, {
            "format": FORMAT, "version": VERSION, "encoders": self.encoders,
            "resolution": self.resolution, "text_length": self._text_shape[0],
            "text_width": self._text_shape[1], "clip_width": self._clip_width,
            "samples": [{"file": s.file, "caption": s.caption, "bucket": list(s.bucket),
                         "repeats": s.repeats} for s in self.samples],
        })
        self.dataset = EncodedDataset.open(self.folder)
        return self.dataset

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self.dataset is None:
            self.finish()


# --------------------------------------------------------------------------- reading

def _header(path: Path) -> dict[str, list[int]]:
    try:
        with safe_open(path, "pt") as f:
            return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise DatasetError(f"{path} cannot be read as safetensors ({e}); re-encode the dataset") from e


class EncodedDataset:
    """An encoded dataset folder, validated on open. `dataset[i]` loads sample i as
    {"latent", "t5", "clip", "caption"}; `empty_caption` is {"t5", "clip"}."""

    def __init__(self, folder: Path, index: dict, samples: list[SampleInfo], empty_caption: dict):
        self.folder = folder
        self.encoders: dict[str, str] = dict(index.get("encoders", {}))
        self.resolution: int = index["resolution"]
        self.text_length: int = index["text_length"]
        self.text_width: int = index["text_width"]
        self.clip_width: int = index["clip_width"]
        self.samples = samples
        self.empty_caption = empty_caption
        # Set by fluxtrain.encode: the cache key of the folder, and whether it was reused.
        self.cache_key: str = folder.name
        self.reused: bool = False

    @classmethod
    def open(cls, folder: str | Path) -> "EncodedDataset":
        folder = Path(folder)
        if not folder.is_dir():
            raise DatasetError(f"encoded dataset folder {str(folder)!r} does not exist; "
                               "run the encode step first, or give the folder that holds dataset.json")
        index_path = folder / INDEX_NAME
        if not index_path.is_file():
            raise DatasetError(f"{str(folder)!r} has no {INDEX_NAME}: it is not an encoded dataset, "
                               "or its encoding did not finish; encode the images again")
        try:
            index = json.loads(index_path.read_text("utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DatasetError(f"{index_path} is not valid JSON ({e}); encode the images again") from e
        cls._check_index(index, index_path)
        expected = {"latent": None, "t5": [index["text_length"], index["text_width"]],
                    "clip": [index["clip_width"]]}

        samples, seen = [], set()
        for n, entry in enumerate(index["samples"]):
            info = cls._sample_info(entry, n, index_path)
            if info.file in seen:
                raise DatasetError(f"{index_path}: sample file {info.file!r} is listed twice")
            seen.add(info.file)
            shapes = {**expected, "latent": [LATENT_CHANNELS, *info.bucket]}
            cls._check_file(folder, info.file, shapes)
            samples.append(info)

        cls._check_file(folder, EMPTY_CAPTION_NAME, {k: expected[k] for k in ("t5", "clip")})
        empty = load_file(folder / EMPTY_CAPTION_NAME)
        return cls(folder, index, samples, {"t5": empty["t5"], "clip": empty["clip"]})

    @staticmethod
    def _check_index(index, where) -> None:
        if not isinstance(index, dict) or index.get("format") != FORMAT:
            raise DatasetError(f"{where} is not a fluxtrain encoded dataset (format "
                               f"{index.get('format') if isinstance(index, dict) else None!r}, "
                               f"expected {FORMAT!r})")
        version = index.get("version")
        if not isinstance(version, int) or version > VERSION:
            raise DatasetError(f"{where} has format version {version!r}; this fluxtrain reads up to "
                               f"{VERSION}: update the node pack or encode the images again")
        for key in ("resolution", "text_length", "text_width", "clip_width"):
            if not isinstance(index.get(key), int) or index[key] <= 0:
                raise DatasetError(f"{where}: {key!r} is {index.get(key)!r}, expected a positive integer")
        if not isinstance(index.get("samples"), list) or not index["samples"]:
            raise DatasetError(f"{where} lists no samples; encode at least one image")

    @staticmethod
    def _sample_info(entry, n, where) -> SampleInfo:
        try:
            file, caption = entry["file"], entry.get("caption", "")
            h, w = entry["bucket"]
            repeats = entry.get("repeats", 1)
        except (TypeError, KeyError, ValueError) as e:
            raise DatasetError(f"{where}: sample {n} is {entry!r}; expected "
                               "{'file', 'caption', 'bucket': [h, w], 'repeats'}") from e
        ok = (isinstance(file, str) and isinstance(caption, str)
              and all(isinstance(x, int) and x > 0 and x % 2 == 0 for x in (h, w))
              and isinstance(repeats, int) and repeats >= 1)
        if not ok:
            raise DatasetError(f"{where}: sample {n} is {entry!r}; expected a file name, a caption, "
                               "an even positive latent bucket [h, w] and repeats >= 1")
        return SampleInfo(file, caption, (h, w), repeats)

    @staticmethod
    def _check_file(folder: Path, name: str, shapes: dict) -> None:
        try:
            path = safe_join(folder, name, what="sample file")
        except UnsafePathError as e:
            raise DatasetError(str(e)) from e
        if not path.is_file():
            raise DatasetError(f"{path} is listed in {INDEX_NAME} but missing; restore it or "
                               "encode the images again")
        header = _header(path)
        for key, want in shapes.items():
            if key not in header:
                raise DatasetError(f"{path} has no {key!r} tensor (found {sorted(header)}); "
                                   "encode the images again")
            if header[key] != want:
                raise DatasetError(
                    f"{path}: {key!r} has shape {header[key]}, expected {want} as {INDEX_NAME} "
                    "declares; samples encoded with different settings or text encoders cannot be "
                    "mixed: encode the whole dataset again with one setting")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        info = self.samples[i]
        tensors = load_file(self.folder / info.file)
        if list(tensors["latent"].shape) != [LATENT_CHANNELS, *info.bucket]:
            raise DatasetError(f"{info.file} changed on disk since the dataset was opened; open it again")
        return {"latent": tensors["latent"], "t5": tensors["t5"], "clip": tensors["clip"],
                "caption": info.caption}

    def bucket_counts(self) -> dict[str, int]:
        """{"HxW": samples per epoch (repeats counted)}, in image pixels, height first."""
        counts: dict[str, int] = {}
        for s in sorted(self.samples, key=lambda s: s.bucket):
            key = f"{s.bucket[0] * 8}x{s.bucket[1] * 8}"
            counts[key] = counts.get(key, 0) + s.repeats
        return counts


# --------------------------------------------------------------------------- batching

class BucketBatchSampler:
    """Batches of sample indices, each batch from one bucket shape.

    An epoch holds every sample `repeats` times, shuffled within its bucket and cut
    into batches of `batch_size` (the last batch of a bucket may be smaller); the
    batches are then shuffled. The order is a pure function of (seed, epoch), and
    `state_dict()` is (epoch, position), so a restored sampler continues exactly.
    `next_batch()` (and iteration) runs on across epochs without end.
    """

    def __init__(self, dataset, batch_size: int, seed: int = 0):
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        if not 0 <= seed < 2 ** 63:
            raise ValueError(f"seed must be in [0, 2**63), got {seed}")
        self.samples: Sequence[SampleInfo] = list(dataset.samples)
        if not self.samples:
            raise DatasetError("the dataset has no samples to batch")
        self.batch_size, self.seed = batch_size, seed
        self.epoch, self.position = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None
        self.fingerprint = hashlib.sha256(json.dumps(
            [[s.file, list(s.bucket), s.repeats] for s in self.samples]).encode()).hexdigest()[:16]

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng([self.seed, epoch])
        by_bucket = self.bucket_members()
        batches = []
        for bucket in sorted(by_bucket):
            members = [by_bucket[bucket][j] for j in rng.permutation(len(by_bucket[bucket]))]
            batches += [members[k:k + self.batch_size] for k in range(0, len(members), self.batch_size)]
        batches = [batches[j] for j in rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    def bucket_members(self) -> dict[tuple[int, int], list[int]]:
        """{bucket: its sample indices, each as often as the sample repeats}."""
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(self.samples):
            by_bucket.setdefault(s.bucket, []).extend([i] * s.repeats)
        return by_bucket

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.epoch_batches(self.epoch))

    def next_batch(self) -> list[int]:
        batches = self.epoch_batches(self.epoch)
        batch = batches[self.position]
        self.position += 1
        if self.position == len(batches):
            self.epoch, self.position = self.epoch + 1, 0
        return list(batch)

    def __iter__(self):
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "batch_size": self.batch_size, "fingerprint": self.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "fingerprint"):
            if state.get(key) != getattr(self, key):
                raise DatasetError(
                    f"the saved batch order was made with {key} {state.get(key)!r}, but this run has "
                    f"{getattr(self, key)!r}; an exact resume needs the same dataset, batch size and "
                    "seed: restore them, or start a new run")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < len(self.epoch_batches(epoch)):
            raise DatasetError(f"saved sampler position (epoch {epoch}, batch {position}) is out of range")
        self.epoch, self.position = epoch, position


def collate(samples: list[dict], caption_dropout: float, generator: torch.Generator,
            empty_caption: dict) -> dict:
    """Stack samples of one bucket into {"latent" [B,16,h,w], "t5" [B,L,D], "clip" [B,C],
    "captions", "dropped" [B] bool}. Each sample's caption is replaced by the empty
    caption with probability `caption_dropout`; the draw takes B values from
    `generator` whatever the rate, so later draws do not depend on it."""
    if not samples:
        raise ValueError("collate needs at least one sample")
    if not 0.0 <= caption_dropout <= 1.0:
        raise ValueError(f"caption_dropout must be in [0, 1], got {caption_dropout}")
    shapes = {tuple(s["latent"].shape) for s in samples}
    if len(shapes) > 1:
        raise DatasetError(f"a batch mixes latent shapes {sorted(shapes)}; batch with "
                           "BucketBatchSampler so each batch holds one bucket")
    latent = torch.stack([s["latent"] for s in samples])
    t5 = torch.stack([s["t5"] for s in samples])
    clip = torch.stack([s["clip"] for s in samples])
    if tuple(empty_caption["t5"].shape) != tuple(t5.shape[1:]):
        raise DatasetError(f"the empty caption's t5 has shape {list(empty_caption['t5'].shape)}, "
                           f"the batch's {list(t5.shape[1:])}; encode them with the same settings")
    draw = torch.rand(len(samples), generator=generator, device=generator.device)
    dropped = (draw < caption_dropout).cpu()
    if dropped.any():
        t5[dropped] = empty_caption["t5"].to(t5.dtype)
        clip[dropped] = empty_caption["clip"].to(clip.dtype)
    captions = ["" if d else s.get("caption", "") for s, d in zip(samples, dropped.tolist())]
    return {"latent": latent, "t5": t5, "clip": clip, "captions": captions, "dropped": dropped}
