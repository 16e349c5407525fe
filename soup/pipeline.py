"""The soup's streaming executor: reads, hashes and writes a plan, one output tensor at a time.

Build, add and remove differ only in *what* they combine (see ``engine.py``); *how* tensors
move is here, once: the write plan and the atomic file, a reader thread that fetches the next
tensors while the current ones are combined, a hashing thread that fingerprints members
while the arithmetic runs (both drop the GIL), two alternating read buffers reused for every
tensor (positional reads, so the reader thread never races another), one accumulator sized
for the largest tensor, and torch's thread count. Memory is that accumulator plus two read
buffers per tensor of a read job, however large or many the checkpoints are.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, ParamSpec, Protocol, TypeVar

import torch

from .st import DTYPES, Entry, Planned, Reader, SharedBuffer, atomic_writer

Progress = Callable[[int, int], None] | None
Parts = tuple[str, str, Iterable[torch.Tensor]]  # key, dtype code, flat chunks in order
P = ParamSpec("P")
R = TypeVar("R")


def hash_header(h: Any, key: str, dtype: str, shape: Sequence[int]) -> None:
    """What a member id hashes before a tensor's bytes, so a renamed or reshaped tensor changes it."""
    h.update(f"{key}|{dtype}|{list(shape)}|".encode())


@dataclass(frozen=True)
class Source:
    """One tensor to read: ``key`` of ``reader``; with ``digest``, also hashed into that member id,
    under the name ``hashed_as`` (default ``key``: see ``layout.KeyLayout.canonical``)."""

    reader: Reader
    key: str
    digest: Any = None  # a hashlib object, fed hash_header + bytes
    hashed_as: str | None = None

    @property
    def entry(self) -> Entry:
        return self.reader.entries[self.key]


@dataclass(frozen=True)
class Output:
    """One key of the new file: what it is read from and what the writer receives for it.

    ``reads`` are I/O jobs in the order the combine consumes them; the tensors of one job
    are fetched together (add/remove: the soup's sum and the shard's tensor). ``writes`` is
    what the combine emits, in order. A copy passes its one source's bytes through.
    """

    key: str
    reads: tuple[tuple[Source, ...], ...]
    writes: tuple[Planned, ...]
    copy: bool = False

    @classmethod
    def copied(cls, source: Source) -> Output:
        e = source.entry
        return cls(source.key, ((source,),), (Planned(source.key, e.dtype, e.shape),), copy=True)

    @property
    def numel(self) -> int:
        return math.prod(self.writes[-1].shape)


@dataclass(frozen=True)
class Plan:
    """The whole output file: its tensors in order and the header written before them.

    ``metadata`` is the provisional header (its size plus ``reserve`` bounds the final one);
    ``shrink`` names planned float64 tensors that may arrive as float32.
    """

    outputs: list[Output]
    metadata: dict[str, str]
    reserve: int
    shrink: frozenset[str] = frozenset()


class Combine(Protocol):
    """A merge method: turns one output's tensors (flat, as read) into what is written for it.

    It consumes ``xs`` into ``acc`` (flat, ``out.numel`` long, reused for every key) and yields
    one ``Parts`` per planned write of ``out``; each is written in full before it resumes, so
    it may change ``acc`` in place between two of them.
    """

    acc_dtype: torch.dtype

    def __call__(self, out: Output, acc: torch.Tensor, xs: Iterator[torch.Tensor]) -> Iterable[Parts]: ...


def soup_threads(fn: Callable[P, R]) -> Callable[P, R]:
    """Run ``fn`` with torch using the cores the reader and hasher threads leave free.

    The soup keeps one thread reading the next member and one hashing; giving torch every
    core as well made the float64 accumulation several times slower on small machines
    (measured: 0.46 -> 0.33 GiB/s on 2 cores). torch's setting is restored afterwards.
    """

    @functools.wraps(fn)
    def limited(*args: P.args, **kwargs: P.kwargs) -> R:
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, min(before, (os.cpu_count() or 1) - 2)))
        try:
            return fn(*args, **kwargs)
        finally:
            torch.set_num_threads(before)

    return limited


class _Reads:
    """Every read job of the plan in order, the next one always in flight on the reader thread.

    Two buffer sets alternate: the consumer holds one job's tensors while the other set fills,
    so no buffer is overwritten in use and none is allocated per tensor.
    """

    def __init__(self, jobs: Iterable[tuple[Source, ...]], io: ThreadPoolExecutor, hasher: ThreadPoolExecutor):
        self._jobs = iter(jobs)
        self._io, self._hasher = io, hasher
        self._sets: tuple[list[SharedBuffer], list[SharedBuffer]] = ([], [])
        self._turn = 0
        self._next = self._submit()

    def _submit(self) -> tuple[tuple[Source, ...], Future[list[memoryview]]] | None:
        job = next(self._jobs, None)
        if job is None:
            return None
        bufs = self._sets[self._turn]
        self._turn ^= 1
        bufs += [SharedBuffer() for _ in range(len(job) - len(bufs))]
        # Grown here, not on the reader thread: glibc handed that thread's large blocks back to the
        # OS after every soup, so the next soup page-faulted them in again (measured 7x the faults).
        for s, b in zip(job, bufs, strict=False):
            b.fit(s.entry.nbytes)
        return job, self._io.submit(lambda: [s.reader.raw(s.key, b) for s, b in zip(job, bufs, strict=False)])

    @contextmanager
    def job(self) -> Iterator[list[tuple[Source, memoryview]]]:
        """The next job's tensors, valid inside the block; their member hashes run alongside it."""
        assert self._next is not None, "read past the plan"
        job, fut = self._next
        raws = fut.result()
        self._next = self._submit()  # the next tensors load while these are used
        hashing = []
        for s, raw in zip(job, raws, strict=True):
            if s.digest is not None:
                hash_header(s.digest, s.hashed_as or s.key, s.entry.dtype, s.entry.shape)
                hashing.append(self._hasher.submit(s.digest.update, raw))
        try:
            yield list(zip(job, raws, strict=True))
        finally:
            for h in hashing:  # before the buffer is refilled
                h.result()

    def tensors(self, out: Output) -> Iterator[torch.Tensor]:
        """``out``'s tensors one by one, flat, as views on the read buffers."""
        for _ in out.reads:
            with self.job() as got:
                for s, raw in got:
                    yield torch.frombuffer(raw, dtype=DTYPES[s.entry.dtype]) if len(raw) else torch.empty(0)


@soup_threads
def stream(path: str | os.PathLike, plan: Plan, combine: Combine, seal: Callable[[], dict[str, str]],
        progress: Progress = None) -> None:
    """Stream ``plan`` into ``path`` (atomic). ``seal`` gives the final metadata once every tensor
    is written (member hashes are complete then); raising there, or anywhere, writes nothing."""
    acc = torch.empty(max(o.numel for o in plan.outputs if not o.copy), dtype=combine.acc_dtype)
    planned = [p for o in plan.outputs for p in o.writes]
    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as io, \
            atomic_writer(path, planned, plan.metadata, plan.shrink, plan.reserve) as w:
        reads = _Reads((job for o in plan.outputs for job in o.reads), io, hasher)
        for i, out in enumerate(plan.outputs):
            if out.copy:
                with reads.job() as [(_, raw)]:
                    w.write(out.key, raw)
            else:
                for key, dtype, parts in combine(out, acc[: out.numel], reads.tensors(out)):
                    w.write_parts(key, dtype, parts)
            if progress:
                progress(i + 1, len(plan.outputs))
        w.set_metadata(seal())

