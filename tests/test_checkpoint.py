"""Every checkpoint format reads back to the same BFL weights; errors say what is wrong."""

from __future__ import annotations

import dataclasses
import inspect
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from fluxtrain import checkpoint
from fluxtrain.checkpoint import (CheckpointError, bfl_to_diffusers, content_hash,
                                  describe_checkpoint, diffusers_to_bfl, load_flux,
                                  load_state_dict)
from fluxtrain.flux import pack_latents, text_ids
from fluxtrain.files import atomic_write_safetensors
from fluxtrain.fp8 import quantize
from fluxtrain.params import TINY, expected_shapes
from fluxtrain.synthetic import random_state_dict, write_bfl, write_diffusers, write_scaled_fp8

from conftest import TINY_1x1

F8, F8_E5 = torch.float8_e4m3fn, torch.float8_e5m2
SMALL_SHARDS = 60_000  # bytes: several shards for the tiny models


def cast_all(sd, dtype):
    return {k: v.to(dtype) for k, v in sd.items()}


def scaled_expected(sd):
    """What write_scaled_fp8 stores: Linear weights as (fp8, scale), the rest bf16."""
    weights, scales = {}, {}
    for k, v in sd.items():
        if k.endswith(".weight") and v.ndim == 2:
            weights[k], scales[k[:-len(".weight")]] = quantize(v)
        else:
            weights[k] = v.to(torch.bfloat16)
    return weights, scales


def single_file(writer, *args):
    """write(sd, folder) -> path: one .safetensors written by `writer(sd, path, *args)`."""
    def write(sd, folder):
        writer(sd, folder / "m.safetensors", *args)
        return folder / "m.safetensors"
    return write


def diffusers_file(dtype):
    """write(sd, folder) -> path: the transformer in diffusers key names as one .safetensors,
    as some re-uploads ship it (ComfyUI's UNETLoader reads it)."""
    def write(sd, folder):
        path = folder / "flux-dev-diffusers.safetensors"
        atomic_write_safetensors({k: v.to(dtype) for k, v in bfl_to_diffusers(sd).items()}, path)
        return path
    return write


def same_values(dtype):
    return lambda sd: (cast_all(sd, dtype), {})


AIO = "model.diffusion_model."
# (id, write(sd, folder) -> path to load, expected(sd) -> (tensors, scales), format, dtype)
FORMATS = [
    ("bfl-bf16", single_file(write_bfl, torch.bfloat16),
     same_values(torch.bfloat16), "bfl", torch.bfloat16),
    ("bfl-fp32-prefixed", single_file(write_bfl, torch.float32, AIO),
     same_values(torch.float32), "bfl", torch.float32),
    ("bfl-fp8-e4m3", single_file(write_bfl, F8), same_values(F8), "bfl", F8),
    ("bfl-fp8-e5m2-diffusion_model-prefix", single_file(write_bfl, F8_E5, "diffusion_model."),
     same_values(F8_E5), "bfl", F8_E5),
    ("scaled-fp8", single_file(write_scaled_fp8), scaled_expected, "scaled_fp8", F8),
    ("scaled-fp8-prefixed", single_file(write_scaled_fp8, AIO), scaled_expected, "scaled_fp8", F8),
    ("diffusers-fp16-sharded",
     lambda sd, d: write_diffusers(sd, d / "model", torch.float16, SMALL_SHARDS),
     same_values(torch.float16), "diffusers", torch.float16),
    ("diffusers-bf16-single-file", diffusers_file(torch.bfloat16),
     same_values(torch.bfloat16), "diffusers", torch.bfloat16),
    ("diffusers-bf16-parent-folder",
     lambda sd, d: write_diffusers(sd, d / "model", torch.bfloat16).parent,
     same_values(torch.bfloat16), "diffusers", torch.bfloat16),
]


def bits(t):
    """Compare float8 tensors bit for bit (and everything else exactly)."""
    return t.view(torch.uint8) if t.dtype in (F8, F8_E5) else t


