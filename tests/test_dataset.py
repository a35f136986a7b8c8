"""Encoded datasets, buckets and batching (fluxtrain.dataset, fluxtrain.buckets)."""

import json
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from fluxtrain.buckets import assign_bucket, crop_plan, latent_size, make_buckets, resize_and_crop
from fluxtrain.dataset import (BucketBatchSampler, DatasetError, EncodedDataset,
                               EncodedDatasetWriter, SampleInfo, collate, write_encoded_sample)

L, D, C = 6, 32, 12  # small T5 length / width and CLIP width


def text(seed, length=L, width=D, clip_width=C):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(length, width, generator=g), torch.randn(clip_width, generator=g)


def make_dataset(folder, specs=(((4, 6), 1), ((4, 6), 2), ((6, 4), 1)), **writer_kw):
    """specs: (latent bucket, repeats) per sample. Returns (dataset, written tensors)."""
    written = []
    with EncodedDatasetWriter(folder, resolution=64, encoders={"vae": "ae-test", "t5": "t5-test",
                                                                "clip": "clip-test"}, **writer_kw) as w:
        w.set_empty_caption(*text(999))
        for n, (bucket, repeats) in enumerate(specs):
            latent = torch.randn(16, *bucket, generator=torch.Generator().manual_seed(n))
            t5, clip = text(n)
            w.add(latent, t5, clip, f"caption {n}", repeats=repeats)
            written.append((latent, t5, clip))
    return w.dataset, written


# --------------------------------------------------------------------------- buckets

@pytest.mark.parametrize("resolution", [512, 768, 1024])
def test_buckets_are_multiples_of_64_with_area_near_target(resolution):
    buckets = make_buckets(resolution)
    assert (resolution, resolution) in buckets and len(buckets) >= 5
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0
        assert abs(h * w / resolution ** 2 - 1) < 0.07, (h, w)
        assert max(h / w, w / h) <= 2.0
        assert (w, h) in buckets
        lh, lw = latent_size((h, w))
        assert lh % 2 == 0 and lw % 2 == 0  # patchifies 2x2
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios, reverse=True)


def test_max_aspect_limits_buckets():
    assert make_buckets(512, max_aspect=1.0) == [(512, 512)]
    assert max(w / h for h, w in make_buckets(1024, max_aspect=3.0)) > 2.5


def test_bucket_settings_are_checked():
    with pytest.raises(ValueError, match="multiple of 16"):
        make_buckets(512, step=40)
    with pytest.raises(ValueError, match="max_aspect"):
        make_buckets(512, max_aspect=0.5)


@pytest.mark.parametrize("size, expected", [
    ((1000, 1000), (512, 512)), ((768, 1366), (384, 704)), ((3000, 1000), (704, 384)),
    ((900, 1200), (448, 576)),
])
def test_assign_bucket_takes_nearest_aspect(size, expected):
    assert assign_bucket(*size, make_buckets(512)) == expected


@pytest.mark.parametrize("size", [(1000, 2000), (333, 777), (512, 512), (2000, 300), (100, 90)])
def test_crop_plan_covers_bucket_keeps_aspect_and_centers(size):
    h, w = size
    bucket = assign_bucket(h, w, make_buckets(512))
    p = crop_plan(h, w, bucket)
    assert p.resized_height >= bucket[0] and p.resized_width >= bucket[1]
    assert min(p.resized_height - bucket[0], p.resized_width - bucket[1]) <= 1  # one side fits
    assert abs(p.resized_height / p.resized_width - h / w) < 2 / min(p.resized_height, p.resized_width)
    assert (p.height, p.width) == bucket
    assert abs(p.top - (p.resized_height - p.top - p.height)) <= 1
    assert abs(p.left - (p.resized_width - p.left - p.width)) <= 1


def test_crop_plan_numbers():
    p = crop_plan(1000, 2000, (512, 512))
    assert (p.resized_height, p.resized_width, p.top, p.left) == (512, 1024, 0, 256)
    assert p.pil_box == (256, 0, 768, 512)


