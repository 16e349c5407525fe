"""Atomic file writes: the one temp-file-then-rename used by every room and node.

A reader (ComfyUI's loader, another process, a crash recovery) sees either the old file or
the whole new one, never a half-written model, store index or workflow.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike, suffix: str = ".tmp", fsync: bool = True) -> Iterator[Path]:
    """Yield ``<dir>/.<name>.<pid><suffix>``; when the block succeeds, rename it over ``path``.

    Any exception (a Cancel from the UI included) removes the temporary file and leaves
    ``path`` as it was. With ``fsync`` the data reaches the disk before the rename.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
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


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with replacing(path) as tmp:
        tmp.write_bytes(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode())
