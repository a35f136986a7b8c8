"""Training images in, an encoded dataset out.

Dev2ProImagesFromFolder reads a kohya-style folder under ComfyUI's input folder;
Dev2ProImagesFromBatch takes an IMAGE batch and captions from the graph. Neither
encodes: Dev2ProEncodeDataset runs the standard VAE and CLIP over them once and
caches the result on disk (output/dev2pro/datasets/<content hash>), so the
second training run of an A/B, and every later run, reuses it.
"""

from __future__ import annotations

import hashlib

from comfy_api.latest import io

from ..fluxtrain.encode import EncodeItem, encode_dataset
from ..fluxtrain.images import load_image, scan_image_folder, tensor_to_image, with_trigger
from ..fluxtrain.files import UnsafePathError
from .common import CATEGORY, datasets_root, image_path, input_folder, input_root
from .handles import DatasetHandle, DatasetType, ImageFile, ImagesHandle, ImagesType, require


def _caption_inputs(repeats_name: str, repeats_tip: str) -> list:
    """The trigger word and repeat count both image nodes take."""
    return [io.String.Input("trigger_word", default="",
                            tooltip="Put in front of every caption that lacks it (e.g. 'ohwx')."),
            io.Int.Input(repeats_name, default=1, min=1, max=1000, tooltip=repeats_tip)]


