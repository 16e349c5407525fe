"""Streaming safetensors reader and writer.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page it touches
counts in the process's resident set until the map is dropped, so streaming N members
through it still shows N models of RSS. This reader parses the header once and reads one
tensor at a time with ``readinto`` into a buffer it reuses; the writer computes every offset
from the planned shapes, writes the header first and then the tensors one by one into a
temporary file that is renamed over the target only when complete. Peak memory is therefore
one tensor per open file, whatever the model size. The byte format is the standard one, so
files interoperate with ``safetensors.torch``.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..atomic import replacing
from ..errors import CompartmentsError
from ..safetensors_header import HeaderError, read_header

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES: dict[torch.dtype, str] = {v: k for k, v in DTYPES.items()}
FLOATS = {"F64", "F32", "F16", "BF16", "F8_E4M3", "F8_E5M2"}


class SafetensorsError(CompartmentsError):
    """The file is not a readable safetensors file."""


def itemsize(dtype: str) -> int:
    return torch.empty((), dtype=DTYPES[dtype]).element_size()


@dataclass(frozen=True)
class Entry:
    """One tensor's place in a file: dtype code (``F16``...), shape, absolute byte range."""

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


ALIGN = 4096  # what direct I/O needs of offsets, lengths and buffer addresses (a page: every device's)
DIRECT_MIN = 1 << 20  # tensors from this size on are read with direct I/O where the file allows it


class SharedBuffer:
    """One read buffer for several readers used in turn (a soup reads members one by one).

    ``data`` starts on an ``ALIGN`` boundary and has ``2 * ALIGN`` bytes of slack, so a tensor can
    be read with direct I/O as the aligned block range around it.
    """

    def __init__(self) -> None:
        self.data = memoryview(bytearray())
        self._base: torch.Tensor | None = None

    def fit(self, nbytes: int) -> None:
        """Grow to at least ``nbytes`` (dropping the old one first: never hold two). Not zero-filled:
        every byte is read into before it is used (a bytearray's zeroing cost 4% of a soup)."""
        if len(self.data) < nbytes + 2 * ALIGN:
            self.data, self._base = memoryview(bytearray()), None
            self._base = torch.empty(nbytes + 3 * ALIGN, dtype=torch.uint8)
            skip = -self._base.data_ptr() % ALIGN
            self.data = memoryview(self._base.numpy())[skip:skip + nbytes + 2 * ALIGN]


