"""What both store backends do the same way, whatever holds the rows: reading a folder, embedding
staged images in bounded memory, the query vector, swapping the embedder.

A backend (:class:`.store.ImageStore`, :class:`.pgstore.PgImageStore`) provides ``add_files``,
``embedder``, ``dim`` and ``_check_embedder``, and for the row reads and owner rules (the same SQL
on SQLite and PostgreSQL) its driver's placeholder ``_P``, its table names (``_t``) and ``_rows``
(run a statement, fetch every row); these methods use nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .embed import Embedder
from .images import copy_name, decode_image, probe_image, sha256_hex, unreadable
from .items import FILTERS, AddReport, Item, Progress, StoreError

COLS = "id, sha256, path, owner, visibility, added, width, height, file"  # an Item, in field order

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

    @staticmethod
    def _stage(files: Sequence[str | Path], report: AddReport, copies_in: str = "") -> list[dict]:
        """Read, hash and probe each file once: the images to add (``file``: the copy's name under
        ``copies_in``); unreadable files and repeats within ``files`` are skipped into ``report``."""
        staged: list[dict] = []
        seen: set[str] = set()
        for f in map(Path, files):
            try:
                data = f.read_bytes()
            except OSError as exc:
                report.skipped.append((str(f), f"unreadable: {exc.strerror or exc}"))
                continue
            sha = sha256_hex(data)
            if sha in seen:
                report.skipped.append((str(f), "duplicate: already in the store"))
                continue
            try:
                fmt, width, height = probe_image(data)
            except Exception as exc:  # PIL raises many types for bad data; each is a skip, not a crash
                report.skipped.append((str(f), unreadable(exc)))
                continue
            seen.add(sha)
            staged.append({"sha": sha, "path": str(f), "data": data, "width": width, "height": height,
                           "file": f"{copies_in}{copy_name(sha, fmt)}"})
        return staged

    @staticmethod
    def _new_only(staged: list[dict], known: dict[str, str], allow_forgotten: bool, report: AddReport) -> list[dict]:
        """The staged images the store does not hold (``known``: sha256 -> "stored" / "forgotten");
        forgotten ones only with ``allow_forgotten``. The rest are skipped into ``report``."""
        kept = []
        for s in staged:
            state = known.get(s["sha"])
            if state == "stored":
                report.skipped.append((s["path"], "duplicate: already in the store"))
            elif state == "forgotten" and not allow_forgotten:
                report.skipped.append((s["path"], "forgotten earlier: not re-added (allow_forgotten to override)"))
            else:
                kept.append(s)
        return kept

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

    # -- rows and owners: the same SQL on both backends -------------------------------------
    _P = "?"  # the driver's parameter placeholder

    def _t(self, table: str) -> str:
        """The table's name in SQL."""
        return table

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        """Run one statement; its rows (none for a write)."""
        raise NotImplementedError

    def get(self, ids: Iterable[int]) -> list[Item]:
        """Items by id, in the order given; unknown ids are an error."""
        ids = [int(i) for i in ids]
        if not ids:
            return []
        wanted = sorted(set(ids))
        rows = self._rows(f"SELECT {COLS} FROM {self._t('items')} WHERE id IN ({','.join([self._P] * len(wanted))})",
                          wanted)
        by_id = {r[0]: Item(*r) for r in rows}
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise StoreError(f"ids {missing} are not in the store (forgotten or never added).", "", "ids")
        return [by_id[i] for i in ids]

    def list(self, visibility: str = "all") -> list[Item]:
        where, args = self._filter(visibility)
        return [Item(*r) for r in self._rows(f"SELECT {COLS} FROM {self._t('items')} {where} ORDER BY id", args)]

    def _filter(self, visibility: str) -> tuple[str, list]:
        if visibility not in FILTERS:
            raise StoreError(f"visibility filter '{visibility}' is not one of {FILTERS}.", "", "visibility")
        return ("", []) if visibility == "all" else (f"WHERE visibility={self._P}", [visibility])

    def set_default_owner(self, owner: str) -> None:
        """Record the owner the store was built for (whose private items a query returns by default)."""
        self._rows(f"INSERT INTO {self._t('meta')}(key, value) VALUES ('owner', {self._P}) "
                   "ON CONFLICT (key) DO UPDATE SET value = excluded.value", [owner])

    def _private_owners(self) -> list[str]:
        return sorted(r[0] for r in self._rows(f"SELECT DISTINCT owner FROM {self._t('items')} "
                                               "WHERE visibility='private'"))

    def default_owner(self) -> str | None:
        """The owner recorded at build time; for older stores the only owner of private items.

        None when private items belong to several owners and none was recorded: a query must
        then say whose private items it wants (never everyone's).
        """
        row = self._rows(f"SELECT value FROM {self._t('meta')} WHERE key='owner'")
        if row:
            return row[0][0]
        owners = self._private_owners()
        return owners[0] if len(owners) == 1 else ("" if not owners else None)

    def _scope(self, visibility: str, owner: str | None) -> tuple[str, list]:
        """SQL filter for a query: public items are shared; private ones only for ``owner``."""
        if visibility == "public" or visibility not in FILTERS:
            return self._filter(visibility)  # the public filter, or the error naming the bad one
        who = owner if owner else self.default_owner()
        if who is None:
            raise StoreError(f"the store holds private images of several owners "
                             f"({', '.join(map(repr, self._private_owners()))}) and none is its default.",
                             "say whose private images to retrieve: set owner.", "owner")
        if visibility == "private":
            return f"WHERE visibility='private' AND owner={self._P}", [who]
        return f"WHERE visibility='public' OR (visibility='private' AND owner={self._P})", [who]
