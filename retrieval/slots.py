"""The vector file of the SQLite + faiss store backend (``vectors.f32``): fixed-size slots.

A row in ``meta.sqlite`` names its vector's slot; the slot file holds the bytes. Kept out of
:mod:`.store` because it is all of that backend's vector I/O: a server-side backend (pgvector)
keeps vectors in its database and has no slot file.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np


class SlotFile:
    """Vectors on disk in fixed-size slots: slot ``s`` is ``dim`` float32 at byte ``s * dim * 4``.

    Writing or zeroing one slot touches ``dim * 4`` bytes in place and never moves another
    slot, which is what makes forget O(1) in I/O. Every write is followed by an fsync.
    """

    def __init__(self, path: Path, dim: int) -> None:
        self.path, self.dim, self.row = Path(path), int(dim), int(dim) * 4
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

    def __len__(self) -> int:
        return os.fstat(self.fd).st_size // self.row

    def read_all(self) -> np.ndarray:
        """Every slot as a read-only memory map [slots, dim] (empty file: a [0, dim] array)."""
        n = len(self)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.memmap(self.path, dtype=np.float32, mode="r", shape=(n, self.dim))

    def read(self, slots: Sequence[int]) -> np.ndarray:
        """These slots [n, dim]; one past the end of the file reads as zeros (a lost vector)."""
        out = np.zeros((len(slots), self.dim), dtype=np.float32)
        for j, s in enumerate(slots):
            data = os.pread(self.fd, self.row, int(s) * self.row)
            if len(data) == self.row:
                out[j] = np.frombuffer(data, dtype=np.float32)
        return out

    def _pwrite_all(self, data: bytes, offset: int) -> None:
        """``pwrite`` may write less than asked: loop until all of it is written."""
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view, offset = view[n:], offset + n

    def _put(self, slots: Sequence[int], data: Callable[[int, int], bytes]) -> None:
        """``data(j, e)`` into slots[j:e] for each run of consecutive slots, then one fsync."""
        j = 0
        while j < len(slots):
            e = j + 1
            while e < len(slots) and slots[e] == slots[e - 1] + 1:
                e += 1
            self._pwrite_all(data(j, e), int(slots[j]) * self.row)
            j = e
        os.fsync(self.fd)

    def write(self, slots: Sequence[int], vectors: np.ndarray) -> None:
        """Write ``vectors[j]`` into ``slots[j]``, then fsync."""
        v = np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(slots), self.dim)
        self._put(list(slots), lambda j, e: v[j:e].tobytes())

    def zero(self, slots: Sequence[int]) -> None:
        """Overwrite these slots with zeros in place, then fsync (the vector's bytes are gone)."""
        if len(slots):
            self._put(list(slots), lambda j, e: bytes((e - j) * self.row))

    def truncate(self, slots: int) -> None:
        """Cut the file to its first ``slots`` slots (a free tail), then fsync."""
        os.ftruncate(self.fd, int(slots) * self.row)
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> SlotFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
