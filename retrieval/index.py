"""Vector indexes behind one small protocol, so the store never depends on a backend.

The image store builds its index from ``vectors.f32`` on open (``backend(dim)``, then ``add``)
and talks to it only through :class:`VectorIndex` (add, remove, search); the vectors persist in
the slot file, never in an index file. :class:`FaissIndex` is the shipped backend: faiss ``IndexFlatIP`` on
L2-normalised vectors, so the inner product is the cosine similarity and search is exact. The
ids are the SQLite row ids of the store, which is what lets "forget" delete exactly one
vector. :class:`NumpyIndex` is the brute-force reference the tests and the benchmark compare
faiss against. A store that outgrows one machine implements the same three methods over a
server-side engine (docs/retrieval.md).
"""

from __future__ import annotations

import heapq
from collections.abc import Callable
from typing import Protocol, runtime_checkable

import numpy as np


@runtime_checkable
class VectorIndex(Protocol):
    """What the store needs from a k-nearest-neighbour index over unit vectors (built empty
    from ``dim``: see :data:`BACKENDS`)."""

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        """Insert ``vectors`` [n, dim] float32 under int64 ``ids`` (ids unique, never reused)."""

    def remove(self, ids: np.ndarray) -> int:
        """Delete the vectors with these ids; return how many were removed."""

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` by inner product: (scores [q, k] float32, ids [q, k] int64, -1 = no hit).

        ``allowed`` restricts the candidates to those ids (the visibility filter).
        """


def _as_vectors(vectors: np.ndarray, dim: int) -> np.ndarray:
    v = np.ascontiguousarray(np.asarray(vectors, dtype=np.float32))
    if v.ndim != 2 or v.shape[1] != dim:
        raise ValueError(f"expected vectors of shape [n, {dim}], got {tuple(v.shape)}")
    return v


def _as_ids(ids: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(np.asarray(ids, dtype=np.int64).reshape(-1))


class FaissIndex:
    """Exact cosine kNN over unit vectors: a faiss ``IndexFlatIP`` whose rows are reusable slots.

    ``remove`` does not compact the matrix (``IndexIDMap.remove_ids`` moves every later row:
    O(n)). It zeroes the removed rows in place, so the vectors are gone from memory too, and
    puts their positions on a free list that the next ``add`` fills first. Searches exclude
    free positions with a faiss ``IDSelector`` and map positions back to the store's ids.
    ``remove`` of k ids costs O(k * dim), whatever the size of the index.
    """

    def __init__(self, dim: int):
        import faiss

        self.dim = int(dim)
        self._faiss = faiss
        self.index = faiss.IndexFlatIP(self.dim)
        self._pos_ids = np.zeros((0,), dtype=np.int64)  # position -> id, -1 = free
        self._pos_of: dict[int, int] = {}  # id -> position
        self._free: list[int] = []  # free positions, a min-heap

    def __len__(self) -> int:
        return len(self._pos_of)

    def _rows(self) -> np.ndarray:
        """The flat index's matrix as a writable numpy view (no copy)."""
        n = int(self.index.ntotal)
        if n == 0:
            return np.zeros((0, self.dim), dtype=np.float32)
        return self._faiss.rev_swig_ptr(self.index.get_xb(), n * self.dim).reshape(n, self.dim)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        v, i = _as_vectors(vectors, self.dim), _as_ids(ids)
        if len(i) != len(v):
            raise ValueError(f"{len(i)} ids for {len(v)} vectors")
        if not len(i):
            return
        if len(set(i.tolist())) != len(i) or any(x in self._pos_of for x in i.tolist()):
            raise ValueError("ids must be unique and not already in the index")
        reuse = [heapq.heappop(self._free) for _ in range(min(len(self._free), len(i)))]
        if reuse:
            self._rows()[reuse] = v[:len(reuse)]
            self._pos_ids[reuse] = i[:len(reuse)]
        start, rest = int(self.index.ntotal), v[len(reuse):]
        if len(rest):
            self.index.add(rest)
            self._pos_ids = np.concatenate([self._pos_ids, i[len(reuse):]])
        self._pos_of.update(zip(i.tolist(), reuse + list(range(start, start + len(rest))), strict=True))

    def remove(self, ids: np.ndarray) -> int:
        gone = [self._pos_of.pop(x) for x in dict.fromkeys(_as_ids(ids).tolist()) if x in self._pos_of]
        if gone:
            self._rows()[gone] = 0.0
            self._pos_ids[gone] = -1
            for p in gone:
                heapq.heappush(self._free, p)
        return len(gone)

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = _as_vectors(queries, self.dim)
        if k < 1:
            raise ValueError("k must be at least 1")
        faiss = self._faiss
        sel: list = []  # the selectors must outlive the search call
        if allowed is not None:
            pos = [self._pos_of[x] for x in _as_ids(allowed).tolist() if x in self._pos_of]
            if pos:
                sel.append(faiss.IDSelectorBatch(np.asarray(pos, dtype=np.int64)))
        elif self._free:
            sel.append(faiss.IDSelectorBatch(np.asarray(self._free, dtype=np.int64)))
            sel.append(faiss.IDSelectorNot(sel[0]))
        if not self._pos_of or (allowed is not None and not sel):
            return (np.full((len(q), k), -np.finfo(np.float32).max, dtype=np.float32),
                    np.full((len(q), k), -1, dtype=np.int64))
        params = faiss.SearchParameters(sel=sel[-1]) if sel else None
        scores, pos = self.index.search(q, int(k), params=params)
        labels = np.where(pos >= 0, self._pos_ids[np.maximum(pos, 0)], -1)
        return scores.astype(np.float32), labels.astype(np.int64)

    def ids(self) -> np.ndarray:
        return np.fromiter(self._pos_of, dtype=np.int64, count=len(self._pos_of))


class NumpyIndex:
    """Brute-force reference: a dense matrix and a matmul. Exact, O(n) per query, no deps."""

    def __init__(self, dim: int):
        self.dim = int(dim)
        self._ids = np.zeros((0,), dtype=np.int64)
        self._vecs = np.zeros((0, self.dim), dtype=np.float32)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        v, i = _as_vectors(vectors, self.dim), _as_ids(ids)
        if len(i) != len(v):
            raise ValueError(f"{len(i)} ids for {len(v)} vectors")
        self._ids = np.concatenate([self._ids, i])
        self._vecs = np.concatenate([self._vecs, v])

    def remove(self, ids: np.ndarray) -> int:
        keep = ~np.isin(self._ids, _as_ids(ids))
        removed = int((~keep).sum())
        self._ids, self._vecs = self._ids[keep], self._vecs[keep]
        return removed

    def search(self, queries: np.ndarray, k: int, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        q = _as_vectors(queries, self.dim)
        if k < 1:
            raise ValueError("k must be at least 1")
        ids, vecs = self._ids, self._vecs
        if allowed is not None:
            mask = np.isin(ids, _as_ids(allowed))
            ids, vecs = ids[mask], vecs[mask]
        scores = q @ vecs.T
        out_s = np.full((len(q), k), -np.inf, dtype=np.float32)
        out_i = np.full((len(q), k), -1, dtype=np.int64)
        n = min(k, len(ids))
        if n:
            top = np.argpartition(-scores, n - 1, axis=1)[:, :n] if n < len(ids) else np.tile(np.arange(len(ids)), (len(q), 1))
            top_s = np.take_along_axis(scores, top, axis=1)
            order = np.argsort(-top_s, axis=1, kind="stable")
            out_s[:, :n] = np.take_along_axis(top_s, order, axis=1)
            out_i[:, :n] = ids[np.take_along_axis(top, order, axis=1)]
        return out_s, out_i

    def ids(self) -> np.ndarray:
        return self._ids.copy()


BACKENDS: dict[str, Callable[[int], VectorIndex]] = {"faiss": FaissIndex, "numpy": NumpyIndex}
"""The index a store's config names (``backend``), made empty for its ``dim``."""
