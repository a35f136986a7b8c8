"""Path safety and atomic writes (fluxtrain.files)."""

import json
import os

import pytest

from fluxtrain.files import (NAME_MAX, UnsafePathError, atomic_write_bytes, atomic_write_json, inside_roots,
                            remove_leftovers, safe_join, temp_path)


@pytest.mark.parametrize("name, expected", [
    ("run1.safetensors", "run1.safetensors"),
    ("my_lora/run1.safetensors", "my_lora/run1.safetensors"),
    ("./a/./b.json", "a/b.json"),
    ("dots..in..name.safetensors", "dots..in..name.safetensors"),
])
def test_safe_join_accepts_relative_names(tmp_path, name, expected):
    assert safe_join(tmp_path, name) == tmp_path / expected


@pytest.mark.parametrize("name", ["../x.safetensors", "a/../../x", "a/..", "..\\x", "a\\..\\..\\x"])
def test_safe_join_refuses_dotdot(tmp_path, name):
    with pytest.raises(UnsafePathError, match="'..' component"):
        safe_join(tmp_path, name)


@pytest.mark.parametrize("name", ["/etc/passwd", "C:\\Windows\\x", "C:/x", "\\\\server\\share\\x", "\\x"])
def test_safe_join_refuses_absolute(tmp_path, name):
    with pytest.raises(UnsafePathError, match="absolute path"):
        safe_join(tmp_path, name)


@pytest.mark.parametrize("name", ["", "   ", ".", "./"])
def test_safe_join_refuses_names_without_a_file(tmp_path, name):
    with pytest.raises(UnsafePathError):
        safe_join(tmp_path, name)


def test_safe_join_refuses_symlink_out_of_root(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir(), outside.mkdir()
    (root / "escape").symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError) as err:
        safe_join(root, "escape/x.safetensors")
    msg = str(err.value)
    assert "'escape/x.safetensors' leaves the folder" in msg and "symlink" in msg
    assert "give a name relative to" in msg


def test_safe_join_allows_symlink_within_root_and_symlinked_root(tmp_path):
    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "alias").symlink_to(real / "sub", target_is_directory=True)
    link_root = tmp_path / "link_root"
    link_root.symlink_to(real, target_is_directory=True)
    assert safe_join(real, "alias/x") == real / "alias" / "x"
    assert safe_join(link_root, "sub/x") == link_root / "sub" / "x"


def test_error_message_names_the_name_and_the_folder(tmp_path):
    with pytest.raises(UnsafePathError) as err:
        safe_join(tmp_path, "../evil", what="LoRA name")
    assert str(err.value).startswith("LoRA name '../evil' leaves the folder")
    assert str(tmp_path) in str(err.value)


def _leftovers(folder):
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_atomic_write_bytes_replaces_and_leaves_no_temp_files(tmp_path):
    target = tmp_path / "sub" / "f.bin"
    atomic_write_bytes(target, b"first")
    atomic_write_bytes(target, b"second")
    assert target.read_bytes() == b"second"
    assert _leftovers(target.parent) == []
    assert os.listdir(target.parent) == ["f.bin"]


def test_atomic_write_json_roundtrips_and_refuses_nan(tmp_path):
    target = tmp_path / "d.json"
    atomic_write_json(target, {"caption": "é ü", "n": [1, 2]})
    assert json.loads(target.read_text("utf-8")) == {"caption": "é ü", "n": [1, 2]}
    with pytest.raises(ValueError):
        atomic_write_json(target, {"loss": float("nan")})
    assert json.loads(target.read_text("utf-8"))["n"] == [1, 2]  # old file intact
    assert _leftovers(tmp_path) == []


def test_failed_write_keeps_old_file_and_removes_temp(tmp_path, monkeypatch):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(target, b"new")
    assert target.read_bytes() == b"old"
    assert os.listdir(tmp_path) == ["f.bin"]


