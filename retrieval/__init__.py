"""The retrieval room: an on-disk image store for retrieval-augmented sampling (CPR).

open_clip embeddings (:mod:`.embed`), a vector index behind a small protocol
(:mod:`.index`, faiss by default) and SQLite metadata with public/private flags and exact
forgetting (:mod:`.store`). No ComfyUI imports here.
"""

from .embed import Embedder, EmbedderError
from .index import FaissIndex, NumpyIndex, VectorIndex
from .store import AddReport, Hit, ImageStore, Item, StoreError, attribution, build_or_update, parse_refs

__all__ = ["AddReport", "Embedder", "EmbedderError", "FaissIndex", "Hit", "ImageStore", "Item",
           "NumpyIndex", "StoreError", "VectorIndex", "attribution", "build_or_update", "parse_refs"]
