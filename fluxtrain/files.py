"""File safety: names that cannot leave their folder, and writes that cannot be
seen half done.

Workflows are shared JSON, so an output name typed in a node is untrusted: it
must stay inside the folder it names a file in. Every file the pack writes goes
through a temporary file in the same folder and `os.replace`, so a crash or an
interrupted queue leaves either the old file or the new one, never a torn one.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path, PurePosixPath, PureWindowsPath


class UnsafePathError(ValueError):
    """A user-given name would write outside the folder it is meant for."""


# --------------------------------------------------------------------------- path safety

def safe_join(root: str | os.PathLike, relative_name: str, *,
              what: str = "output name") -> Path:
    """`root / relative_name`, refusing any name that leaves `root`: absolute paths
    (POSIX or Windows style), `..` components, and symlinks that resolve outside.

    Sub-folders are fine (`"loras/run1.safetensors"`); the folders need not exist.
    """
    root = Path(root)
    name = str(relative_name)

    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(
            f"{what} {name!r} leaves the folder {str(root)!r} ({why}); "
            f"give a name relative to {str(root)!r}, such as 'my_lora/run1.safetensors'")

    if not name.strip():
        raise UnsafePathError(f"{what} is empty; give a file name relative to {str(root)!r}")
    if "\x00" in name:
        raise refuse("it contains a NUL character")
    if (PurePosixPath(name).is_absolute() or PureWindowsPath(name).is_absolute()
            or PureWindowsPath(name).drive or name.startswith(("/", "\\"))):
        raise refuse("it is an absolute path")
    parts = name.replace("\\", "/").split("/")
    if ".." in parts:
        raise refuse("it contains a '..' component")

    kept = [p for p in parts if p not in ("", ".")]
    if not kept:
        raise UnsafePathError(f"{what} {name!r} names the folder itself, not a file in it; "
                              f"give a file name relative to {str(root)!r}")
    joined = root.joinpath(*kept)
    real_root = root.resolve()
    real_target = joined.resolve()  # follows symlinks, also for parts that exist
    if real_target != real_root and real_root not in real_target.parents:
        raise refuse(f"it resolves through a symlink to {str(real_target)!r}")
    return joined


# --------------------------------------------------------------------------- atomic writes

def fsync_folder(folder: Path) -> None:
    """Make a rename into `folder` durable (POSIX); Windows cannot open folders."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_with(path: str | os.PathLike, write) -> Path:
    """Write `path` atomically: `write(tmp)` fills a temp file in the same folder,
    which is fsynced and renamed over `path` (a crash leaves the old file or none).
    The parent folder is created if missing. Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    fsync_folder(path.parent)
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (see atomic_write_with)."""
    return atomic_write_with(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_json(path: str | os.PathLike, obj) -> Path:
    """Write `obj` as indented UTF-8 JSON, atomically. NaN/Infinity are refused
    (they are not JSON, and the browser side could not read them)."""
    text = json.dumps(obj, indent=2, ensure_ascii=False, allow_nan=False)
    return atomic_write_bytes(path, (text + "\n").encode("utf-8"))


def atomic_write_safetensors(tensors, path: str | os.PathLike,
                             metadata: dict[str, str] | None = None) -> Path:
    """Write `{name: tensor}` (and str->str `metadata`) as a safetensors file, atomically.
    Streamed to the temp file: no second copy of the tensors in memory."""
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write_with(path, lambda tmp: save_file(
        tensors, tmp, metadata=dict(metadata) if metadata else None))