def test_a_killed_writes_leftovers_are_removed_when_that_file_is_written_again(tmp_path):
    target = tmp_path / "lora.safetensors"
    killed = temp_path(target)              # what kill -9 in the middle of a write leaves
    killed.write_bytes(b"half")
    killed_folder = temp_path(tmp_path / "step-000002")
    killed_folder.mkdir()
    other = temp_path(tmp_path / "other.safetensors")    # another file's write, maybe running
    other.write_bytes(b"busy")
    atomic_write_bytes(target, b"whole")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["lora.safetensors", killed_folder.name, other.name])
    remove_leftovers(tmp_path)              # a folder one writer owns: every name
    assert os.listdir(tmp_path) == ["lora.safetensors"]


def test_temporary_names_fit_the_file_system_for_the_longest_accepted_name(tmp_path):
    name = "é" * (NAME_MAX // 2 - 6) + ".safetensors"     # two bytes per é: just under NAME_MAX
    target = safe_join(tmp_path, name)
    assert len(temp_path(target).name.encode()) <= NAME_MAX
    atomic_write_bytes(target, b"x")
    assert target.read_bytes() == b"x"


def test_written_files_follow_the_umask(tmp_path, umask_027):
    from fluxtrain.files import atomic_write_safetensors
    import torch
    out = tmp_path / "out"
    out.mkdir()
    atomic_write_bytes(out / "sub" / "a.bin", b"a")
    atomic_write_json(out / "b.json", {"b": 1})
    atomic_write_safetensors({"w": torch.zeros(2)}, out / "c.safetensors")
    assert umask_027(out) == []


@pytest.mark.parametrize("name, message", [
    ("a/" * 2000 + "x.safetensors", "2000 folders deep; at most 32"),
    ("x" * 300, "a part of 300 bytes"),
    ("ok/" + "é" * 130 + ".safetensors", "a part of 272 bytes"),
])
def test_names_the_file_system_cannot_hold_are_refused_clearly(tmp_path, name, message):
    """Not a RecursionError or a raw OSError after the training, and not a 4 kB message."""
    with pytest.raises(UnsafePathError, match=message) as refused:
        safe_join(tmp_path, name, what="LoRA name")
    assert len(str(refused.value)) < 600
    assert "such as 'my_lora/run1.safetensors'" in str(refused.value)


def test_the_example_in_a_refusal_fits_what_is_named(tmp_path):
    with pytest.raises(UnsafePathError, match="such as 'flux1-dev.safetensors'"):
        safe_join(tmp_path, "../x", what="model name", example="flux1-dev.safetensors")


def test_reading_follows_links_the_user_placed_but_names_still_cannot_climb_out(tmp_path):
    root, elsewhere = tmp_path / "models", tmp_path / "big_disk"
    root.mkdir(), elsewhere.mkdir()
    (elsewhere / "flux.safetensors").write_bytes(b"x")
    (root / "flux.safetensors").symlink_to(elsewhere / "flux.safetensors")
    (root / "more").symlink_to(elsewhere, target_is_directory=True)
    assert safe_join(root, "flux.safetensors", follow_links=True).read_bytes() == b"x"
    assert safe_join(root, "more/flux.safetensors", follow_links=True).read_bytes() == b"x"
    for name in ("../big_disk/flux.safetensors", str(elsewhere / "flux.safetensors")):
        with pytest.raises(UnsafePathError):
            safe_join(root, name, follow_links=True)
    with pytest.raises(UnsafePathError, match="symlink"):     # a write never follows a link out
        safe_join(root, "more/new.safetensors")


def test_paths_carried_between_nodes_are_checked_again_where_they_are_used(tmp_path):
    root = tmp_path / "input"
    (root / "a").mkdir(parents=True)
    assert inside_roots(root / "a" / "x.png", [tmp_path / "other", root], what="image",
                        follow_links=True) == root / "a" / "x.png"
    for path in (tmp_path / "secret.png", root / "a" / ".." / ".." / "secret.png"):
        with pytest.raises(UnsafePathError):
            inside_roots(path, [root], what="image", follow_links=True)
