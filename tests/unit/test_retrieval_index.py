"""Tier 1: the VectorIndex backends (faiss and the brute-force numpy reference)."""

from __future__ import annotations

import numpy as np
import pytest

from compartments.retrieval.index import FaissIndex, NumpyIndex, VectorIndex


def _unit(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


@pytest.mark.parametrize("cls", [FaissIndex, NumpyIndex])
def test_backends_follow_the_protocol(cls):
    assert isinstance(cls(8), VectorIndex)


def test_faiss_matches_brute_force_with_and_without_filter():
    vecs, ids = _unit(500, 32, 0), np.arange(10, 510, dtype=np.int64)
    q = _unit(7, 32, 1)
    f, n = FaissIndex(32), NumpyIndex(32)
    f.add(ids, vecs)
    n.add(ids, vecs)
    fs, fi = f.search(q, 5)
    ns, ni = n.search(q, 5)
    np.testing.assert_array_equal(fi, ni)
    np.testing.assert_allclose(fs, ns, atol=1e-5)
    exact = np.sort(q @ vecs.T, axis=1)[:, ::-1][:, :5]
    np.testing.assert_allclose(fs, exact, atol=1e-5)
    allowed = ids[::3]
    fs, fi = f.search(q, 4, allowed)
    ns, ni = n.search(q, 4, allowed)
    np.testing.assert_array_equal(fi, ni)
    assert np.isin(fi, allowed).all()


@pytest.mark.parametrize("cls", [FaissIndex, NumpyIndex])
def test_removed_ids_are_never_returned(cls):
    vecs, ids = _unit(50, 16, 2), np.arange(1, 51, dtype=np.int64)
    idx = cls(16)
    idx.add(ids, vecs)
    gone = np.array([3, 17, 40], dtype=np.int64)
    assert idx.remove(gone) == 3
    assert idx.remove(gone) == 0
    assert len(idx) == 47 and not np.isin(gone, idx.ids()).any()
    # querying with the removed vectors themselves, for every k, never returns them
    _, found = idx.search(vecs[gone - 1], 47)
    assert not np.isin(gone, found).any()


@pytest.mark.parametrize("cls", [FaissIndex, NumpyIndex])
def test_k_beyond_size_pads_and_bad_shapes_raise(cls):
    idx = cls(4)
    idx.add(np.array([5, 6]), _unit(2, 4, 3))
    scores, found = idx.search(_unit(1, 4, 4), 4)
    assert found[0, 2:].tolist() == [-1, -1] and sorted(found[0, :2].tolist()) == [5, 6]
    with pytest.raises(ValueError):
        idx.add(np.array([1]), np.zeros((1, 5), dtype=np.float32))
    with pytest.raises(ValueError):
        idx.search(_unit(1, 4, 5), 0)


def test_faiss_remove_zeroes_in_place_and_add_reuses_the_position():
    vecs, ids = _unit(300, 16, 6), np.arange(1, 301, dtype=np.int64)
    f, n = FaissIndex(16), NumpyIndex(16)
    f.add(ids, vecs)
    n.add(ids, vecs)
    rows_before = f.index.ntotal
    assert f.remove(np.array([7, 150])) == 2 and n.remove(np.array([7, 150])) == 2
    assert not f._rows()[[6, 149]].any()  # the removed vectors' bytes are gone from memory
    q = _unit(5, 16, 7)
    np.testing.assert_array_equal(f.search(q, 298)[1], n.search(q, 298)[1])  # free rows never returned
    new = _unit(3, 16, 8)
    f.add(np.array([400, 401, 402]), new)
    n.add(np.array([400, 401, 402]), new)
    assert f.index.ntotal == rows_before + 1  # two freed rows reused, one appended
    np.testing.assert_array_equal(f.search(q, 10)[1], n.search(q, 10)[1])
    np.testing.assert_array_equal(f.search(q, 4, ids[::2])[1], n.search(q, 4, ids[::2])[1])
