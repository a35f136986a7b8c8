"""File safety: names that cannot leave their folder, and writes that cannot be
seen half done.

Workflows are shared JSON, so a name typed in a node is untrusted: it must stay
inside the folder it names a file in. `safe_join` refuses absolute paths, `..`
and names the file system cannot hold; for writing it also refuses a name that
resolves through a link to outside the folder (a write never follows a link out),
while for reading (`follow_links=True`) links the user placed inside the folder are
followed, as ComfyUI's own loaders do. Every file the pack writes goes through a
temporary file in the same folder and `os.replace`, so a crash or an interrupted
queue leaves either the old file or the new one, never a torn one; the temporary
files a killed write leaves behind are removed the next time that file is written.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path, PurePosixPath, PureWindowsPath

# What a name may hold: each part at most NAME_MAX bytes (what Linux, macOS and Windows
# file systems take), at most MAX_DEPTH folders deep (deeper names are mistakes, and
# creating 2000 nested folders exhausts Python's recursion).
NAME_MAX = 255
MAX_DEPTH = 32
TEMP_SUFFIX = ".tmp"


class UnsafePathError(ValueError):
    """A user-given name would reach outside the folder it is meant for, or cannot be a
    file name at all."""


# --------------------------------------------------------------------------- path safety

def safe_join(root: str | os.PathLike, relative_name: str, *, what: str = "output name",
              example: str = "my_lora/run1.safetensors", follow_links: bool = False) -> Path:
    """`root / relative_name`, refusing any name that leaves `root`: absolute paths
    (POSIX or Windows style), `..` components, parts longer than NAME_MAX bytes or more
    than MAX_DEPTH folders deep, and (unless `follow_links`, for reading) symlinks that
    resolve outside `root`. `example` is a good name shown in the error.

    Sub-folders are fine (`"loras/run1.safetensors"`); the folders need not exist.
    """
    root = Path(root)
    name = str(relative_name)

    def refuse(why: str) -> UnsafePathError:
        return UnsafePathError(
            f"{what} {_shown(name)} leaves the folder {str(root)!r} ({why}); "
            f"give a name relative to {str(root)!r}, such as {example!r}")

    if not name.strip():
        raise UnsafePathError(f"{what} is empty; give a name relative to {str(root)!r}, "
                              f"such as {example!r}")
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
        raise UnsafePathError(f"{what} {_shown(name)} names the folder itself, not a file in it; "
                              f"give a name relative to {str(root)!r}, such as {example!r}")
    _check_name_limits(kept, name, what, example)
    joined = root.joinpath(*kept)
    if not follow_links:
        real_root = root.resolve()
        real_target = joined.resolve()  # follows symlinks, also for parts that exist
        if real_target != real_root and real_root not in real_target.parents:
            raise refuse(f"it resolves through a symlink to {str(real_target)!r}")
    return joined


def _check_name_limits(parts: list[str], name: str, what: str, example: str) -> None:
    if len(parts) > MAX_DEPTH + 1:
        raise UnsafePathError(f"{what} {_shown(name)} is {len(parts) - 1} folders deep; at most "
                              f"{MAX_DEPTH} are allowed. Give a shorter name, such as {example!r}")
    long = next((p for p in parts if len(p.encode("utf-8", "surrogatepass")) > NAME_MAX), None)
    if long is not None:
        raise UnsafePathError(f"{what} {_shown(name)} has a part of "
                              f"{len(long.encode('utf-8', 'surrogatepass'))} bytes "
                              f"({_shown(long)}); file systems take at most {NAME_MAX}. Give a "
                              f"shorter name, such as {example!r}")


def _shown(text: str, limit: int = 80) -> str:
    """repr of a name, cut short: a 100 kB name must not make a 100 kB message."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


def inside_roots(path: str | os.PathLike, roots, *, what: str, follow_links: bool) -> Path:
    """`path` again, if it lies inside one of `roots` the way safe_join would have put it
    there (no `..`, and for writing no link out); else UnsafePathError. For paths that
    travel between nodes: checked again where they are used."""
    path = Path(path)
    for root in roots:
        root = Path(root)
        try:
            relative = path.relative_to(root)
        except ValueError:
            continue
        return safe_join(root, relative.as_posix(), what=what, follow_links=follow_links)
    raise UnsafePathError(f"{what} {_shown(str(path))} is not inside "
                          f"{', '.join(repr(str(r)) for r in roots)}; only files there are read")


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


def temp_path(path: str | os.PathLike) -> Path:
    """A fresh temporary name next to `path`: `.<name>.<16 hex digits>.tmp`, the name cut
    so that the whole stays within NAME_MAX bytes."""
    path = Path(path)
    return path.parent / f".{_temp_stem(path.name)}.{secrets.token_hex(8)}{TEMP_SUFFIX}"


def _temp_stem(name: str) -> str:
    return name.encode("utf-8", "surrogatepass")[:NAME_MAX - 40].decode("utf-8", "ignore")


def remove_leftovers(folder: str | os.PathLike, name: str | None = None) -> None:
    """Remove what killed writes left in `folder`: the temp_path files and folders of
    `name`, or of every name (for folders that one writer owns)."""
    folder = Path(folder)
    stem = r".+" if name is None else re.escape(_temp_stem(name))
    leftover = re.compile(r"\." + stem + r"\.[0-9a-f]{16}" + re.escape(TEMP_SUFFIX))
    try:
        entries = list(folder.iterdir())
    except OSError:
        return
    for entry in entries:
        if leftover.fullmatch(entry.name):
            try:
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
            except OSError:
                pass        # in use (Windows) or gone already: the next write tries again


def atomic_write_with(path: str | os.PathLike, write) -> Path:
    """Write `path` atomically: `write(tmp)` fills a file in a fresh temp folder next to
    `path` (whatever the writer itself puts there stays inside it), which is fsynced and
    renamed over `path` (a crash leaves the old file or none). The parent folder is
    created if missing, and what earlier killed writes of `path` left is removed. The
    file gets the mode of any new file (the umask applies; safetensors would make it
    0600). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(path.parent, path.name)
    work = temp_path(path)
    work.mkdir()
    tmp = work / "data"
    try:
        write(str(tmp))
        os.chmod(tmp, work.stat().st_mode & 0o666)   # a new folder's mode is the umask's
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
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
