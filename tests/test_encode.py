"""Encoding images and captions into a cached dataset (fluxtrain.encode)."""

import hashlib

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from fluxtrain.buckets import assign_bucket, make_buckets, resize_and_crop
from fluxtrain.dataset import INDEX_NAME
from fluxtrain.encode import (EncodeError, EncodeItem, dataset_cache_key, encode_dataset)

RES = 256
IDENTITY = {"vae": "fake-vae", "text": "fake-text"}


class FakeVAE:
    """8x8 average pool of the RGB image, channels tiled to 16 (so the latent
    depends on every pixel and on orientation). Counts its calls."""

    def __init__(self):
        self.calls = 0

    def __call__(self, pixels):
        assert pixels.ndim == 4 and pixels.shape[-1] == 3 and pixels.dtype == torch.float32
        self.calls += 1
        pooled = F.avg_pool2d(pixels.permute(0, 3, 1, 2), 8)
        return pooled.repeat(1, 6, 1, 1)[:, :16]


class FakeText:
    """A caption's SHA-256 seeds its encoding; long captions give longer sequences."""

    def __init__(self, width=8, clip_width=4):
        self.calls, self.width, self.clip_width = [], width, clip_width

    def __call__(self, caption):
        self.calls.append(caption)
        seed = int(hashlib.sha256(caption.encode()).hexdigest()[:8], 16)
        g = torch.Generator().manual_seed(seed)
        length = 4 + len(caption.split()) // 3
        return torch.randn(length, self.width, generator=g), torch.randn(self.clip_width, generator=g)


def gradient(size, seed):
    """A non-symmetric RGB image (flips and crops change it)."""
    rng = np.random.default_rng(seed)
    w, h = size
    x = np.linspace(0, 255, w)[None, :, None] * np.ones((h, 1, 3))
    noise = rng.integers(0, 40, (h, w, 3))
    return Image.fromarray(np.clip(x + noise, 0, 255).astype(np.uint8))


def items():
    return [EncodeItem(gradient((256, 256), 0), "a square dog", 2, "sq.png"),
            EncodeItem(gradient((400, 240), 1), "a wide dog, standing on the grass of a big park", 1,
                       "wide.png"),
            EncodeItem(gradient((180, 300), 2), "a tall dog", 3, "tall.png")]


def run(tmp_path, its=None, flip=False, resolution=RES, identity=IDENTITY, vae=None, text=None):
    vae, text = vae or FakeVAE(), text or FakeText()
    ds = encode_dataset(items() if its is None else its, encode_image=vae, encode_text=text,
                        cache_root=tmp_path / "cache", resolution=resolution, flip=flip,
                        encoder_identity=identity)
    return ds, vae, text


