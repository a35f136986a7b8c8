"""Decoding training images and scanning kohya-style folders (fluxtrain.images)."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from fluxtrain.images import (ImageError, image_to_tensor, load_image, scan_image_folder,
                              tensor_to_image, with_trigger)


def pixel(image, x, y):
    return image.getpixel((x, y))


# --------------------------------------------------------------------------- load_image

def test_rgba_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (8, 8), (255, 0, 0, 255))
    image.putpixel((0, 0), (0, 0, 255, 0))      # fully transparent blue -> white
    image.putpixel((1, 0), (0, 0, 0, 128))      # half transparent black -> mid grey
    image.save(tmp_path / "a.png")
    out = load_image(tmp_path / "a.png")
    assert out.mode == "RGB" and out.size == (8, 8)
    assert pixel(out, 0, 0) == (255, 255, 255)
    assert all(abs(c - 127) <= 1 for c in pixel(out, 1, 0))
    assert pixel(out, 5, 5) == (255, 0, 0)


def test_16_bit_greyscale_is_scaled_to_8_bit(tmp_path):
    values = np.array([[0, 257 * 100, 65535, 257 * 200]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")  # really saved 16-bit
    out = load_image(tmp_path / "deep.png")
    assert [pixel(out, x, 0) for x in range(4)] == [(0,) * 3, (100,) * 3, (255,) * 3, (200,) * 3]


def test_32_bit_modes_are_scaled_to_8_bit(tmp_path):
    Image.fromarray(np.array([[0, 257 * 50, 65535]], dtype=np.int32)).save(tmp_path / "i.tif")
    assert [pixel(load_image(tmp_path / "i.tif"), x, 0)[0] for x in range(3)] == [0, 50, 255]
    Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32)).save(tmp_path / "f.tif")
    assert [pixel(load_image(tmp_path / "f.tif"), x, 0)[0] for x in range(3)] == [0, 128, 255]


def test_greyscale_palette_and_cmyk_become_rgb(tmp_path):
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    assert pixel(load_image(tmp_path / "grey.png"), 0, 0) == (77, 77, 77)

    palette = Image.new("P", (4, 4), 1)
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    palette.save(tmp_path / "pal.png")
    assert pixel(load_image(tmp_path / "pal.png"), 2, 2) == (10, 200, 30)

    palette.info["transparency"] = 1  # index 1 transparent -> white
    palette.save(tmp_path / "pal_t.png", transparency=1)
    assert pixel(load_image(tmp_path / "pal_t.png"), 2, 2) == (255, 255, 255)

    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = pixel(load_image(tmp_path / "cmyk.jpg"), 1, 1)
    assert r > 200 and g < 60 and b < 60  # cyan 0, magenta+yellow full: red


def test_exif_orientation_is_applied(tmp_path):
    # 16 wide, 8 high, left half red; Orientation 6 = rotate 90° clockwise to display
    image = Image.new("RGB", (16, 8), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 8, 8))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(tmp_path / "rot.jpg", exif=exif, quality=100)
    out = load_image(tmp_path / "rot.jpg")
    assert out.size == (8, 16)  # upright: tall
    assert pixel(out, 4, 2)[0] > 200 and pixel(out, 4, 13)[2] > 200  # red went to the top


@pytest.mark.parametrize("content", [b"", b"not an image at all", "truncated"])
def test_unreadable_file_names_the_file(tmp_path, content):
    path = tmp_path / "broken.jpg"
    if content == "truncated":
        Image.effect_noise((64, 64), 50).convert("RGB").save(path, quality=90)
        path.write_bytes(path.read_bytes()[:300])
    else:
        path.write_bytes(content)
    with pytest.raises(ImageError, match="broken.jpg"):
        load_image(path)


def test_tensor_round_trip_uses_comfyui_layout():
    image = Image.new("RGB", (5, 3), (255, 0, 51))
    tensor = image_to_tensor(image)
    assert tensor.shape == (1, 3, 5, 3) and tensor.dtype == torch.float32
    assert torch.allclose(tensor[0, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    assert pixel(tensor_to_image(tensor), 4, 2) == (255, 0, 51)
    with pytest.raises(ImageError, match=r"\[H, W, 3\]"):
        tensor_to_image(torch.zeros(2, 3, 4, 4))


# --------------------------------------------------------------------------- captions

def test_trigger_word_is_prepended_once():
    assert with_trigger("a dog on grass", "ohwx") == "ohwx, a dog on grass"
    assert with_trigger("photo of OHWX dog", "ohwx") == "photo of OHWX dog"
    assert with_trigger("ohwxyz dog", "ohwx") == "ohwx, ohwxyz dog"  # a longer word is not the trigger
    assert with_trigger("", "ohwx") == "ohwx"
    assert with_trigger(" a dog ", "") == "a dog"


# --------------------------------------------------------------------------- folders

def save(path, color=(200, 10, 10), size=(8, 8)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)


def test_kohya_folder_gives_repeats_captions_and_reports_problems(tmp_path):
    save(tmp_path / "10_sks dog" / "a.png")
    (tmp_path / "10_sks dog" / "a.txt").write_text("\ufeffa dog\non grass\n", "utf-8")
    save(tmp_path / "10_sks dog" / "b.jpg")                       # no caption
    (tmp_path / "10_sks dog" / "c.png").write_bytes(b"garbage")   # unreadable
    save(tmp_path / "top.png")
    (tmp_path / "top.txt").write_text("at the top", "utf-8")
    (tmp_path / "notes.json").write_text("{}")                     # ignored quietly

    scan = scan_image_folder(tmp_path, default_repeats=3)
    got = [(p.path.relative_to(tmp_path).as_posix(), p.caption, p.repeats) for p in scan.items]
    assert got == [("top.png", "at the top", 3),
                   ("10_sks dog/a.png", "a dog on grass", 10),
                   ("10_sks dog/b.jpg", "sks dog", 10)]
    assert len(scan.problems) == 2
    assert any("10_sks dog/b.jpg" in p and "no caption" in p for p in scan.problems)
    assert any("10_sks dog/c.png" in p and "unreadable" in p for p in scan.problems)


def test_trigger_word_applies_to_captions_and_fallbacks(tmp_path):
    save(tmp_path / "2_x" / "a.png")
    (tmp_path / "2_x" / "a.txt").write_text("a cat", "utf-8")
    save(tmp_path / "2_x" / "b.png")
    (tmp_path / "2_x" / "b.txt").write_text("   \n", "utf-8")  # empty counts as missing
    scan = scan_image_folder(tmp_path, trigger_word="ohwx")
    assert [i.caption for i in scan.items] == ["ohwx, a cat", "ohwx"]
    assert any("2_x/b.png" in p for p in scan.problems)


def test_folder_without_repeat_prefix_is_used_and_reported(tmp_path):
    save(tmp_path / "dogs" / "a.png")
    save(tmp_path / "0_never" / "a.png")
    scan = scan_image_folder(tmp_path, default_repeats=4)
    assert [(i.path.parent.name, i.repeats) for i in scan.items] == [("dogs", 4)]
    assert any("dogs/" in p and "repeat count" in p for p in scan.problems)
    assert any("0_never/" in p for p in scan.problems)


def test_links_the_user_placed_in_the_folder_are_followed(tmp_path):
    """ComfyUI's own LoadImage follows them: keeping images on another disk is the usual reason.
    (A workflow names only the folder, and safe_join keeps that name inside ComfyUI's input.)"""
    elsewhere = tmp_path / "other_disk"
    save(elsewhere / "far.png")
    (elsewhere / "far.txt").write_text("a far dog")
    root = tmp_path / "root"
    save(root / "1_ok" / "a.png")
    os.symlink(elsewhere / "far.png", root / "1_ok" / "linked.png")
    os.symlink(elsewhere, root / "5_linked_dir")
    scan = scan_image_folder(root)
    assert sorted((i.path.relative_to(root).as_posix(), i.repeats) for i in scan.items) == [
        ("1_ok/a.png", 1), ("1_ok/linked.png", 1), ("5_linked_dir/far.png", 5)]
    assert [i.caption for i in scan.items if i.path.name == "far.png"] == ["a far dog"]


def test_no_usable_image_is_an_error_listing_the_problems(tmp_path):
    (tmp_path / "x.png").write_bytes(b"nope")
    with pytest.raises(ImageError, match=r"no usable training image(.|\n)*x.png"):
        scan_image_folder(tmp_path)
    with pytest.raises(ImageError, match="does not exist"):
        scan_image_folder(tmp_path / "missing")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ImageError, match="no files with an image extension"):
        scan_image_folder(empty)