def test_resize_and_crop_cuts_the_center():
    image = Image.new("RGB", (400, 100), (255, 0, 0))           # wide red strip...
    image.paste((0, 255, 0), (150, 0, 250, 100))                # ...with a green middle
    out = resize_and_crop(image, (64, 64))
    assert out.size == (64, 64)
    assert out.getpixel((32, 32)) == (0, 255, 0)


# --------------------------------------------------------------------------- dataset on disk

def test_written_dataset_reopens_with_the_same_tensors(tmp_path):
    ds, written = make_dataset(tmp_path / "ds")
    again = EncodedDataset.open(tmp_path / "ds")
    assert len(again) == 3 and again.resolution == 64
    assert again.encoders == {"vae": "ae-test", "t5": "t5-test", "clip": "clip-test"}
    assert (again.text_length, again.text_width, again.clip_width) == (L, D, C)
    assert [s.bucket for s in again.samples] == [(4, 6), (4, 6), (6, 4)]
    assert [s.repeats for s in again.samples] == [1, 2, 1]
    for i, (latent, t5, clip) in enumerate(written):
        item = again[i]
        assert torch.equal(item["latent"], latent) and torch.equal(item["t5"], t5)
        assert torch.equal(item["clip"], clip) and item["caption"] == f"caption {i}"
    assert torch.equal(again.empty_caption["t5"], text(999)[0])
    assert again.bucket_counts() == {"32x48": 3, "48x32": 1}
    assert not [p for p in (tmp_path / "ds").iterdir() if p.name.endswith(".tmp")]
    index = json.loads((tmp_path / "ds" / "dataset.json").read_text())
    assert index["samples"][1] == {"file": "000001.safetensors", "caption": "caption 1",
                                   "bucket": [4, 6], "repeats": 2}


def test_writer_refuses_to_overwrite_unless_asked(tmp_path):
    make_dataset(tmp_path / "ds")
    with pytest.raises(DatasetError, match="overwrite=True"):
        make_dataset(tmp_path / "ds")
    ds, _ = make_dataset(tmp_path / "ds", specs=[((2, 2), 1)], overwrite=True)
    assert len(EncodedDataset.open(tmp_path / "ds")) == 1


def test_writer_refuses_mixed_text_widths_and_missing_empty_caption(tmp_path):
    w = EncodedDatasetWriter(tmp_path / "a", resolution=64, encoders={})
    w.add(torch.zeros(16, 2, 2), *text(0), "a")
    with pytest.raises(DatasetError, match=r"t5 \[6, 48\].*differ.*t5 \[6, 32\]"):
        w.add(torch.zeros(16, 2, 2), *text(1, width=48), "b")
    with pytest.raises(DatasetError, match="set_empty_caption"):
        w.finish()
    assert not (tmp_path / "a" / "dataset.json").exists()  # interrupted encodes don't open


@pytest.mark.parametrize("latent_shape, match", [((4, 2, 2), "expected \\[16, h, w\\]"),
                                                 ((16, 3, 4), "not even")])
def test_writer_checks_latent_shape(tmp_path, latent_shape, match):
    w = EncodedDatasetWriter(tmp_path, resolution=64, encoders={})
    with pytest.raises(DatasetError, match=match):
        w.add(torch.zeros(latent_shape), *text(0), "x")


def test_open_missing_folder_or_index(tmp_path):
    with pytest.raises(DatasetError, match="does not exist; run the encode step"):
        EncodedDataset.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="has no dataset.json"):
        EncodedDataset.open(tmp_path / "empty")


def test_open_listed_file_missing(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "000001.safetensors").unlink()
    with pytest.raises(DatasetError, match="000001.safetensors is listed in dataset.json but missing"):
        EncodedDataset.open(tmp_path)


def test_open_text_width_differs_between_samples(tmp_path):
    make_dataset(tmp_path)
    write_encoded_sample(tmp_path / "000002.safetensors", torch.zeros(16, 6, 4), *text(5, width=48))
    with pytest.raises(DatasetError) as err:
        EncodedDataset.open(tmp_path)
    msg = str(err.value)
    assert "000002.safetensors" in msg and "[6, 48]" in msg and "[6, 32]" in msg
    assert "encode the whole dataset again" in msg


