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

import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .st import DTYPES, Entry, Planned, Reader, SharedBuffer, atomic_append_writer, atomic_writer
from .sums import CHUNK

Progress = Callable[[int, int], None] | None
Parts = tuple[str, str, Iterable[torch.Tensor]]  # key, dtype code, flat chunks in order
SideParts = tuple[str, torch.Tensor]  # a tensor of the sidecar file (the exact-sum data), whole


def hash_header(h: Any, key: str, dtype: str, shape: Sequence[int]) -> None:
    """What a member id hashes before a tensor's bytes, so a renamed or reshaped tensor changes it."""
    h.update(f"{key}|{dtype}|{list(shape)}|".encode())


def _hash_tensor(h: Any, key: str, dtype: str, shape: Sequence[int], raw: memoryview) -> None:
    hash_header(h, key, dtype, shape)
    h.update(raw)


def _hash_job(job: tuple[Source, ...], read: Future[list[memoryview]]) -> None:
    """On the hasher thread: once ``job`` is read, feed each source's bytes to its digest, in order."""
    for s, raw in zip(job, read.result(), strict=True):
        if s.digest is not None:
            _hash_tensor(s.digest, s.hashed_as or s.key, s.entry.dtype, s.entry.shape, raw)


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

    ``metadata`` is the provisional header (its size plus ``reserve`` bounds the final one).
    """

    outputs: list[Output]
    metadata: dict[str, str]
    reserve: int
    side: Side | None = None


@dataclass(frozen=True)
class Side:
    """A second file written alongside, in step: the soup's exact-sum data (see ``exact.py``).

    Its tensors are hashed into ``digest`` as written; it is renamed into place just before
    the main file, so a crash between the two leaves an unreferenced sidecar, never a soup
    whose sidecar is gone.
    """

    path: os.PathLike
    metadata: dict[str, str]
    reserve: int
    digest: Any


class Combine(Protocol):
    """A merge method: turns one output's tensors (flat, as read) into what is written for it.

    It consumes ``xs`` (with ``acc``, a ``CHUNK``-long work buffer reused for every key) and yields
    one ``Parts`` per planned write of ``out``, then any ``SideParts`` for the plan's side file;
    each is written in full before it resumes, so it may change ``acc`` in place between two of
    them (a side tensor is hashed before the next output is combined).
    """

    acc_dtype: torch.dtype

    def __call__(self, out: Output, acc: torch.Tensor, xs: Iterator[torch.Tensor]) -> Iterable[Parts | SideParts]: ...


@contextmanager
def soup_threads(hashing: bool) -> Iterator[int]:
    """torch's thread count for one soup (restored afterwards): every core, less the one the
    member hashing thread keeps busy while it runs (``hashing``: most of the bytes read are hashed).

    The reader and writer threads mostly wait on the disk (direct reads cost them almost no CPU),
    but sha256 of the members keeps a core busy for the whole of a first soup, and an OpenMP
    region with a thread on that core runs at the pace of its slowest thread. Measured on 2 cores,
    four SD1.5 members, cold, direct reads: a first soup (members hashed) 19.3 s with one torch
    thread, 21.1 s with two; a soup with the ids cached 18.2 s with one, 14.3 s with two.
    """
    before = torch.get_num_threads()
    cores = max(1, os.cpu_count() or 1)
    torch.set_num_threads(max(1, cores - 1) if hashing else cores)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


class _Reads:
    """Every read job of the plan in order, the next one always in flight on the reader thread.

    Three buffer sets rotate through three stages at once: the reader thread fills one job,
    the hasher thread fingerprints the job read before it (member ids), and the consumer
    combines the one before that; a set is refilled only when its job is combined and hashed.
    No buffer is overwritten in use and none is allocated per tensor. (Two sets made the
    consumer wait for each job's hashes: a first soup of four SD1.5 members ran 2.5x slower.)
    """

    DEPTH = 3

    def __init__(self, jobs: Iterable[tuple[Source, ...]], io: ThreadPoolExecutor, hasher: ThreadPoolExecutor):
        self._jobs = iter(jobs)
        self._io, self._hasher = io, hasher
        self._sets: list[list[SharedBuffer]] = [[] for _ in range(self.DEPTH)]
        self._hashed: list[Future | None] = [None] * self.DEPTH  # each set's last hashing task
        self._turn = 0
        self._queue = [q for q in (self._submit() for _ in range(self.DEPTH - 1)) if q is not None]

    def _submit(self) -> tuple[tuple[Source, ...], Future[list[memoryview]]] | None:
        job = next(self._jobs, None)
        if job is None:
            return None
        slot = self._turn
        self._turn = (self._turn + 1) % self.DEPTH
        if self._hashed[slot] is not None:  # the set's previous job must be fingerprinted before it is refilled
            self._hashed[slot].result()
        bufs = self._sets[slot]
        bufs += [SharedBuffer() for _ in range(len(job) - len(bufs))]
        # Grown here, not on the reader thread: glibc handed that thread's large blocks back to the
        # OS after every soup, so the next soup page-faulted them in again (measured 7x the faults).
        for s, b in zip(job, bufs, strict=False):
            b.fit(s.entry.nbytes)
        read = self._io.submit(lambda: [s.reader.raw(s.key, b) for s, b in zip(job, bufs, strict=False)])
        if any(s.digest is not None for s in job):
            self._hashed[slot] = self._hasher.submit(_hash_job, job, read)
        else:
            self._hashed[slot] = None
        return job, read

    @contextmanager
    def job(self) -> Iterator[list[tuple[Source, memoryview]]]:
        """The next job's tensors, valid inside the block; their member hashes run alongside it."""
        assert self._queue, "read past the plan"
        job, fut = self._queue.pop(0)
        raws = fut.result()
        try:
            yield list(zip(job, raws, strict=True))
        finally:
            nxt = self._submit()  # this set is free once its hashes are done: the next read may use it
            if nxt is not None:
                self._queue.append(nxt)

    def drain(self) -> None:
        """Wait for every hash still running (the ids are read right after)."""
        for h in self._hashed:
            if h is not None:
                h.result()

    def tensors(self, out: Output) -> Iterator[torch.Tensor]:
        """``out``'s tensors one by one, flat, as views on the read buffers."""
        for _ in out.reads:
            with self.job() as got:
                for s, raw in got:
                    yield torch.frombuffer(raw, dtype=DTYPES[s.entry.dtype]) if len(raw) else torch.empty(0)


def stream(path: str | os.PathLike, plan: Plan, combine: Combine, seal: Callable[[int | None], dict[str, str]],
        progress: Progress = None) -> None:
    """Stream ``plan`` into ``path`` (atomic). ``seal`` gives the final metadata once every tensor
    is written (member hashes are complete then); raising there, or anywhere, writes nothing."""
    sources = [s for o in plan.outputs for job in o.reads for s in job]
    hashed = sum(s.entry.nbytes for s in sources if s.digest is not None)
    # the hasher keeps a core busy only when it hashes most of what is read (a first soup's members;
    # not a remove, which checks the sidecar's hash: about a fifth of its reads)
    with soup_threads(hashing=2 * hashed > sum(s.entry.nbytes for s in sources)):
        _stream(path, plan, combine, seal, progress)


def _stream(path: str | os.PathLike, plan: Plan, combine: Combine, seal: Callable[[int | None], dict[str, str]],
            progress: Progress) -> None:
    acc = torch.empty(CHUNK, dtype=combine.acc_dtype)  # the combine's chunk-sized work buffer
    planned = [p for o in plan.outputs for p in o.writes]
    # The sidecar's tensors get a hasher of their own: queued behind the members' hashes of the jobs
    # read ahead, the main thread's wait for them (before reusing their buffers) serialised the
    # member hashing with the arithmetic (measured: 37 % of a first soup's time spent waiting there).
    with ThreadPoolExecutor(1) as hasher, ThreadPoolExecutor(1) as side_hasher, ThreadPoolExecutor(1) as io, \
            atomic_writer(path, planned, plan.metadata, plan.reserve) as w, ExitStack() as sides:
        side = sides.enter_context(atomic_append_writer(plan.side.path, plan.side.reserve, plan.side.metadata)) \
            if plan.side else None
        hashed: list[Future] = []
        reads = _Reads((job for o in plan.outputs for job in o.reads), io, hasher)
        for i, out in enumerate(plan.outputs):
            if out.copy:
                with reads.job() as [(_, raw)]:
                    w.write(out.key, raw)
            else:
                for h in hashed:  # the last side tensors may be views on buffers combine reuses
                    h.result()
                hashed.clear()
                for part in combine(out, acc, reads.tensors(out)):
                    if len(part) == 2:
                        key, tensor = part
                        raw = side.write(key, tensor)
                        hashed.append(side_hasher.submit(_hash_tensor, plan.side.digest, key, side.last_dtype,
                                                         tuple(tensor.shape), raw))
                    else:
                        w.write_parts(*part)
            if progress:
                progress(i + 1, len(plan.outputs))
        for h in hashed:
            h.result()
        reads.drain()
        w.set_metadata(seal(side.size if side is not None else None))
        sides.close()  # the sidecar is renamed into place first