@pytest.mark.parametrize("params", [TINY, TINY_1x1], ids=["tiny", "1x1"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[f[0] for f in FORMATS])
def test_every_format_loads_the_written_weights_in_bfl_keys(tmp_path, params, fmt):
    _, write, expected, fmt_name, dtype = fmt
    sd = random_state_dict(params, seed=3)
    want, want_scales = expected(sd)
    got, info = load_state_dict(write(sd, tmp_path))
    assert set(got) == set(expected_shapes(params))
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        assert torch.equal(bits(got[k]), bits(want[k])), k
    assert set(info.weight_scales) == set(want_scales)
    for layer, s in want_scales.items():
        assert info.weight_scales[layer].dtype == torch.float32
        assert torch.equal(info.weight_scales[layer], s), layer
    assert (info.params, info.format, info.dtype) == (params, fmt_name, dtype)
    assert not info.is_schnell and info.variant == "dev"


def test_scaled_fp8_matches_what_comfyui_reads(tmp_path, tiny_sd):
    """ComfyUI's convert_old_quants looks for `<prefix>scaled_fp8` and `<layer>.scale_weight`."""
    from safetensors import safe_open
    path = tmp_path / "m.safetensors"
    write_scaled_fp8(tiny_sd, path, "model.diffusion_model.")
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        marker = f.get_tensor("model.diffusion_model.scaled_fp8")
        scale = f.get_tensor("model.diffusion_model.img_in.scale_weight")
        weight = f.get_tensor("model.diffusion_model.img_in.weight")
    assert marker.dtype == F8 and marker.numel() != 2  # 2 elements would mean fp32 matmuls
    assert scale.dtype == torch.float32 and weight.dtype == F8
    n_linear = sum(1 for k, v in tiny_sd.items() if k.endswith(".weight") and v.ndim == 2)
    assert sum(k.endswith(".scale_weight") for k in keys) == n_linear
    # the stored weight times its scale is the original weight, to float8 precision
    torch.testing.assert_close(weight.float() * scale, tiny_sd["img_in.weight"],
                               rtol=0.07, atol=1e-3)


def test_all_in_one_checkpoint_yields_only_the_transformer(tmp_path, tiny_sd):
    path = tmp_path / "aio.safetensors"
    extra = {"first_stage_model.encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
             "text_encoders.clip_l.transformer.text_model.final_layer_norm.weight": torch.ones(8)}
    save_file({**{"model.diffusion_model." + k: v for k, v in tiny_sd.items()}, **extra}, str(path))
    sd, info = load_state_dict(path)
    assert set(sd) == set(tiny_sd) and info.params == TINY
    assert all(torch.equal(sd[k], tiny_sd[k]) for k in sd)


def _diffusers_reference(sd):
    """diffusers' own BFL -> diffusers converter. It hard-codes the full-size width
    (inner_dim = 3072) for splitting linear1; rebuild it with the test model's width."""
    from diffusers.loaders import single_file_utils as ref
    src = inspect.getsource(ref.convert_flux_transformer_checkpoint_to_diffusers)
    assert "inner_dim = 3072" in src, "diffusers changed its converter; update this test"
    namespace = dict(vars(ref))
    exec(src.replace("inner_dim = 3072", f"inner_dim = {sd['img_in.weight'].shape[0]}"), namespace)
    return namespace["convert_flux_transformer_checkpoint_to_diffusers"](dict(sd))


@pytest.mark.parametrize("params", [TINY, TINY_1x1], ids=["tiny", "1x1"])
def test_diffusers_conversion_matches_diffusers_and_round_trips(params):
    sd = random_state_dict(params, seed=1)
    ours, theirs = bfl_to_diffusers(sd), _diffusers_reference(sd)
    assert set(ours) == set(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    back = diffusers_to_bfl(ours)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)


def test_written_diffusers_folder_loads_in_diffusers(tmp_path, tiny_sd):
    from diffusers import FluxTransformer2DModel
    folder = write_diffusers(tiny_sd, tmp_path / "model", torch.float32, SMALL_SHARDS)
    model = FluxTransformer2DModel.from_pretrained(str(folder))
    theirs = model.state_dict()
    ours = bfl_to_diffusers(tiny_sd)
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_load_flux_gives_identical_outputs_from_every_format(tmp_path):
    """Weights exactly representable in every format (float8 values, each Linear's
    absolute maximum 448 * 2^-9 so the scaled-fp8 scale is 2^-9): every format must
    then give bit-identical model outputs."""
    sd = cast_all(cast_all(random_state_dict(TINY, seed=5), F8), torch.float32)
    for k, v in sd.items():
        if v.ndim == 2:
            v[0, 0] = 448 * 2.0 ** -9
    torch.manual_seed(0)
    img, img_ids = pack_latents(torch.randn(2, 16, 8, 6))
    inputs = (img, img_ids, torch.randn(2, 7, TINY.context_in_dim), text_ids(2, 7),
              torch.tensor([0.3, 0.9]), torch.randn(2, TINY.vec_in_dim), torch.ones(2))
    outputs = {}
    for fmt_id, write, _, fmt_name, dtype in FORMATS:
        if "e5m2" in fmt_id:
            continue  # e5m2 holds fewer mantissa bits than these weights
        model, info = load_flux(write(sd, tmp_path / fmt_id))
        assert info.format == fmt_name
        assert model.double_blocks[0].img_attn.qkv.weight.dtype == dtype
        assert not any(p.requires_grad for p in model.parameters())
        assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
        if fmt_name == "scaled_fp8":
            assert model.img_in.weight_scale == 2.0 ** -9
        if dtype == F8:  # float8 biases and norm scales are upcast, exactly
            assert model.img_in.bias.dtype == torch.bfloat16
        with torch.no_grad():
            outputs[fmt_id] = model(*inputs)
    first = next(iter(outputs.values()))
    assert first.isfinite().all()
    for fmt_id, out in outputs.items():
        assert torch.equal(out, first), fmt_id


def test_random_model_is_deterministic_per_tensor_and_well_behaved(tiny_sd):
    again = random_state_dict(TINY, seed=0)
    assert all(torch.equal(again[k], tiny_sd[k]) for k in tiny_sd)
    other = random_state_dict(TINY, seed=1)
    assert not torch.equal(other["img_in.weight"], tiny_sd["img_in.weight"])
    # generated tensor by tensor: float8 is the float32 model cast, fewer blocks share tensors
    fp8 = random_state_dict(TINY, seed=0, dtype=F8)
    assert all(torch.equal(fp8[k].float(), tiny_sd[k].to(F8).float()) for k in tiny_sd)
    smaller = random_state_dict(dataclasses.replace(TINY, depth=1, depth_single_blocks=1))
    assert all(torch.equal(v, tiny_sd[k]) for k, v in smaller.items())
    assert {k: tuple(v.shape) for k, v in tiny_sd.items()} == expected_shapes(TINY)
    assert torch.equal(tiny_sd["single_blocks.0.norm.key_norm.scale"], torch.ones(TINY.head_dim))


def test_name_and_variant_are_guessed_from_the_file_or_model_folder(tmp_path, tiny_sd):
    folder = write_diffusers(tiny_sd, tmp_path / "Flux-Dev2Pro", torch.bfloat16)
    for path in (folder, folder.parent):
        _, info = load_state_dict(path)
        assert (info.name, info.variant) == ("Flux-Dev2Pro", "dev2pro")
    write_bfl(tiny_sd, tmp_path / "flux1-dev-fp8.safetensors", F8)
    _, info = load_state_dict(tmp_path / "flux1-dev-fp8.safetensors")
    assert (info.name, info.variant, info.path) == (
        "flux1-dev-fp8.safetensors", "dev", str(tmp_path / "flux1-dev-fp8.safetensors"))


# ---------------------------------------------------------------- describe (headers only)

@pytest.mark.parametrize("params", [TINY, TINY_1x1], ids=["tiny", "1x1"])
@pytest.mark.parametrize("fmt", FORMATS, ids=[f[0] for f in FORMATS])
def test_describe_says_what_load_says_for_every_format(tmp_path, params, fmt):
    _, write, _, fmt_name, dtype = fmt
    path = write(random_state_dict(params, seed=3), tmp_path)
    described = describe_checkpoint(path)
    _, loaded = load_state_dict(path)
    assert dataclasses.replace(loaded, weight_scales={}) == described
    assert (described.format, described.dtype, described.params) == (fmt_name, dtype, params)
    assert described.weight_scales == {}  # scales are tensor data: documented as left empty


class _CountingFile:
    """A binary file that counts the bytes read from it."""

    def __init__(self, fh, counter):
        self._fh, self._counter = fh, counter

    def read(self, n=-1):
        data = self._fh.read(n)
        self._counter[0] += len(data)
        return data

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._fh.close()

    def __getattr__(self, name):
        return getattr(self._fh, name)


@pytest.mark.parametrize("fmt", FORMATS, ids=[f[0] for f in FORMATS])
def test_describe_reads_only_the_headers(tmp_path, monkeypatch, fmt):
    _, write, _, _, _ = fmt
    path = write(random_state_dict(TINY, seed=3), tmp_path)
    files = checkpoint.weight_files(path)
    header_bytes = sum(8 + int.from_bytes(f.read_bytes()[:8], "little") for f in files)
    data_bytes = sum(f.stat().st_size for f in files) - header_bytes
    assert data_bytes > 100_000

    read = [0]
    real_open = open
    monkeypatch.setattr(checkpoint, "open", lambda *a, **k: _CountingFile(real_open(*a, **k), read),
                        raising=False)

    def no_tensor_data(*args, **kwargs):
        raise AssertionError("describe_checkpoint opened a file with safe_open")

    monkeypatch.setattr(checkpoint, "safe_open", no_tensor_data)
    monkeypatch.setattr(torch, "cat", lambda *a, **k: pytest.fail("concatenated tensors"))
    info = describe_checkpoint(path)
    assert info.params == TINY
    assert read[0] == header_bytes, f"read {read[0]} bytes; the headers are {header_bytes}"


def _describe_as_load(path, **kwargs):
    return None, describe_checkpoint(path, **kwargs)


# The error tests below run against both readers: a base that describes must load.
READERS = pytest.mark.parametrize("read", [load_state_dict, _describe_as_load],
                                  ids=["load", "describe"])


# ---------------------------------------------------------------- content hash

def test_content_hash_covers_tensor_data_only_and_is_cached(tmp_path, tiny_sd, monkeypatch):
    plain, prefixed = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    write_bfl(tiny_sd, plain, torch.bfloat16)
    write_bfl(tiny_sd, prefixed, torch.bfloat16, "model.diffusion_model.")
    h = content_hash(plain)
    assert len(h) == 64 and set(h) <= set("0123456789abcdef")  # sha256 hex digest
    assert content_hash(prefixed) == h  # the key names live in the header, not the data

    calls = []
    real = checkpoint.hashlib.sha256
    monkeypatch.setattr(checkpoint.hashlib, "sha256", lambda: calls.append(1) or real())
    assert content_hash(plain) == h and not calls  # served from the cache
    write_bfl(random_state_dict(TINY, seed=9), plain, torch.bfloat16)
    assert content_hash(plain) != h and calls  # rewritten file: new size/mtime, hashed again


def test_content_hash_is_kept_on_disk_across_restarts(tmp_path, tiny_sd, monkeypatch):
    model, cache = tmp_path / "a.safetensors", tmp_path / "out" / "base_hashes.json"
    write_bfl(tiny_sd, model, torch.bfloat16)
    h = content_hash(model, cache)
    assert h in json.loads(cache.read_text()).values()

    checkpoint._HASH_CACHE.clear()                     # a restarted program
    calls = []
    real = checkpoint.hashlib.sha256
    monkeypatch.setattr(checkpoint.hashlib, "sha256", lambda: calls.append(1) or real())
    assert content_hash(model, cache) == h and not calls
    checkpoint._HASH_CACHE.clear()
    cache.write_text("{not json")                      # a damaged cache is rebuilt, not fatal
    assert content_hash(model, cache) == h and calls
    assert json.loads(cache.read_text())


def test_content_hash_of_diffusers_folder_covers_every_shard(tmp_path, tiny_sd):
    folder = write_diffusers(tiny_sd, tmp_path / "model", torch.bfloat16, SMALL_SHARDS)
    h = content_hash(folder.parent)
    assert content_hash(folder) == h
    shards = sorted(folder.glob("*-of-*.safetensors"))
    assert len(shards) > 2
    data = bytearray(shards[-1].read_bytes())
    data[-1] ^= 1
    shards[-1].write_bytes(bytes(data))
    assert content_hash(folder) != h


# ---------------------------------------------------------------- errors

@READERS
def test_sdxl_like_file_is_not_flux(read, tmp_path):
    path = tmp_path / "sdxl.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3),
               "conditioner.embedders.0.transformer.text_model.x": torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match="not a Flux transformer") as e:
        read(path)
    assert "sdxl.safetensors" in str(e.value) and "img_in.weight" in str(e.value)


