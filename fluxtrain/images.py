"""Training images from disk: decoding any common file into plain RGB, and
scanning a kohya-style folder into (image, caption, repeats) items.

Kohya layout:

    root/
      10_ohwx dog/          10 repeats; "ohwx dog" is the folder's name part
        a.png  a.txt        same-name .txt holds the caption
        b.jpg  b.txt
      photo.png photo.txt   images directly in root get `default_repeats`

Unreadable images and missing captions are reported by name in
`FolderScan.problems`; they are fatal only when no usable image is left.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif"})
CAPTION_EXTENSION = ".txt"
_REPEATS_FOLDER = re.compile(r"^(\d+)_(.*)$")


class ImageError(ValueError):
    """An image or image folder cannot be used. The message says what to do."""


# --------------------------------------------------------------------------- one image

def load_image(path: str | Path) -> Image.Image:
    """Decode `path` into an 8-bit RGB image, upright.

    EXIF orientation is applied; transparency is composited on white; 16-bit and
    32-bit integer / float greyscale are scaled to 8 bits; greyscale, palette and
    CMYK become RGB. An unreadable or truncated file raises ImageError naming it."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            return to_rgb(image)
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as e:
        raise ImageError(f"{str(path)!r} cannot be read as an image ({e}); "
                         "replace or remove the file, or save it again as PNG or JPEG") from e


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode to 8-bit RGB (see load_image)."""
    if image.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        image = _high_depth_to_l(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "RGBa", "La", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image if image.mode == "RGB" else image.convert("RGB")


def _high_depth_to_l(image: Image.Image) -> Image.Image:
    """16/32-bit greyscale to 8-bit 'L'. 'I;16' spans 0..65535. 'I' and 'F' are read
    as 16-bit data when any value exceeds 255, as 8-bit otherwise; 'F' with every
    value in [0, 1] is read as a [0, 1] image."""
    values = np.asarray(image, dtype=np.float64)
    peak = float(values.max()) if values.size else 0.0
    if image.mode.startswith("I;16") or peak > 255:
        values = values / 257.0
    elif image.mode == "F" and peak <= 1.0:
        values = values * 255.0
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))


# --------------------------------------------------------------------------- tensors (ComfyUI IMAGE layout)

def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB image -> float32 tensor [1, H, W, 3] in [0, 1] (ComfyUI's IMAGE layout)."""
    array = np.asarray(to_rgb(image), dtype=np.float32) / 255.0
    return torch.from_numpy(array.copy()).unsqueeze(0)


def tensor_to_image(tensor: torch.Tensor) -> Image.Image:
    """[H, W, 3] or [1, H, W, 3] float tensor in [0, 1] -> RGB image (values clamped)."""
    if tensor.ndim == 4 and tensor.shape[0] == 1:
        tensor = tensor[0]
    if tensor.ndim != 3 or tensor.shape[-1] not in (1, 3, 4):
        raise ImageError(f"image tensor has shape {list(tensor.shape)}, expected [H, W, 3] "
                         "(one image of a ComfyUI IMAGE batch)")
    array = (tensor.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).numpy()
    return to_rgb(Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array))


# --------------------------------------------------------------------------- folders

@dataclass(frozen=True)
class ImageItem:
    path: Path
    caption: str
    repeats: int


@dataclass
class FolderScan:
    items: list[ImageItem] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def with_trigger(caption: str, trigger_word: str) -> str:
    """"trigger, caption", unless the trigger word already stands in the caption."""
    trigger, caption = trigger_word.strip(), caption.strip()
    if not trigger:
        return caption
    if not caption:
        return trigger
    if re.search(rf"(?<!\w){re.escape(trigger)}(?!\w)", caption, re.IGNORECASE):
        return caption
    return f"{trigger}, {caption}"


def scan_image_folder(root: str | Path, trigger_word: str = "", default_repeats: int = 1) -> FolderScan:
    """Images and captions of a kohya-style folder (see the module doc), sorted by path.

    Only `root` and its direct sub-folders are read. A missing or empty caption falls
    back to the trigger word, else the folder's name part, and is reported. Links in
    the folder are followed: the user placed them (a workflow names only `root`)."""
    root = Path(root)
    if not root.is_dir():
        raise ImageError(f"image folder {str(root)!r} does not exist or is not a folder; "
                         "give the folder that holds the training images")
    if int(default_repeats) != default_repeats or default_repeats < 1:
        raise ImageError(f"default_repeats must be a whole number >= 1, got {default_repeats}")
    scan = FolderScan()

    folders = [(root, int(default_repeats), _folder_name(root.name)[1])]
    for entry in sorted(root.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        repeats, name_part = _folder_name(entry.name)
        if repeats == 0:
            scan.problems.append(f"{entry.name}/: 0 repeats, so its images are skipped")
            continue
        if repeats is None:
            scan.problems.append(f"{entry.name}/: no repeat count in its name (like '10_{entry.name}'); "
                                 f"its images are used {default_repeats} time(s) per epoch")
            repeats = int(default_repeats)
        folders.append((entry, repeats, name_part))

    for folder, repeats, name_part in folders:
        for path in sorted(folder.iterdir()):
            relative = path.relative_to(root).as_posix()
            if path.name.startswith(".") or path.suffix.lower() not in IMAGE_EXTENSIONS:
                if path.is_dir() and folder != root:
                    scan.problems.append(f"{relative}/: nested folders are not read; "
                                         "move its images up one level")
                continue
            try:
                load_image(path)
            except ImageError as e:
                scan.problems.append(f"{relative}: unreadable, skipped ({e.__cause__ or e})")
                continue
            caption = _read_caption(root, path, scan)
            if caption is None:
                fallback = trigger_word.strip() or name_part.strip()
                scan.problems.append(f"{relative}: no caption ({path.stem}{CAPTION_EXTENSION} missing "
                                     f"or empty); using {fallback!r}")
                caption = fallback
            scan.items.append(ImageItem(path, with_trigger(caption, trigger_word), repeats))

    if not scan.items:
        listed = "\n  ".join(scan.problems) or "(no files with an image extension: " + \
            ", ".join(sorted(IMAGE_EXTENSIONS)) + ")"
        raise ImageError(f"no usable training image in {str(root)!r}:\n  {listed}\n"
                         "put images (with same-name .txt captions) in it or in '<repeats>_<name>' "
                         "sub-folders")
    return scan


def _folder_name(name: str) -> tuple[int | None, str]:
    """(repeats, name part) of a '<repeats>_<name>' folder; (None, name) for any other name."""
    match = _REPEATS_FOLDER.match(name)
    return (int(match.group(1)), match.group(2)) if match else (None, name)


def _read_caption(root: Path, image_path: Path, scan: FolderScan) -> str | None:
    path = image_path.with_suffix(CAPTION_EXTENSION)
    if not path.is_file():
        return None
    relative = path.relative_to(root).as_posix()
    try:
        text = path.read_text("utf-8-sig")
    except UnicodeDecodeError:
        scan.problems.append(f"{relative}: not UTF-8 text; read with undecodable bytes replaced")
        text = path.read_bytes().decode("utf-8", errors="replace")
    text = " ".join(text.split())
    return text or None