class Reader:
    """Random access to one safetensors file, one tensor at a time, without mmap."""

    def __init__(self, path: str | os.PathLike, buffer: SharedBuffer | None = None):
        self.path = Path(path)
        self._shared = buffer or SharedBuffer()
        self._f = open(self.path, "rb")  # noqa: SIM115 - closed in close()
        try:
            self.metadata, raw_entries = read_header(self._f, self.path, set(DTYPES))
        except HeaderError as e:
            self._f.close()
            raise SafetensorsError(str(e)) from None
        except Exception:
            self._f.close()
            raise
        self.entries = {k: Entry(*v) for k, v in raw_entries.items()}
        self._fd = self._f.fileno()
        self._lock = threading.Lock()
        self._direct: int | None = self._open_direct()

    def _open_direct(self) -> int | None:
        """A second descriptor with O_DIRECT, where the OS and filesystem have it (Linux; not tmpfs).

        Why: a buffered read copies every byte through the page cache, and on the 2-core CI machine
        that copy was the largest CPU cost of a soup after the arithmetic (four SD1.5 members read
        cold: 7.4 s and 4.9 s of kernel CPU buffered, 4.2 s and 0.1 s direct). The data is the same.
        """
        flag = getattr(os, "O_DIRECT", 0)
        if not flag or not hasattr(os, "preadv") or os.environ.get("COMPARTMENTS_DIRECT_IO") == "0":
            return None
        try:
            return os.open(self.path, os.O_RDONLY | flag)
        except OSError:
            return None

    def _read_direct(self, key: str, e: Entry, sb: SharedBuffer) -> memoryview | None:
        """The tensor's bytes read as the aligned block range around them; None where direct I/O
        refuses (then it is off for this file and the caller reads buffered)."""
        lo = e.start - e.start % ALIGN
        need = e.end - lo
        span = need + -need % ALIGN
        view = sb.data[:span]
        got = 0
        try:
            while got < need:
                n = os.preadv(self._direct, [view[got:]], lo + got)
                if n == 0:
                    break
                got += n
        except OSError:  # EINVAL: this filesystem or device wants other alignment, or no direct I/O
            os.close(self._direct)
            self._direct = None
            return None
        if got < need:
            raise SafetensorsError(f"{self.path}: tensor '{key}' is truncated "
                                   f"({max(0, got - (e.start - lo))} of {e.nbytes} bytes)")
        return view[e.start - lo:e.start - lo + e.nbytes]

    def keys(self) -> list[str]:
        return list(self.entries)

    def raw(self, key: str, buffer: SharedBuffer | None = None) -> memoryview:
        """The tensor's bytes, in a buffer reused by the next call (copy if you keep it).

        ``buffer`` reads into another buffer than the reader's own (double buffering: one
        thread reads the next member while the current one is being added).
        """
        e = self.entries[key]
        sb = buffer or self._shared
        sb.fit(e.nbytes)
        if self._direct is not None and e.nbytes >= DIRECT_MIN:
            direct = self._read_direct(key, e, sb)
            if direct is not None:
                return direct
        view = memoryview(sb.data)[: e.nbytes]
        got = 0
        if hasattr(os, "preadv"):  # positional: one thread may prefetch while another copies a tensor
            while got < e.nbytes:
                n = os.preadv(self._fd, [view[got:]], e.start + got)
                if n == 0:
                    break
                got += n
        else:  # Windows
            with self._lock:
                self._f.seek(e.start)
                got = self._f.readinto(view)
        if got != e.nbytes:
            raise SafetensorsError(f"{self.path}: tensor '{key}' is truncated ({got} of {e.nbytes} bytes)")
        return view

    def tensor(self, key: str) -> torch.Tensor:
        """The tensor as a view on the reused buffer: valid until the next read from this file."""
        e = self.entries[key]
        if e.nbytes == 0:
            return torch.empty(e.shape, dtype=DTYPES[e.dtype])
        return torch.frombuffer(self.raw(key), dtype=DTYPES[e.dtype]).reshape(e.shape)

    def close(self) -> None:
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        self._f.close()

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class Planned:
    """A tensor the writer will receive later: its key, dtype code and shape."""

    key: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        n = itemsize(self.dtype)
        for s in self.shape:
            n *= s
        return n


class AsyncFile:
    """A file whose writes run on one background thread, in order.

    The page cache throttles a writer once write-back falls behind (here it does: the disk
    also serves the members' reads), and a soup blocked in ``write`` stops combining: measured,
    6.6 of 23 s of a four-member soup. Handing the writes to a thread keeps the arithmetic
    going. ``write`` copies the bytes unless given an ``owner`` that keeps them unchanged until
    written (a freshly made tensor); errors (a full disk) surface at the next call or ``drain``.
    """

    def __init__(self, f, depth: int = 64):
        self._f = f
        self._pool = ThreadPoolExecutor(1)
        self._pending: deque[Future] = deque()
        self._depth = depth

    def write(self, buf, owner: object | None = None) -> None:
        data = buf if owner is not None else bytes(buf)
        self._pending.append(self._pool.submit(_write_all, self._f, data, owner))
        while len(self._pending) > self._depth:
            self._pending.popleft().result()

    def drain(self) -> None:
        while self._pending:
            self._pending.popleft().result()

    def seek(self, *args: int) -> int:
        self.drain()
        return self._f.seek(*args)

    def truncate(self) -> int:
        self.drain()
        return self._f.truncate()

    def close(self) -> None:
        """Wait for (or, after an error, abandon) the queued writes; the file itself stays open."""
        try:
            self.drain()
        finally:
            for f in self._pending:
                f.cancel()
            self._pool.shutdown(wait=True)


def _write_all(f, data, owner: object | None) -> None:
    f.write(data)


