"""The retrieval room: an on-disk image store for retrieval-augmented sampling (CPR).

open_clip embeddings (:mod:`.embed`), a vector index behind a small protocol
(:mod:`.index`, faiss by default) and SQLite metadata with public/private flags and exact
forgetting (:mod:`.store`, with its vector file :mod:`.slots`), or PostgreSQL + pgvector
(:mod:`.pgstore`), chosen by :class:`.backends.StoreRef`; the backend-neutral parts are
:mod:`.items` (what a store returns and raises), :mod:`.images` and :mod:`.credits`. No
ComfyUI imports here.
"""

from .backends import PG_CONFIG_SUFFIX, StoreRef
from .credits import attribution, parse_refs
from .embed import Embedder, EmbedderError
from .index import FaissIndex, NumpyIndex, VectorIndex
from .items import AddReport, Hit, Item, StoreError
from .pgstore import PgImageStore
from .store import ImageStore, build_or_update

__all__ = ["PG_CONFIG_SUFFIX", "AddReport", "Embedder", "EmbedderError", "FaissIndex", "Hit", "ImageStore", "Item",
           "NumpyIndex", "PgImageStore", "StoreError", "StoreRef", "VectorIndex", "attribution", "build_or_update",
           "parse_refs"]
