"""Atomic file writes: the one temp-file-then-rename used by every room and node.

A reader (ComfyUI's loader, another process, a crash recovery) sees either the old file or
the whole new one, never a half-written model, store index or workflow.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """Is process ``pid`` running? (A pid we may not signal belongs to a live process.)"""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def sweep_stale(folder: str | os.PathLike, suffix: str) -> list[Path]:
    """Remove ``.<name>.<pid><suffix>`` files or folders in ``folder`` left by processes that died
    (a kill -9 mid-write); a live process's, and anything not named so, is left alone."""
    pattern = re.compile(r"^\..+\.(\d+)" + re.escape(suffix) + "$")
    removed = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    for entry in entries:
        m = pattern.match(entry.name)
        if not m or int(m.group(1)) == os.getpid() or pid_alive(int(m.group(1))):
            continue
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """Yield ``<dir>/.<name>.<pid><suffix>``; when the block succeeds, rename it over ``path``.

    Any exception (a Cancel from the UI included) removes the temporary file and leaves
    ``path`` as it was. With ``fsync`` the data reaches the disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(path.parent, suffix)  # what a killed earlier write left beside it
    tmp = path.with_name(f".{path.name}.{os.getpid()}{suffix}")
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    """Give ``dst`` the contents of ``src``: a hard link where both are on one filesystem (instant,
    no second copy on disk), else a copy.

    Safe for files that are only ever replaced by rename, never written in place (every file this
    pack writes): a later rewrite of either name gets a new inode and leaves the other as it was.
    """
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, no hard links there (FAT, some network mounts), a quota
        shutil.copyfile(src, dst)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())
