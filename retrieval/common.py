"""What both store backends do the same way, whatever holds the rows: reading a folder, embedding
staged images in bounded memory, the query vector, swapping the embedder.

A backend (:class:`.store.ImageStore`, :class:`.pgstore.PgImageStore`) provides ``add_files``,
``embedder``, ``dim`` and ``_check_embedder``; these methods use nothing else.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .embed import Embedder
from .images import decode_image, unreadable
from .items import AddReport, Progress, StoreError

# Embedding needs far less than a 6000x6000 photo (open_clip sees 224 px): images are decoded
# for it at most this long on a side, one batch at a time, so a folder of huge images costs one
# batch of small ones in memory. The stored copy keeps the original bytes.
EMBED_SIDE = 1024
EMBED_BATCH = 16


class StoreCommon:
    """The backend-neutral part of an image store (a mixin)."""

    def set_embedder(self, embedder: Embedder) -> None:
        self._check_embedder(embedder)
        self._embedder = embedder

    def add_folder(self, folder: str | Path, owner: str = "", visibility: str = "private",
                   recursive: bool = True, progress: Progress | None = None,
                   allow_forgotten: bool = False) -> AddReport:
        """Add every image file under ``folder`` (hidden files ignored); see :meth:`add_files`."""
        folder = Path(folder)
        if not folder.is_dir():
            raise StoreError(f"'{folder}' is not a folder.", "give a folder of images.", "folder")
        pattern = "**/*" if recursive else "*"
        files = sorted(p for p in folder.glob(pattern)
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        return self.add_files(files, owner=owner, visibility=visibility, progress=progress,
                              allow_forgotten=allow_forgotten)

    def _embed_staged(self, staged: list[dict], progress: Progress | None,
                      report: AddReport) -> tuple[list[dict], np.ndarray]:
        """Decode (at most EMBED_SIDE on a side) and embed one batch at a time: bounded memory.

        This is each image's only full decode: one that fails here (damage ``verify()`` cannot
        see) is skipped and reported like any unreadable file. Returns the kept items and vectors.
        """
        kept: list[dict] = []
        out, total = [], len(staged)
        for start in range(0, total, EMBED_BATCH):
            batch, pixels = [], []
            for s in staged[start:start + EMBED_BATCH]:
                try:
                    pixels.append(decode_image(s["data"], EMBED_SIDE)[0])
                    batch.append(s)
                except Exception as exc:  # as in add_files: every decoding failure is a skip
                    report.skipped.append((s["path"], unreadable(exc)))
            if pixels:
                out.append(self.embedder.embed_images(pixels, batch_size=EMBED_BATCH))
                kept += batch
            del pixels
            if progress is not None:
                progress(min(start + EMBED_BATCH, total), total)
        return kept, (np.concatenate(out) if out else np.zeros((0, self.dim), dtype=np.float32))

    def query_vector(self, text: str | None = None, image: torch.Tensor | None = None) -> np.ndarray:
        """The unit query vector [1, dim] for a text or an IMAGE batch (batch: mean embedding)."""
        has_text = bool(text and text.strip())
        if has_text == (image is not None):
            raise StoreError("give exactly one query: a text or an image.",
                             "fill the text or connect an image, not both." if has_text else "type a text or connect an image.",
                             "query")
        if has_text:
            return self.embedder.embed_texts([text.strip()])
        vecs = self.embedder.embed_images(image)
        mean = vecs.mean(axis=0, keepdims=True)
        return (mean / max(float(np.linalg.norm(mean)), 1e-12)).astype(np.float32)