def test_open_latent_not_matching_bucket(tmp_path):
    make_dataset(tmp_path)
    write_encoded_sample(tmp_path / "000000.safetensors", torch.zeros(16, 6, 6), *text(0))
    with pytest.raises(DatasetError, match=r"'latent' has shape \[16, 6, 6\], expected \[16, 4, 6\]"):
        EncodedDataset.open(tmp_path)


def _edit_index(folder, edit):
    path = folder / "dataset.json"
    index = json.loads(path.read_text())
    edit(index)
    path.write_text(json.dumps(index))


@pytest.mark.parametrize("edit, match", [
    (lambda i: i.update(format="other"), "not a fluxtrain encoded dataset"),
    (lambda i: i.update(version=99), "version 99.*update the node pack"),
    (lambda i: i.update(samples=[]), "lists no samples"),
    (lambda i: i["samples"][0].update(file="../outside.safetensors"), "leaves the folder"),
    (lambda i: i["samples"][0].update(repeats=0), "repeats >= 1"),
    (lambda i: i["samples"][0].update(bucket=[4]), "sample 0"),
    (lambda i: i["samples"][1].update(file="000000.safetensors"), "listed twice"),
    (lambda i: i.update(text_width=4096), r"'t5' has shape \[6, 32\], expected \[6, 4096\]"),
])
def test_open_rejects_bad_index(tmp_path, edit, match):
    make_dataset(tmp_path)
    _edit_index(tmp_path, edit)
    with pytest.raises(DatasetError, match=match):
        EncodedDataset.open(tmp_path)