def _header(meta: dict[str, str], items: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The safetensors header of ``items`` (key, dtype code, shape, byte count) laid out in order."""
    header: dict[str, object] = {}
    if meta:
        header["__metadata__"] = meta
    off = 0
    for key, dtype, shape, nbytes in items:
        header[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    return json.dumps(header, separators=(",", ":")).encode()


class Writer:
    """Writes a planned list of tensors in order; the header goes first with computed offsets.

    Metadata known only at the end (content hashes) is written by :meth:`finish` into the
    header, padded with spaces to the length reserved at the start.
    """

    def __init__(self, f, plan: list[Planned], metadata: dict[str, str] | None = None, reserve: int = 0):
        self._f = f
        self._plan = plan
        self._meta = {str(k): str(v) for k, v in (metadata or {}).items()}
        self._actual: list[tuple[str, str, tuple[int, ...], int]] = []
        self._i = 0
        self._meta_changed = False
        blob = self._header([(p.key, p.dtype, p.shape, p.nbytes) for p in plan])
        blob += b" " * reserve  # room for metadata only known at the end (content hashes)
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        self._reserved = len(blob)
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)

    def _header(self, items: list[tuple[str, str, tuple[int, ...], int]]) -> bytes:
        return _header(self._meta, items)

    def set_metadata(self, metadata: dict[str, str]) -> None:
        """Replace the metadata; written by :meth:`finish` into the reserved header space."""
        self._meta = {str(k): str(v) for k, v in metadata.items()}
        self._meta_changed = True

    @property
    def next_key(self) -> str | None:
        return self._plan[self._i].key if self._i < len(self._plan) else None

    def write(self, key: str, data: torch.Tensor | memoryview | bytes) -> None:
        """Write the next planned tensor (a tensor of the planned dtype/shape, or its raw bytes)."""
        if self._i >= len(self._plan):
            raise RuntimeError(f"writer: '{key}' was not planned")
        p = self._plan[self._i]
        if key != p.key:
            raise RuntimeError(f"writer: expected '{p.key}' next, got '{key}'")
        dtype = p.dtype
        if isinstance(data, torch.Tensor):
            dtype = NAMES.get(data.dtype, "?")
            if dtype != p.dtype or tuple(data.shape) != p.shape:
                raise RuntimeError(f"writer: '{key}' planned {p.dtype}{list(p.shape)}, got {data.dtype}{list(data.shape)}")
            t = data.detach().contiguous().cpu()
            # reshape(-1): a 0-d tensor (SDXL's logit_scale) cannot be viewed as bytes of another size
            buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        else:
            buf = memoryview(data).cast("B")
        expect = p.nbytes
        if buf.nbytes != expect:
            raise RuntimeError(f"writer: '{key}' has {buf.nbytes} bytes, planned {expect}")
        self._f.write(buf)
        self._actual.append((p.key, dtype, p.shape, buf.nbytes))
        self._i += 1

    def write_parts(self, key: str, dtype: str, parts: Iterable[torch.Tensor]) -> None:
        """Write the next planned tensor from contiguous pieces (chunks of its flat data, in order).

        Lets the engine convert and write a float64 accumulator chunk by chunk, so no second
        full-size tensor (the float32 sum, the fp16 output) is ever materialised.
        """
        if self._i >= len(self._plan):
            raise RuntimeError(f"writer: '{key}' was not planned")
        p = self._plan[self._i]
        if key != p.key:
            raise RuntimeError(f"writer: expected '{p.key}' next, got '{key}'")
        if dtype != p.dtype:
            raise RuntimeError(f"writer: '{key}' planned {p.dtype}, got {dtype}")
        expect = p.nbytes
        n = 0
        for t in parts:
            if NAMES.get(t.dtype) != dtype:
                raise RuntimeError(f"writer: a part of '{key}' is {t.dtype}, not {dtype}")
            if t.numel():
                t = t.contiguous()
                buf = memoryview(t.view(torch.uint8).numpy())
                if isinstance(self._f, AsyncFile):  # a fresh tensor is handed over; a view (of a reused buffer) copied
                    self._f.write(buf, t if t._base is None else None)
                else:
                    self._f.write(buf)
                n += buf.nbytes
        if n != expect:
            raise RuntimeError(f"writer: '{key}' got {n} bytes, planned {expect}")
        self._actual.append((p.key, dtype, p.shape, n))
        self._i += 1

    def finish(self) -> None:
        if self._i != len(self._plan):
            raise RuntimeError(f"writer: {len(self._plan) - self._i} planned tensors were never written")
        if self._meta_changed:
            blob = self._header(self._actual)
            if len(blob) > self._reserved:
                raise RuntimeError("writer: final header outgrew its reserved space")
            blob += b" " * (self._reserved - len(blob))
            self._f.seek(8)
            self._f.write(blob)
            self._f.seek(0, os.SEEK_END)
            self._f.truncate()


@contextmanager
def atomic_writer(path: str | os.PathLike, plan: list[Planned], metadata: dict[str, str] | None = None,
                  reserve: int = 0) -> Iterator[Writer]:
    """A :class:`Writer` on ``<dir>/.<name>.<pid>.partial``, renamed over ``path`` on success.

    Any exception (a Cancel from the UI included) removes the partial file, so an interrupted
    soup never leaves a half-written model, and an existing target stays as it was.
    The data is fsynced before the rename (a power cut cannot lose a file that replaced another;
    skipping it for scratch soups was measured no faster on the benchmark machine).
    """
    with replacing(path, suffix=".partial") as tmp, open(tmp, "wb") as raw:
        f = AsyncFile(raw)
        try:
            w = Writer(f, plan, metadata, reserve)
            yield w
            w.finish()
        finally:
            f.close()


def copy_file_stream(src: Reader, keys: Iterable[str], write: Callable[[str, memoryview], None]) -> None:
    """Pass tensors through byte-for-byte (components taken from the base, untouched)."""
    for k in keys:
        write(k, src.raw(k))


class AppendWriter:
    """Tensors written one after another, each shape known only when it is written.

    The exact-sum sidecar is such a file: how many exceptions a tensor has is known once it is
    encoded. The header goes last, into space reserved at the start (``reserve`` bytes, padded
    with spaces as the format allows), so the data still streams straight to disk.
    """

    def __init__(self, f, reserve: int, metadata: dict[str, str]):
        self._f = f
        self._meta = dict(metadata)
        self._items: list[tuple[str, str, tuple[int, ...], int]] = []
        self._reserved = reserve + (-reserve % 8)
        f.write(struct.pack("<Q", self._reserved))
        f.write(b" " * self._reserved)

    @property
    def size(self) -> int:
        """The file's size once finished."""
        return 8 + self._reserved + sum(i[3] for i in self._items)

    def write(self, key: str, data: torch.Tensor) -> memoryview:
        """Append one tensor; returns its bytes (a view: valid while ``data`` is unchanged)."""
        t = data.detach().contiguous().cpu()
        buf = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else memoryview(b"")
        self._f.write(buf)
        self._items.append((key, NAMES[t.dtype], tuple(t.shape), buf.nbytes))
        return buf

    @property
    def last_dtype(self) -> str:
        return self._items[-1][1]

    def finish(self) -> None:
        blob = _header(self._meta, self._items)
        if len(blob) > self._reserved:
            raise RuntimeError("writer: the sidecar header outgrew its reserved space")
        self._f.seek(8)
        self._f.write(blob + b" " * (self._reserved - len(blob)))
        self._f.seek(0, os.SEEK_END)


@contextmanager
def atomic_append_writer(path: str | os.PathLike, reserve: int, metadata: dict[str, str]) -> Iterator[AppendWriter]:
    """An :class:`AppendWriter` on a temporary file renamed over ``path`` on success (see atomic_writer)."""
    with replacing(path, suffix=".partial") as tmp, open(tmp, "wb") as raw:
        f = AsyncFile(raw)
        try:
            w = AppendWriter(f, reserve, metadata)
            yield w
            w.finish()
        finally:
            f.close()