class Dev2ProImagesFromFolder(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProImagesFromFolder",
            display_name="Training Images from Folder",
            category=CATEGORY,
            description="Training images from a folder under ComfyUI's input folder, kohya layout: "
                        "'<N>_<name>' sub-folders repeat their images N times per epoch, each image's "
                        "caption is the same-name .txt file. Unreadable images and missing captions "
                        "are reported by name, not fatal unless nothing is left.",
            inputs=[
                io.String.Input("folder", default="training/my_subject",
                                tooltip="Folder relative to ComfyUI's input folder; '..' and absolute "
                                        "paths are refused."),
                *_caption_inputs("default_repeats",
                                 "Repeats for images not in an '<N>_<name>' sub-folder."),
            ],
            outputs=[ImagesType.Output(display_name="images"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def validate_inputs(cls, folder):
        # Only `folder`: ComfyUI skips its own range checks for every input named here.
        if folder is None:      # linked: checked when the node runs
            return True
        try:
            input_folder(folder)
        except UnsafePathError as e:
            return str(e)
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, trigger_word, default_repeats):
        """Changed files (names, sizes, times) make it a new input."""
        try:
            root = input_folder(folder)
            stats = sorted((str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns)
                           for p in root.rglob("*") if p.is_file())
        except (UnsafePathError, OSError):
            stats = []
        return hashlib.sha256(repr((folder, trigger_word, default_repeats, stats)).encode()).hexdigest()

    @classmethod
    def execute(cls, folder, trigger_word, default_repeats) -> io.NodeOutput:
        root = input_folder(folder)
        scan = scan_image_folder(root, trigger_word, default_repeats)
        report = f"{len(scan.items)} images from input/{folder}"
        if scan.problems:
            report += f"; {len(scan.problems)} problem(s):\n" + "\n".join(scan.problems)
        print(f"[dev2pro] {report}", flush=True)
        handle = ImagesHandle(problems=tuple(scan.problems), files=tuple(
            ImageFile(str(i.path), i.caption, i.repeats, i.path.relative_to(input_root()).as_posix())
            for i in scan.items))
        return io.NodeOutput(handle, report, ui={"text": [report]})


class Dev2ProImagesFromBatch(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProImagesFromBatch",
            display_name="Training Images from IMAGE Batch",
            category=CATEGORY,
            description="Training images from an IMAGE batch of the graph (Load Image, a batch node, "
                        "a generator...) with one caption per line, or one line for all.",
            inputs=[
                io.Image.Input("images"),
                io.String.Input("captions", multiline=True, default="",
                                tooltip="One caption per image, one per line; a single line is used "
                                        "for every image."),
                *_caption_inputs("repeats", "How many times each image is seen per epoch."),
            ],
            outputs=[ImagesType.Output(display_name="images")],
        )

    @classmethod
    def execute(cls, images, captions, trigger_word, repeats) -> io.NodeOutput:
        lines = [line.strip() for line in captions.splitlines() if line.strip()]
        count = images.shape[0]
        if len(lines) not in (0, 1, count):
            raise ValueError(f"{len(lines)} caption lines for {count} images: give one caption per "
                             "image (one per line), or a single line for all of them")
        if not lines:
            lines = [""]
        texts = [with_trigger(lines[i] if len(lines) == count else lines[0], trigger_word)
                 for i in range(count)]
        if not any(texts):
            raise ValueError("every caption is empty: write captions or a trigger word")
        handle = ImagesHandle(batch=images.detach().cpu(), captions=tuple(texts), repeats=int(repeats))
        return io.NodeOutput(handle)


def _items(images: ImagesHandle) -> list[EncodeItem]:
    if images.batch is None:
        return [EncodeItem(load_image(image_path(f)), f.caption, f.repeats, f.source)
                for f in images.files]
    return [EncodeItem(tensor_to_image(images.batch[n]), caption, images.repeats, f"image {n}")
            for n, caption in enumerate(images.captions)]


def weights_identity(module, samples: int = 64) -> str:
    """A cheap fingerprint of a model's weights: names, shapes, dtypes and a strided sample
    of each tensor's values (hashing 9 GB of T5 per run would take minutes)."""
    digest = hashlib.sha256()
    for key, tensor in sorted(module.state_dict().items()):
        digest.update(f"{key}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        try:
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            digest.update(flat[::step][:samples].float().cpu().numpy().tobytes())
        except (RuntimeError, TypeError, NotImplementedError):
            pass  # quantized storage without a plain view: names and shapes only
    return digest.hexdigest()[:24]


class Dev2ProEncodeDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="Dev2ProEncodeDataset",
            display_name="Encode Training Dataset (Flux VAE + text encoders)",
            category=CATEGORY,
            description="Puts each image in an aspect-ratio bucket near resolution², encodes it with "
                        "the VAE and its caption with CLIP (DualCLIPLoader's T5-XXL + CLIP-L for "
                        "Flux), and caches the result on disk keyed by image content, captions, "
                        "resolution, flip and encoder weights: a second run reuses it.",
            inputs=[
                ImagesType.Input("images"),
                io.Vae.Input("vae", tooltip="The Flux VAE (ae.safetensors)."),
                io.Clip.Input("clip", tooltip="DualCLIPLoader with t5xxl + clip_l, type flux."),
                io.Int.Input("resolution", default=512, min=64, max=2048, step=64,
                             tooltip="Bucket area target: buckets hold about resolution² pixels "
                                     "(512, 768, 1024...)."),
                io.Boolean.Input("flip", default=False,
                                 tooltip="Also train on a mirrored copy of each image (not for "
                                         "subjects with text or asymmetric features)."),
            ],
            outputs=[DatasetType.Output(display_name="dataset"),
                     io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, images, vae, clip, resolution, flip) -> io.NodeOutput:
        import comfy.utils

        items = _items(require(images, ImagesHandle, "images"))
        identity = {"vae": weights_identity(vae.first_stage_model),
                    "text": weights_identity(clip.cond_stage_model)}
        pbar = comfy.utils.ProgressBar(len(items) * (2 if flip else 1))

        def encode_text(caption):
            return clip.encode_from_tokens(clip.tokenize(caption), return_pooled=True)

        def on_progress(done, total, message):
            print(f"[dev2pro] {message} ({done}/{total})", flush=True)
            pbar.update_absolute(done, total)   # also where a Cancel stops encoding

        dataset = encode_dataset(items, encode_image=lambda px: vae.encode(px[..., :3]),
                                 encode_text=encode_text, cache_root=datasets_root(),
                                 resolution=resolution, flip=flip, encoder_identity=identity,
                                 on_progress=on_progress)
        reused = dataset.reused
        buckets = dataset.bucket_counts()
        report = (f"{len(dataset)} samples in buckets {buckets}, "
                  f"{'reused the cache' if reused else 'encoded'} {dataset.folder.name}")
        if images.problems:
            report += (f"\n{len(images.problems)} problem(s) while reading images:\n"
                       + "\n".join(images.problems))
        print(f"[dev2pro] dataset: {report}", flush=True)
        handle = DatasetHandle(path=str(dataset.folder), key=dataset.cache_key, reused=reused,
                               samples=len(dataset), buckets=buckets, resolution=resolution,
                               summary=report)
        return io.NodeOutput(handle, report, ui={"text": [report], "dev2pro_dataset": [
            {"key": handle.key, "reused": reused, "samples": len(dataset)}]})


DATA_NODES = [Dev2ProImagesFromFolder, Dev2ProImagesFromBatch, Dev2ProEncodeDataset]
