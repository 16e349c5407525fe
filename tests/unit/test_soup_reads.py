"""Tier 1: the soup's reader gives the same bytes with direct I/O as buffered, whatever the offsets."""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import save_file

from compartments.soup import st


@pytest.fixture
def odd_file(tmp_path):
    """Tensors at offsets no block boundary matches: a 3-byte tensor first, sizes not multiples
    of a block, the largest one last so that it ends where the file does."""
    gen = torch.Generator().manual_seed(0)
    tensors = {"a.tiny": torch.tensor([1, 2, 3], dtype=torch.uint8),
               "b.half": torch.randn(700_001, generator=gen).half(),
               "c.float": torch.randn(300_007, generator=gen),
               "z.last": torch.randn(1_000_003, generator=gen).bfloat16()}
    path = tmp_path / "odd.safetensors"
    save_file(tensors, str(path))
    return path, tensors


def _all(path) -> dict[str, bytes]:
    with st.Reader(path) as r:
        return {k: bytes(r.raw(k)) for k in r.keys()}


def test_direct_reads_equal_buffered_reads(odd_file, monkeypatch):
    path, tensors = odd_file
    with st.Reader(path) as r:
        if r._direct is None:
            pytest.skip(f"no direct I/O on the filesystem of {path.parent} (tmpfs?): nothing to compare")
        assert {e.start % st.ALIGN for e in r.entries.values()} - {0}  # offsets really are unaligned
        direct = {k: bytes(r.raw(k)) for k in r.keys()}
        assert r._direct is not None  # it stayed on: every read went direct
    monkeypatch.setenv("COMPARTMENTS_DIRECT_IO", "0")
    assert _all(path) == direct
    for k, t in tensors.items():
        assert direct[k] == t.contiguous().view(torch.uint8).numpy().tobytes(), k


def test_a_filesystem_that_refuses_direct_reads_is_read_buffered(odd_file, monkeypatch):
    path, tensors = odd_file
    expected = _all(path)
    real = os.preadv
    refused = []

    def preadv(fd, buffers, offset):
        import fcntl

        if fcntl.fcntl(fd, fcntl.F_GETFL) & getattr(os, "O_DIRECT", 0):  # as a filesystem without it does
            refused.append(fd)
            raise OSError(errno.EINVAL, "Invalid argument")
        return real(fd, buffers, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    with st.Reader(path) as r:
        if r._direct is None:
            pytest.skip("no direct I/O here")
        got = {k: bytes(r.raw(k)) for k in r.keys()}
        assert r._direct is None and refused  # refused once, then buffered for good
    assert got == expected