@READERS
def test_vae_file_is_not_flux(read, tmp_path):
    path = tmp_path / "ae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(8, 3, 3, 3),
               "decoder.conv_out.weight": torch.zeros(3, 8, 3, 3)}, str(path))
    with pytest.raises(CheckpointError, match="not a Flux transformer.*diffusers"):
        read(path)


@READERS
def test_file_missing_a_tensor_names_it(read, tmp_path, tiny_sd):
    path = tmp_path / "m.safetensors"
    write_bfl({k: v for k, v in tiny_sd.items() if k != "double_blocks.1.txt_mlp.2.bias"}, path)
    with pytest.raises(CheckpointError, match=r"missing \['double_blocks.1.txt_mlp.2.bias'\]"):
        read(path)


@READERS
def test_schnell_is_refused_when_guidance_is_required(read, tmp_path):
    schnell = dataclasses.replace(TINY, guidance_embed=False)
    path = tmp_path / "flux1-schnell.safetensors"
    write_bfl(random_state_dict(schnell), path, torch.bfloat16)
    _, info = read(path)
    assert info.is_schnell and info.variant == "schnell" and info.params == schnell
    with pytest.raises(CheckpointError, match="no guidance_in.*schnell.*Dev2Pro") as refused:
        read(path, require_guidance=True)
    assert "without a guidance" not in str(refused.value), "no setting trains without one"
    with pytest.raises(CheckpointError, match="schnell"):
        load_flux(path, require_guidance=True)