def test_open_rejects_broken_json_and_unreadable_file(tmp_path):
    make_dataset(tmp_path)
    (tmp_path / "000000.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(DatasetError, match="cannot be read as safetensors"):
        EncodedDataset.open(tmp_path)
    (tmp_path / "dataset.json").write_text("{")
    with pytest.raises(DatasetError, match="not valid JSON"):
        EncodedDataset.open(tmp_path)


# --------------------------------------------------------------------------- batching

def fake_dataset(specs):
    """specs: (bucket, repeats) per sample; the sampler only reads .samples."""
    return SimpleNamespace(samples=[SampleInfo(f"{i}.st", "", b, r) for i, (b, r) in enumerate(specs)])


SPECS = [((4, 6), 1)] * 5 + [((6, 4), 3)] * 2 + [((4, 4), 1)] * 4 + [((4, 4), 2)]


def take(sampler, n):
    return [sampler.next_batch() for _ in range(n)]


def test_every_batch_holds_one_bucket_shape():
    sampler = BucketBatchSampler(fake_dataset(SPECS), batch_size=2, seed=0)
    buckets = [s[0] for s in SPECS]
    for batch in take(sampler, 3 * len(sampler)):
        assert 1 <= len(batch) <= 2
        assert len({buckets[i] for i in batch}) == 1


@pytest.mark.parametrize("batch_size", [1, 3])
def test_repeats_are_honoured_each_epoch(batch_size):
    sampler = BucketBatchSampler(fake_dataset(SPECS), batch_size=batch_size, seed=1)
    for epoch in range(3):
        seen = Counter(i for batch in sampler.epoch_batches(epoch) for i in batch)
        assert seen == Counter({i: r for i, (_, r) in enumerate(SPECS)})


def test_sampler_is_deterministic_from_seed_and_reshuffles_per_epoch():
    a = BucketBatchSampler(fake_dataset(SPECS), 2, seed=5)
    b = BucketBatchSampler(fake_dataset(SPECS), 2, seed=5)
    c = BucketBatchSampler(fake_dataset(SPECS), 2, seed=6)
    n = len(a)
    run_a, run_b, run_c = take(a, 3 * n), take(b, 3 * n), take(c, 3 * n)
    assert run_a == run_b and run_a != run_c
    assert run_a[:n] != run_a[n:2 * n]
    assert a.state_dict()["epoch"] == 3 and a.state_dict()["position"] == 0


@pytest.mark.parametrize("taken", [0, 3, 8, 9, 17])
def test_state_restore_gives_the_same_continuation(taken):
    original = BucketBatchSampler(fake_dataset(SPECS), 2, seed=3)
    take(original, taken)
    state = json.loads(json.dumps(original.state_dict()))  # survives the JSON state file
    expected = take(original, 20)
    restored = BucketBatchSampler(fake_dataset(SPECS), 2, seed=3)
    restored.load_state_dict(state)
    assert take(restored, 20) == expected


@pytest.mark.parametrize("change", [{"batch_size": 3}, {"seed": 4}, {"specs": SPECS[:-1]}])
def test_state_from_other_settings_is_refused(change):
    saved = BucketBatchSampler(fake_dataset(SPECS), 2, seed=3).state_dict()
    other = BucketBatchSampler(fake_dataset(change.get("specs", SPECS)), change.get("batch_size", 2),
                               seed=change.get("seed", 3))
    with pytest.raises(DatasetError, match="exact resume needs the same dataset"):
        other.load_state_dict(saved)


def test_sampler_on_a_real_dataset(tmp_path):
    ds, _ = make_dataset(tmp_path)
    sampler = BucketBatchSampler(ds, batch_size=4, seed=0)
    batches = sampler.epoch_batches(0)
    assert sorted(map(sorted, batches)) == [[0, 1, 1], [2]]


# --------------------------------------------------------------------------- collate

def items(n, bucket=(4, 6)):
    return [{"latent": torch.full((16, *bucket), float(i)), "t5": torch.full((L, D), float(i + 1)),
             "clip": torch.full((C,), float(i + 1)), "caption": f"c{i}"} for i in range(n)]


EMPTY = {"t5": torch.zeros(L, D), "clip": torch.zeros(C)}


def test_collate_stacks_one_bucket():
    batch = collate(items(3), 0.0, torch.Generator().manual_seed(0), EMPTY)
    assert batch["latent"].shape == (3, 16, 4, 6) and batch["t5"].shape == (3, L, D)
    assert batch["clip"].shape == (3, C) and batch["captions"] == ["c0", "c1", "c2"]
    assert torch.equal(batch["latent"][2], torch.full((16, 4, 6), 2.0))


def test_caption_dropout_rate_and_replacement():
    n, rate = 4000, 0.3
    batch = collate(items(n, (2, 2)), rate, torch.Generator().manual_seed(0), EMPTY)
    dropped = batch["dropped"]
    assert abs(dropped.float().mean().item() - rate) < 4 * math.sqrt(rate * (1 - rate) / n)
    assert (batch["t5"][dropped] == 0).all() and (batch["clip"][dropped] == 0).all()
    kept = ~dropped
    assert (batch["t5"][kept].flatten(1) > 0).all()
    assert all((c == "") == d for c, d in zip(batch["captions"], dropped.tolist()))
    assert torch.equal(batch["latent"][:, 0, 0, 0], torch.arange(n, dtype=torch.float32))  # latents kept


def test_caption_dropout_is_deterministic_and_consumes_the_same_draws():
    a = collate(items(64), 0.5, torch.Generator().manual_seed(9), EMPTY)["dropped"]
    b = collate(items(64), 0.5, torch.Generator().manual_seed(9), EMPTY)["dropped"]
    assert torch.equal(a, b) and 0 < a.sum() < 64
    g0, g1 = torch.Generator().manual_seed(9), torch.Generator().manual_seed(9)
    assert not collate(items(8), 0.0, g0, EMPTY)["dropped"].any()
    assert collate(items(8), 1.0, g1, EMPTY)["dropped"].all()
    assert torch.equal(torch.rand(4, generator=g0), torch.rand(4, generator=g1))


def test_collate_refuses_mixed_buckets_and_bad_rate():
    with pytest.raises(DatasetError, match="BucketBatchSampler"):
        collate(items(1, (4, 6)) + items(1, (6, 4)), 0.0, torch.Generator(), EMPTY)
    with pytest.raises(ValueError, match=r"caption_dropout must be in \[0, 1\]"):
        collate(items(1), 1.5, torch.Generator(), EMPTY)
