"""Fixtures the tier-1 store tests share (both backends)."""

from __future__ import annotations

import pytest

from compartments.retrieval import Embedder
from compartments.tiny import retrieval as tiny_retrieval


@pytest.fixture(scope="module")
def embedder() -> Embedder:
    """The tiny open_clip model the stores embed with."""
    return Embedder(tiny_retrieval.clip_weights())


@pytest.fixture(scope="module")
def folder():
    """The tiny image folder (six images, a truncated PNG and a text file)."""
    return tiny_retrieval.images_folder()