@pytest.mark.parametrize("layout", ["bfl", "diffusers"])
def test_a_file_claiming_a_huge_block_number_gets_a_short_error(tmp_path, tiny_sd, layout):
    """2 MB of keys claiming block 99999999: the error lists a few and says how many more
    (it was a 989 MB message, from a list of every missing block)."""
    sd = dict(tiny_sd) if layout == "bfl" else bfl_to_diffusers(tiny_sd)
    block = "double_blocks" if layout == "bfl" else "transformer_blocks"
    sd.update({f"{block}.99999999.img_mod.lin.x{i:04d}" + "_" * 400: torch.zeros(1) for i in range(5000)})
    path = tmp_path / "m.safetensors"
    if layout == "diffusers":
        path = tmp_path / "folder"
        path.mkdir()
    save_file(sd, str(path / "diffusion_pytorch_model.safetensors" if path.is_dir() else path))
    with pytest.raises(CheckpointError, match=r"blocks \[2, 3, 4, 5, 6\] and 99999992 more are "
                                              "missing") as refused:
        describe_checkpoint(path)
    assert len(str(refused.value)) < 1500, len(str(refused.value))


def test_the_cli_reports_a_huge_key_list_in_a_few_lines(tmp_path, tiny_sd, make_dataset, capsys):
    from fluxtrain import cli
    path = tmp_path / "claims.safetensors"
    save_file({**tiny_sd, **{f"double_blocks.99999999.x{i:04d}" + "_" * 400: torch.zeros(1)
                             for i in range(5000)}}, str(path))
    dataset = make_dataset(tmp_path / "data")
    assert cli.main(["--base", str(path), "--dataset", str(dataset.folder), "--lora",
                     str(tmp_path / "l.safetensors"), "--run-dir", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "claims.safetensors" in err and "99999992 more are missing" in err and len(err) < 1500


@pytest.mark.parametrize("key", ["double_blocks.x.img_mod.lin.weight",
                                 "single_blocks.1e3.linear1.weight"])
def test_a_block_number_that_is_not_a_number_names_the_file_and_key(tmp_path, tiny_sd, key):
    path = tmp_path / "odd.safetensors"
    write_bfl({**tiny_sd, key: torch.zeros(2, 2)}, path)
    with pytest.raises(CheckpointError) as refused:
        describe_checkpoint(path)
    message = str(refused.value)
    assert "odd.safetensors" in message and key in message and "not a whole number" in message


def _with_wrong_dtype(data: bytes) -> bytes:
    """The file with one tensor's dtype doubled in width in the header: its data_offsets
    no longer fit its shape, though the file still has exactly the bytes the header spans."""
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    header["img_in.weight"]["dtype"] = "F32"
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + data[8 + n:]


@READERS
@pytest.mark.parametrize("damage", ["truncated", "appended", "garbage", "empty", "bad-offsets"])
def test_damaged_file_says_truncated_or_corrupt(read, tmp_path, tiny_sd, damage):
    path = tmp_path / "m.safetensors"
    write_bfl(tiny_sd, path, torch.bfloat16)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-1000], "appended": data + b"x" * 16,
                      "garbage": os.urandom(4096), "empty": b"",
                      "bad-offsets": _with_wrong_dtype(data)}[damage])
    with pytest.raises(CheckpointError, match="truncated or corrupt.*Re-download") as e:
        read(path)
    assert str(path) in str(e.value)
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_flux(path)
    if damage in ("garbage", "empty"):  # the hash reads only the header size, not the whole header
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            content_hash(path)


