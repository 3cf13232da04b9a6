"""Atomic, durable writes of files and directories.

A file is written to a temporary sibling, flushed and fsynced, renamed over the destination, and its folder is
fsynced so that the rename itself survives a crash. A directory (an export, a data set, a checkpoint) is built
under a temporary sibling name, every file and folder in it is fsynced, and it is renamed into place; an existing
directory there is replaced only once the new one is complete.

Temporaries are created with the ordinary modes (0666/0777 before the umask), so outputs get the same
permissions as any file the user writes (0644/0755 under umask 022), not mkstemp's owner-only 0600/0700.
Their names end in `.tmp` (files and directories being written) or `.old` (a directory being replaced), which
`remove_stale_temporaries` recognises after an interrupted run.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<token>[0-9a-f]{8})(?P<suffix>\.tmp|\.old)$")


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{suffix}")


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of a directory (a rename into it, a new file) durable."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a directory; the data is still fsynced
        pass
    finally:
        os.close(fd)


def fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask (Python can only read it by setting it: done under no other thread's use of it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_tree(root: str | os.PathLike) -> None:
    """fsync every file under `root`, then every folder, deepest first. Files that a library wrote owner-only
    (safetensors and mkstemp-based writers do) get the permissions the umask gives an ordinary file."""
    ordinary = 0o666 & ~current_umask()
    for folder, _, files in os.walk(root, topdown=False):
        for name in files:
            path = os.path.join(folder, name)
            mode = os.stat(path).st_mode & 0o777
            if mode | ordinary != mode:
                os.chmod(path, mode | ordinary)
            fsync_file(path)
        fsync_dir(folder)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_SUFFIX)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)  # the umask applies, as for open()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=indent, sort_keys=False) + "\n")


def replace_directory(src: Path, dst: Path) -> None:
    """Rename the finished directory `src` to `dst`; an existing `dst` is moved aside first and removed after.
    Between the two renames `dst` is absent; `remove_stale_temporaries` puts the old one back if a crash hits
    exactly there."""
    src, dst = Path(src), Path(dst)
    if dst.exists():
        old = _sibling(dst, OLD_SUFFIX)
        dst.rename(old)
        src.rename(dst)
        fsync_dir(dst.parent)
        shutil.rmtree(old)
    else:
        src.rename(dst)
        fsync_dir(dst.parent)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_directory(out) as tmp:` write into `tmp`; on success it is fsynced and becomes `out`, on any
    error (or interrupt) it is removed and `out` is untouched. A file at `out` is refused before anything is written
    (only a folder is replaced)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{path} is a file, not a folder: refusing to replace it with one")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _sibling(path, TMP_SUFFIX)
    os.mkdir(tmp, 0o777)  # the umask applies, as for mkdir
    try:
        yield tmp
        fsync_tree(tmp)
        replace_directory(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Clean up after an interrupted write in `folder`: temporaries (`.<name>.<hex>.tmp`) are removed; a directory
    moved aside for replacement (`.<name>.<hex>.old`) is put back when `<name>` is missing, else removed.
    Returns the paths removed or restored."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    touched = []
    for entry in sorted(folder.iterdir()):
        match = _TEMPORARY.match(entry.name)
        if match is None:
            continue
        target = folder / match["name"]
        if match["suffix"] == OLD_SUFFIX and not target.exists():
            entry.rename(target)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        touched.append(entry)
    if touched:
        fsync_dir(folder)
    return touched