def test_samples_are_bucketed_and_moved_into_model_space(tmp_path):
    progress = []
    vae, text = FakeVAE(), FakeText()
    ds = encode_dataset(items(), encode_image=vae, encode_text=text, cache_root=tmp_path,
                        resolution=RES, flip=False, encoder_identity=IDENTITY,
                        on_progress=lambda d, t, m: progress.append((d, t)))
    assert not ds.reused and vae.calls == 3 and progress == [(1, 3), (2, 3), (3, 3)]
    buckets = make_buckets(RES)
    for n, item in enumerate(items()):
        bucket = assign_bucket(item.image.height, item.image.width, buckets)
        sample = ds[n]
        assert ds.samples[n].bucket == (bucket[0] // 8, bucket[1] // 8)
        assert sample["caption"] == item.caption and ds.samples[n].repeats == item.repeats
        # independent computation: crop, average 8x8 blocks in numpy, shift and scale
        pixels = np.asarray(resize_and_crop(item.image, bucket), dtype=np.float64) / 255
        h, w = bucket[0] // 8, bucket[1] // 8
        pooled = pixels.reshape(h, 8, w, 8, 3).mean(axis=(1, 3))
        expected = (pooled[..., [c % 3 for c in range(16)]].transpose(2, 0, 1) - 0.1159) * 0.3611
        np.testing.assert_allclose(sample["latent"].numpy(), expected, atol=1e-5)
    assert {ds.samples[n].bucket for n in range(3)} == {(32, 32), (24, 40), (40, 24)}


def test_text_is_encoded_once_per_caption_and_padded_to_the_longest(tmp_path):
    its = items() + [EncodeItem(gradient((64, 64), 5), "a square dog", 1)]  # repeated caption
    ds, _, text = run(tmp_path, its)
    assert sorted(text.calls) == sorted({"", *(i.caption for i in its)})  # "" = empty caption
    lengths = {c: FakeText()(c)[0].shape[0] for c in text.calls}
    assert ds.text_length == max(lengths.values()) > min(lengths.values())
    short = ds[0]["t5"]
    want_t5, want_clip = FakeText()("a square dog")
    assert torch.equal(short[:len(want_t5)], want_t5) and not short[len(want_t5):].any()
    assert torch.equal(ds[0]["clip"], want_clip)
    empty_t5, empty_clip = FakeText()("")
    assert torch.equal(ds.empty_caption["t5"][:len(empty_t5)], empty_t5)
    assert torch.equal(ds.empty_caption["clip"], empty_clip)


def test_flip_adds_a_mirrored_copy_of_each_image(tmp_path):
    ds, vae, _ = run(tmp_path, flip=True)
    assert len(ds) == 6 and vae.calls == 6
    assert [s.repeats for s in ds.samples] == [2, 2, 1, 1, 3, 3]
    original, mirrored = ds[2]["latent"], ds[3]["latent"]
    assert not torch.allclose(original, mirrored)
    torch.testing.assert_close(mirrored, original.flip(-1), atol=1e-6, rtol=0)


def test_second_call_with_same_inputs_reuses_the_cache(tmp_path):
    first, _, _ = run(tmp_path)
    second, vae, text = run(tmp_path)
    assert second.reused and not first.reused
    assert vae.calls == 0 and text.calls == []
    assert second.folder == first.folder and second.cache_key == first.cache_key
    assert torch.equal(second[1]["latent"], first[1]["latent"])


@pytest.mark.parametrize("change", ["caption", "repeats", "pixel", "resolution", "flip", "identity"])
def test_any_changed_input_misses_the_cache(tmp_path, change):
    first, _, _ = run(tmp_path)
    its, kw = items(), {}
    if change == "caption":
        its[0] = EncodeItem(its[0].image, "another caption", its[0].repeats)
    elif change == "repeats":
        its[0] = EncodeItem(its[0].image, its[0].caption, 5)
    elif change == "pixel":
        image = its[2].image.copy()
        image.putpixel((0, 0), tuple(255 - v for v in image.getpixel((0, 0))))
        its[2] = EncodeItem(image, its[2].caption, its[2].repeats)
    elif change == "resolution":
        kw["resolution"] = 128
    elif change == "flip":
        kw["flip"] = True
    else:
        kw["identity"] = {**IDENTITY, "vae": "other-vae"}
    second, vae, _ = run(tmp_path, its, **kw)
    assert not second.reused and vae.calls > 0 and second.folder != first.folder


def test_source_name_and_file_metadata_do_not_change_the_key():
    a = items()
    b = [EncodeItem(i.image.convert("RGB"), i.caption, i.repeats, "elsewhere/" + i.source) for i in a]
    kw = dict(resolution=RES, flip=False, encoder_identity=IDENTITY)
    assert dataset_cache_key(a, **kw) == dataset_cache_key(b, **kw)


def test_half_written_cache_folder_is_encoded_again(tmp_path):
    key = dataset_cache_key(items(), resolution=RES, flip=False, encoder_identity=IDENTITY)
    stale = tmp_path / "cache" / key
    stale.mkdir(parents=True)
    (stale / "000000.safetensors").write_bytes(b"torn")  # an interrupted encode, no dataset.json
    ds, vae, _ = run(tmp_path)
    assert not ds.reused and vae.calls == 3 and ds.folder == stale
    assert (stale / INDEX_NAME).is_file() and ds[0]["latent"].shape == (16, 32, 32)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name != key]  # no temp left


def test_damaged_cache_is_encoded_again(tmp_path):
    first, _, _ = run(tmp_path)
    (first.folder / "000001.safetensors").unlink()
    second, vae, _ = run(tmp_path)
    assert not second.reused and vae.calls == 3 and len(second) == 3


def test_interrupted_encode_leaves_no_cache_that_looks_complete(tmp_path):
    class Broken(FakeVAE):
        def __call__(self, pixels):
            if self.calls == 2:
                raise KeyboardInterrupt  # Cancel in ComfyUI
            return super().__call__(pixels)

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path, vae=Broken())
    assert list((tmp_path / "cache").iterdir()) == []
    ds, vae, _ = run(tmp_path)
    assert not ds.reused and vae.calls == 3


def test_wrong_encoder_outputs_are_clear_errors(tmp_path):
    with pytest.raises(EncodeError, match=r"expected \[1, 16, 32, 32\].*Flux VAE"):
        run(tmp_path, [items()[0]], vae=lambda p: torch.zeros(1, 4, 32, 32))
    with pytest.raises(EncodeError, match="NaN"):
        run(tmp_path, [items()[0]], vae=lambda p: torch.full((1, 16, 32, 32), float("nan")))
    with pytest.raises(EncodeError, match="different widths"):
        run(tmp_path, text=lambda c: (torch.zeros(4, 8 + len(c) % 2), torch.zeros(4)))
    with pytest.raises(EncodeError, match="NaN"):
        run(tmp_path, text=lambda c: (torch.full((4, 8), float("nan")), torch.zeros(4)))
    with pytest.raises(EncodeError, match="no images"):
        run(tmp_path, [])
    with pytest.raises(EncodeError, match="encoder_identity"):
        run(tmp_path, identity={})


def test_batched_encoder_outputs_are_accepted(tmp_path):
    text = FakeText()
    ds, _, _ = run(tmp_path, [items()[0]],
                   text=lambda c: tuple(t.unsqueeze(0) for t in text(c)))
    assert ds[0]["t5"].ndim == 2 and ds[0]["clip"].ndim == 1


def test_dataset_files_and_folders_follow_the_umask(tmp_path, umask_027):
    ds, _, _ = run(tmp_path)
    assert umask_027(tmp_path / "cache") == []