@READERS
def test_missing_shard_is_named(read, tmp_path, tiny_sd):
    folder = write_diffusers(tiny_sd, tmp_path / "model", torch.bfloat16, SMALL_SHARDS)
    gone = sorted(folder.glob("*-of-*.safetensors"))[1]
    gone.unlink()
    for call in (read, content_hash):
        with pytest.raises(CheckpointError, match=f"{gone.name}.*incomplete.*Download the missing"):
            call(tmp_path / "model")


@READERS
def test_path_that_does_not_exist(read, tmp_path):
    with pytest.raises(CheckpointError, match="nope.safetensors' does not exist"):
        read(tmp_path / "nope.safetensors")


@READERS
def test_folder_without_diffusers_index(read, tmp_path):
    (tmp_path / "stuff").mkdir()
    (tmp_path / "stuff" / "readme.txt").write_text("hi")
    with pytest.raises(CheckpointError,
                       match="holds no diffusers transformer.*index.json.*readme.txt"):
        read(tmp_path / "stuff")


@READERS
def test_unsharded_diffusers_folder_loads_and_foreign_tensors_are_named(read, tmp_path, tiny_sd):
    d = tmp_path / "model" / "transformer"
    d.mkdir(parents=True)
    single = d / "diffusion_pytorch_model.safetensors"
    save_file(bfl_to_diffusers(tiny_sd), str(single))
    sd, info = load_state_dict(tmp_path / "model")
    assert info.format == "diffusers" and all(torch.equal(sd[k], tiny_sd[k]) for k in tiny_sd)
    assert describe_checkpoint(tmp_path / "model") == info
    save_file({**bfl_to_diffusers(tiny_sd), "pos_embed.proj.weight": torch.zeros(2, 2)},
              str(single))
    with pytest.raises(CheckpointError,
                       match="no place in a Flux transformer.*pos_embed.proj.weight"):
        read(tmp_path / "model")


@pytest.mark.parametrize("fmt", FORMATS, ids=[f[0] for f in FORMATS])
def test_stored_bytes_read_back_exactly_what_the_loader_gives(tmp_path, fmt):
    """Offloading reads weights with plain reads at these offsets instead of mapping
    the file: every tensor stored as the model holds it must come back bit for bit."""
    _, write, _, fmt_name, _ = fmt
    path = write(random_state_dict(TINY, seed=4), tmp_path)
    loaded, _ = load_state_dict(path)
    where = checkpoint.stored_bytes(path)
    if fmt_name == "diffusers":   # fused projections and the reordered final layer are built
        assert "double_blocks.0.img_attn.qkv.weight" not in where
        assert "single_blocks.0.linear1.weight" not in where
        assert "final_layer.adaLN_modulation.1.weight" not in where
        assert "double_blocks.0.img_mlp.0.weight" in where
    else:
        assert set(where) == set(loaded)
    for key, meta in where.items():
        out = torch.empty(meta.shape, dtype=meta.dtype)
        checkpoint.read_into(meta, out)
        assert torch.equal(bits(out), bits(loaded[key])), key


def test_read_into_refuses_a_wrong_destination_and_names_a_truncated_file(tmp_path, tiny_sd):
    path = tmp_path / "m.safetensors"
    write_bfl(tiny_sd, path, F8)
    meta = checkpoint.stored_bytes(path)["double_blocks.0.img_mlp.0.weight"]
    with pytest.raises(ValueError, match=r"holds torch.float8_e4m3fn \[.*destination is torch.bfloat16"):
        checkpoint.read_into(meta, torch.empty(meta.shape, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match="contiguous: False"):
        checkpoint.read_into(meta, torch.empty(meta.shape[::-1], dtype=F8).t())
    os.truncate(path, meta.start + meta.nbytes // 2)
    with pytest.raises(CheckpointError, match="ended .* bytes early.*truncated or corrupt"):
        checkpoint.read_into(meta, torch.empty(meta.shape, dtype=F8))
