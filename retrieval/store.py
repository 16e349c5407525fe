"""A persistent image store: open_clip embeddings, a faiss index, SQLite metadata, forget.

API (what samplers/ and nodes/ rely on; names are stable):

    store = ImageStore(path)                      # open an existing store folder
    store = ImageStore.create(path, embedder)     # new, empty store bound to one open_clip model
    report = store.add_folder(folder, owner="me", visibility="private", progress=cb)
    report = store.add_files([paths...], ...)     # AddReport: added ids, skipped (path, reason)
    hits = store.query(text="a cat", k=4, visibility="private")   # or image=IMAGE [B,H,W,3]
    hits[0].id, .sha256, .path, .owner, .visibility, .score     # Hit
    images = store.load_images(hits)              # torch [B,H,W,3] float 0..1 (ComfyUI IMAGE)
    vectors = store.image_embeddings([ids])       # torch [N, dim] float32, unit norm
    store.set_visibility([ids or sha256], "public")
    store.forget([ids or sha256])                 # row, vector and stored copy gone, exactly
    store.list(visibility="all") -> list[Item]

Folder layout: ``meta.sqlite`` (one row per image with the slot of its vector; the single
commit point), ``vectors.f32`` (fixed-size float32 rows: the vector of slot ``s`` at byte
``s * dim * 4``), ``images/<sha256>.<ext>`` (content-addressed copies, so the store is
self-contained and forgetting deletes the copy). The faiss index lives in memory and is built
from the live slots on open (one sequential read).

Writes are transactional, with SQLite as the commit point. An add writes its vectors into free
slots (slots no committed row names) and fsyncs them, then commits the rows that name them: a
failure or Cancel before the commit leaves only unreferenced slots, zeroed again on rollback
(or by the next open). A forget commits the row delete, then zeroes the slot in place (one
``dim * 4``-byte write + fsync) and removes the id from the in-memory index; a crash in between
leaves an unreferenced slot that the next open zeroes before anything is read. So forget costs
O(1) I/O whatever the store size (README.md, section "Retrieval store"). Live slots whose vector is missing or
damaged are re-embedded from the stored copies on open (with the store's embedder).

Forgetting is exact: the row is deleted (``secure_delete``: SQLite overwrites it), the vector
zeroed on disk and in memory, the id never reused (AUTOINCREMENT), the copy deleted, and the
content hash kept in a ``forgotten`` table so the same bytes are not silently re-added by a
later folder rebuild.

Modules: this one is the SQLite + faiss backend (the schema, the transactions, the folder's
writer lock and :class:`ImageStore`), with :mod:`.slots` (``vectors.f32``) and :mod:`.index`
(the in-memory index). What does not depend on the backend lives beside it, for a second one
to share: :mod:`.common` (folder reading, bounded embedding, the query vector), :mod:`.items` (Item, Hit,
AddReport, StoreError), :mod:`.images` (decoding, hashing,
the copies) and :mod:`.credits` (the credit record and the references read from it).
"""

from __future__ import annotations

import heapq
import json
import os
import shutil
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path
from typing import Any

try:
    import fcntl
    msvcrt = None
except ImportError:  # Windows
    fcntl = None
    import msvcrt

import numpy as np
import torch

from ..atomic import sweep_stale
from .common import EMBED_BATCH, EMBED_SIDE, StoreCommon
from .credits import attribution, check_ref, parse_refs
from .embed import Embedder
from .images import copies_written, decode_image, fit
from .index import BACKENDS, VectorIndex
from .items import FILTERS, VISIBILITIES, AddReport, Hit, Item, Progress, StoreError
from .slots import SlotFile

# This module's names, plus those of .items/.credits/.images that nodes/ and cli/ import from here.
__all__ = ["DB_NAME", "EMBED_BATCH", "EMBED_SIDE", "FILTERS", "FORMAT_VERSION", "IMAGE_DIR", "VECTORS_NAME",
           "VISIBILITIES", "AddReport", "Hit", "ImageStore", "Item", "StoreError", "attribution",
           "build_or_update", "decode_image", "parse_refs", "store_revision"]

FORMAT_VERSION = 2
DB_NAME = "meta.sqlite"
IMAGE_DIR = "images"
VECTORS_NAME = "vectors.f32"
LOCK_NAME = "write.lock"


_SCHEMA = """
CREATE TABLE IF NOT EXISTS items(
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    sha256 TEXT NOT NULL UNIQUE,
    path TEXT NOT NULL,
    file TEXT NOT NULL,
    owner TEXT NOT NULL,
    visibility TEXT NOT NULL CHECK (visibility IN ('private', 'public')),
    added REAL NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    slot INTEGER NOT NULL UNIQUE
);
CREATE INDEX IF NOT EXISTS items_visibility ON items(visibility);
CREATE TABLE IF NOT EXISTS forgotten(sha256 TEXT PRIMARY KEY, at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
"""


# -- SQLite transactions and the folder's writer lock (this backend's concurrency) ----------
@contextmanager
def _transaction(db: sqlite3.Connection, write: bool = True,
                 undo: Callable[[], None] | None = None) -> Iterator[None]:
    """One SQLite transaction around the block: COMMIT when it ends, ROLLBACK (then ``undo``) if
    the block or the commit raises, Cancel included.

    ``write``: BEGIN IMMEDIATE, SQLite's write lock taken at once, so what the block reads (the
    generation, the free slots) cannot change before its writes commit. Otherwise a deferred
    BEGIN: one read snapshot, a shared lock from the first SELECT to the end. ``undo`` reverts
    what the block changed outside SQLite (slots taken in memory and on disk).
    """
    db.execute("BEGIN IMMEDIATE" if write else "BEGIN")
    try:
        yield
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        if undo is not None:
            undo()
        raise


def sweep_abandoned_builds(folder: Path) -> None:
    """Remove the ``.NAME.PID.building`` / ``.creating`` folders (copies of images) that first
    builds and creations killed mid-way left in ``folder``; a live process's are kept."""
    for suffix in (".building", ".creating"):
        sweep_stale(folder, suffix)


@contextmanager
def _writer_lock(path: Path, blocking: bool = True) -> Iterator[bool]:
    """A cross-process lock on ``<store>/write.lock`` (flock; released if the process dies).

    Yields True when held; with ``blocking=False`` yields False at once if another process holds it.
    """
    try:
        lock = open(path / LOCK_NAME, "a+b")  # noqa: SIM115 - closed below
    except OSError:
        if blocking:
            raise
        yield False  # a read-only store: nobody can be writing copies into it through us
        return
    try:
        try:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            else:  # Windows
                msvcrt.locking(lock.fileno(), msvcrt.LK_LOCK if blocking else msvcrt.LK_NBLCK, 1)
        except OSError:
            if blocking:
                raise
            yield False
            return
        try:
            yield True
        finally:
            if fcntl is not None:
                fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
            else:
                msvcrt.locking(lock.fileno(), msvcrt.LK_UNLCK, 1)
    finally:
        lock.close()


class ImageStore(StoreCommon):
    """An on-disk image store folder; see the module docstring for the API and guarantees."""

    def __init__(self, path: str | Path, embedder: Embedder | None = None) -> None:
        self.path = Path(path)
        db = self.path / DB_NAME
        if not db.is_file():
            raise StoreError(f"'{self.path}' is not an image store (no {DB_NAME}).",
                             "build one first (ImageStore.create or the Build Image Store node).", "store")
        self.db = sqlite3.connect(str(db), isolation_level=None, check_same_thread=False)
        try:
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.execute("PRAGMA secure_delete=ON")  # deleted rows are overwritten, not left in free pages
            self.config = json.loads(self._meta("config"))
            if not isinstance(self.config, dict) or not isinstance(self.config.get("model"), dict):
                raise ValueError("its config is not an object with a model")
        except (sqlite3.DatabaseError, ValueError, TypeError) as exc:
            self.db.close()
            if isinstance(exc, StoreError):
                raise
            raise StoreError(f"'{self.path}': the store's database {DB_NAME} is damaged ({exc}).",
                             "restore the store folder from a backup, or rebuild it from its images.", "store") from None
        if int(self.config.get("format_version", 0)) != FORMAT_VERSION:
            raise StoreError(f"store format {self.config.get('format_version')} is not {FORMAT_VERSION}.",
                             "rebuild the store with this version.", "store")
        self.dim = int(self.config["dim"])
        self.backend = BACKENDS[self.config.get("backend", "faiss")]
        self._embedder = embedder
        if embedder is not None:
            self._check_embedder(embedder)
        self.slots = SlotFile(self.path / VECTORS_NAME, self.dim)
        self.index: VectorIndex = self.backend(self.dim)
        self._free: list[int] = []  # free slots below _nslots (a min-heap)
        self._nslots = 0
        self._gen = -1
        try:
            self._load()
        except BaseException:
            self.close()
            raise
        sweep_abandoned_builds(self.path.parent)

    # -- creation and opening ---------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, embedder: Embedder, backend: str = "faiss") -> ImageStore:
        """Make a new empty store bound to ``embedder``'s model (built in a temp folder, renamed)."""
        path = Path(path)
        if path.exists():
            raise StoreError(f"'{path}' already exists.", "open it with ImageStore(path) or pick a new name.", "store")
        if backend not in BACKENDS:
            raise StoreError(f"unknown index backend '{backend}'.", f"use one of {sorted(BACKENDS)}.", "backend")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.creating")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            (tmp / IMAGE_DIR).mkdir(parents=True)
            db = sqlite3.connect(str(tmp / DB_NAME), isolation_level=None)
            db.executescript(_SCHEMA)
            config = {"format_version": FORMAT_VERSION, "backend": backend, "created": time.time(),
                      "model": embedder.describe(), "dim": embedder.dim}
            with _transaction(db):
                db.executemany("INSERT INTO meta(key, value) VALUES (?, ?)",
                               [("config", json.dumps(config)), ("generation", "0"), ("revision", "0")])
                (tmp / VECTORS_NAME).touch()
            db.close()
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return cls(path, embedder)

    def _meta(self, key: str) -> str:
        row = self.db.execute("SELECT value FROM meta WHERE key=?", (key,)).fetchone()
        if row is None:
            raise StoreError(f"store '{self.path}' has no '{key}' record.", "rebuild the store.", "store")
        return row[0]

    @property
    def generation(self) -> int:
        """Bumped by every write of vectors (add, forget): tells an open store its index is stale."""
        return int(self._meta("generation"))

    @property
    def revision(self) -> int:
        """Bumped by every write (add, forget, visibility): a cache key for nodes."""
        return int(self._meta("revision"))

    def _load(self) -> None:
        """Build the in-memory index from the live slots, under the write lock.

        Also the recovery step: slots no row names but holding bytes (a crash after a forget's
        commit, or during an add) are zeroed; a free tail is truncated; live slots whose vector
        is missing or not a unit vector are re-embedded from the stored copies.
        """
        own = not self.db.in_transaction  # called by a write (add, forget: _sync): join its transaction
        with _transaction(self.db) if own else nullcontext():
            gen = self.generation
            rows = self.db.execute("SELECT id, slot FROM items ORDER BY id").fetchall()
            ids = np.array([r[0] for r in rows], dtype=np.int64)
            slots = np.array([r[1] for r in rows], dtype=np.int64)
            mat = self.slots.read_all()
            n = len(mat)
            vecs = np.zeros((len(ids), self.dim), dtype=np.float32)
            inside = slots < n
            vecs[inside] = mat[slots[inside]]
            live = np.zeros(n, dtype=bool)
            live[slots[inside]] = True
            dirty = np.flatnonzero(~live)
            dirty = dirty[np.asarray(mat[dirty]).any(axis=1)] if len(dirty) else dirty
            del mat
            norms = np.linalg.norm(vecs, axis=1)
            bad = np.flatnonzero(~np.isfinite(norms) | (np.abs(norms - 1.0) > 1e-3))
            if len(bad):
                vecs[bad] = self._reembed(ids[bad].tolist())
                self.slots.write(slots[bad].tolist(), vecs[bad])
            if len(dirty):
                self.slots.zero(dirty.tolist())
            top = int(slots.max()) + 1 if len(slots) else 0
            if len(self.slots) > top:
                self.slots.truncate(top)
            free = np.setdiff1d(np.arange(top, dtype=np.int64), slots).tolist()
            index = self.backend(self.dim)
            index.add(ids, vecs)
        heapq.heapify(free)
        self.index, self._free, self._nslots, self._gen = index, free, top, gen
        if own:  # inside a write, copies of the add in progress exist but have no row yet
            with _writer_lock(self.path, blocking=False) as held:
                if held:  # no writer is between writing its copies and committing their rows
                    self._gc_files()

    def _reembed(self, ids: list[int]) -> np.ndarray:
        """Vectors for items whose slot was lost or damaged, from their stored copies."""
        items = self.get(ids)
        missing = [it.id for it in items if not (self.path / it.file).is_file()]
        if self._embedder is None or missing:
            raise StoreError(
                f"the vectors of {len(ids)} items in '{VECTORS_NAME}' are missing or damaged"
                + (f" and the copies of items {missing[:10]} are gone." if missing else "."),
                "open the store with its embedder to re-embed them from the stored copies."
                if not missing else f"forget items {missing[:10]} or rebuild the store.", "store")
        return self._embedder.embed_images([decode_image((self.path / it.file).read_bytes())[0] for it in items])

    def _sync(self) -> None:
        """Reload the index if another process added or forgot since it was built."""
        if self.generation != self._gen:
            self._load()

    def _take_slots(self, n: int) -> list[int]:
        """``n`` free slots: reuse the lowest free ones, then append."""
        out = [heapq.heappop(self._free) for _ in range(min(n, len(self._free)))]
        out += list(range(self._nslots, self._nslots + n - len(out)))
        self._nslots = max(self._nslots, out[-1] + 1) if out else self._nslots
        return out

    def _release_slots(self, slots: list[int], old_nslots: int) -> None:
        """Undo :meth:`_take_slots` after a rollback: zero reused slots, cut the appended tail."""
        reused = [x for x in slots if x < old_nslots]
        self._nslots = old_nslots
        for x in reused:
            heapq.heappush(self._free, x)
        try:
            self.slots.zero(reused)
            if len(self.slots) > old_nslots:
                self.slots.truncate(old_nslots)
        except OSError:
            pass  # unreferenced slots: the next open zeroes or truncates them

    def _gc_files(self) -> None:
        """Delete image copies no row references (left by a failed add or a crash after forget)."""
        known = {r[0] for r in self.db.execute("SELECT file FROM items")}
        img_dir = self.path / IMAGE_DIR
        if img_dir.is_dir():
            for f in img_dir.iterdir():
                if f"{IMAGE_DIR}/{f.name}" not in known:
                    f.unlink(missing_ok=True)

    def close(self) -> None:
        if getattr(self, "slots", None) is not None:
            self.slots.close()
        self.db.close()

    def __enter__(self) -> ImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.db.execute("SELECT COUNT(*) FROM items").fetchone()[0])

    # -- the embedder ---------------------------------------------------------------------
    def _check_embedder(self, embedder: Embedder) -> None:
        want = self.config["model"]
        if embedder.dim != self.dim or embedder.sha256 != want["weights_sha256"]:
            raise StoreError(
                f"store was built with '{want['weights']}' ({want['name']}, sha256 {want['weights_sha256'][:12]}); "
                f"'{embedder.weights.name}' is a different model and its vectors are not comparable.",
                f"use '{want['weights']}' or build a new store.", "weights")

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            raise StoreError("this store was opened without an embedder, which text/image queries and adds need.",
                             f"pass ImageStore(path, embedder=Embedder('{self.config['model']['weights']}')).",
                             "weights")
        return self._embedder

    # -- writes ---------------------------------------------------------------------------
    def _bump(self, vectors: bool) -> None:
        """Inside a write transaction: count the write (revision) and, if vectors changed, the generation."""
        if vectors:
            self.db.execute("UPDATE meta SET value=CAST(value AS INTEGER)+1 WHERE key='generation'")
        self.db.execute("UPDATE meta SET value=CAST(value AS INTEGER)+1 WHERE key='revision'")

    def add_files(self, files: Sequence[str | Path], owner: str = "", visibility: str = "private",
                  progress: Progress | None = None, allow_forgotten: bool = False) -> AddReport:
        """Add images. Corrupt, non-image, duplicate and previously forgotten files are skipped and
        reported; the rest are embedded (``progress(done, total)`` per batch; raising from it, as
        Cancel does, aborts with nothing written) and committed in one transaction."""
        if visibility not in VISIBILITIES:
            raise StoreError(f"visibility '{visibility}' is not one of {VISIBILITIES}.", "", "visibility")
        report = AddReport()
        known = {r[0]: "forgotten" for r in self.db.execute("SELECT sha256 FROM forgotten")}
        known.update({r[0]: "stored" for r in self.db.execute("SELECT sha256 FROM items")})
        staged = self._new_only(self._stage(files, report, f"{IMAGE_DIR}/"), known, allow_forgotten, report)
        staged, vecs = self._embed_staged(staged, progress, report)
        if not staged:
            return report
        # From the first copy to the commit naming it, hold the store's writer lock: another
        # process opening the store then leaves the copies alone (its clean-up waits for a
        # moment when no writer is between the two). A failed add deletes the copies it wrote.
        with _writer_lock(self.path), copies_written(self.path, [(s["file"], s["data"]) for s in staged]):
            report.added = self._insert(staged, vecs, owner, visibility)
        return report

    def _insert(self, staged: list[dict], vecs: np.ndarray, owner: str, visibility: str) -> list[int]:
        """One transaction: vectors into free slots (fsynced), then the rows naming them, commit."""
        now = time.time()
        new_ids: list[int] = []
        old_nslots, slots = self._nslots, []  # what undo reads when it runs: the values set below
        with _transaction(self.db, undo=lambda: self._release_slots(slots, old_nslots)):
            self._sync()
            old_nslots = self._nslots
            slots = self._take_slots(len(staged))
            self.slots.write(slots, vecs)
            for s, slot in zip(staged, slots, strict=True):
                h, w = s["height"], s["width"]
                cur = self.db.execute(
                    "INSERT INTO items(sha256, path, file, owner, visibility, added, width, height, slot)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    (s["sha"], s["path"], s["file"], owner, visibility, now, w, h, slot))
                new_ids.append(int(cur.lastrowid))
            self.db.execute(f"DELETE FROM forgotten WHERE sha256 IN ({','.join('?' * len(staged))})",
                            [s["sha"] for s in staged])
            self._bump(vectors=True)
        self._gen += 1
        try:
            self.index.add(np.array(new_ids, dtype=np.int64), vecs)
        except BaseException:
            self._load()  # committed: rebuild the in-memory index from disk
            raise
        return new_ids

    def _exists(self, ref: int | str) -> bool:
        ref = check_ref(ref, "ids")
        if isinstance(ref, int):
            return self.db.execute("SELECT 1 FROM items WHERE id=?", (ref,)).fetchone() is not None
        return self.db.execute("SELECT 1 FROM items WHERE sha256 >= ? AND sha256 < ? LIMIT 1",
                               (ref, ref + "g")).fetchone() is not None

    def _resolve(self, refs: Iterable[int | str], field_name: str) -> list[int]:
        """Ids or sha256 hex strings (full, or a unique prefix of 8+) -> existing row ids."""
        out: list[int] = []
        for raw in refs:
            ref = check_ref(raw, field_name)
            if isinstance(ref, int):
                row = self.db.execute("SELECT id FROM items WHERE id=?", (ref,)).fetchone()
                if row is None:
                    raise StoreError(f"no item with id {ref} in the store.",
                                     "list the store to see the ids it holds.", field_name)
                out.append(row[0])
                continue
            # a hex prefix range, so SQLite walks the UNIQUE index (LIKE would scan every row)
            rows = self.db.execute("SELECT id FROM items WHERE sha256 >= ? AND sha256 < ? LIMIT 2",
                                   (ref, ref + "g")).fetchall()
            if len(rows) != 1:
                raise StoreError(f"sha256 '{ref}' matches {len(rows)} items.",
                                 "give the full hash or an id." if rows else "list the store to see its hashes.",
                                 field_name)
            out.append(rows[0][0])
        return sorted(set(out))

    def forget(self, refs: Iterable[int | str], missing_ok: bool = False) -> list[Item]:
        """Delete items by id or sha256: row, vector and stored copy, exactly, in one transaction.

        Cost per item: a few SQLite pages, one ``dim * 4``-byte zeroing write in
        ``vectors.f32`` and an in-memory removal, independent of the store size; no model weights
        are touched, nothing is retrained. Returns the forgotten items. ``missing_ok`` makes a repeated request for an
        item already gone a no-op instead of an error (unlearning requests get retried).
        """
        refs = list(refs)
        if not refs:
            raise StoreError("nothing to forget: no ids or hashes given.", "give ids or sha256 hashes.", "ids")
        if missing_ok:
            refs = [r for r in refs if self._exists(r)]
            if not refs:
                return []
        ids = self._resolve(refs, "ids")
        items = self.get(ids)
        now, marks = time.time(), ",".join("?" * len(ids))
        with _transaction(self.db):
            self._sync()
            slots = [r[0] for r in self.db.execute(f"SELECT slot FROM items WHERE id IN ({marks})", ids)]
            if len(slots) != len(ids):
                raise StoreError("some of these items were forgotten meanwhile (another process).",
                                 "list the store and retry.", "ids")
            self.db.execute(f"DELETE FROM items WHERE id IN ({marks})", ids)
            self.db.executemany("INSERT OR REPLACE INTO forgotten(sha256, at) VALUES (?, ?)",
                                [(it.sha256, now) for it in items])
            self._bump(vectors=True)
        # committed: from here on the items are gone; finish the O(1) clean-up
        self._gen += 1
        self.index.remove(np.array(ids, dtype=np.int64))
        try:
            self.slots.zero(slots)  # dim * 4 bytes per item, in place; a crash here: the next open zeroes them
        finally:
            for x in slots:
                heapq.heappush(self._free, x)
            for it in items:
                (self.path / it.file).unlink(missing_ok=True)
            # copies of the same images in what killed processes left: their in-flight copies in
            # images/, and first builds abandoned beside this store (see build_or_update)
            sweep_stale(self.path / IMAGE_DIR, ".tmp")
            sweep_abandoned_builds(self.path.parent)
        return items

    def set_visibility(self, refs: Iterable[int | str], visibility: str) -> list[int]:
        """Mark items public or private (metadata only: the vectors do not change)."""
        if visibility not in VISIBILITIES:
            raise StoreError(f"visibility '{visibility}' is not one of {VISIBILITIES}.", "", "visibility")
        ids = self._resolve(refs, "ids")
        marks = ",".join("?" * len(ids))
        with _transaction(self.db):
            self.db.execute(f"UPDATE items SET visibility=? WHERE id IN ({marks})", [visibility, *ids])
            self._bump(vectors=False)
        return ids

    # -- reads (get, list and the owner rules are StoreCommon's) -----------------------------
    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        return self.db.execute(sql, args).fetchall()

    def summary(self) -> dict:
        counts = dict(self.db.execute("SELECT visibility, COUNT(*) FROM items GROUP BY visibility").fetchall())
        return {"path": str(self.path), "items": len(self), "public": counts.get("public", 0),
                "private": counts.get("private", 0), "model": self.config["model"]["name"],
                "weights": self.config["model"]["weights"], "dim": self.dim, "generation": self.generation,
                "slots": self._nslots, "free_slots": len(self._free),
                "forgotten": int(self.db.execute("SELECT COUNT(*) FROM forgotten").fetchone()[0])}

    def query(self, text: str | None = None, image: torch.Tensor | None = None, k: int = 4,
              visibility: str = "private", owner: str | None = None) -> list[Hit]:
        """The ``k`` items most similar to the query among those with the given visibility.

        Private items are returned only to their ``owner`` (default: the store's owner, see
        :meth:`default_owner`); public items to everyone. The rows, the index and the items
        returned come from one read snapshot, so a forget committed by another process meanwhile
        can neither be returned nor break the query.
        """
        if self.db.in_transaction:
            self._sync()
            return self._query(text, image, k, visibility, owner)
        for _ in range(20):
            self._sync()  # under its own write lock: the index catches up with the rows
            with _transaction(self.db, write=False):  # one read snapshot for rows, index and items
                if self.generation == self._gen:  # nothing was committed since: index and rows agree
                    return self._query(text, image, k, visibility, owner)
        raise StoreError("the store kept changing while it was queried (other processes writing).",
                         "retry the query.", "store")

    def _query(self, text: str | None, image: torch.Tensor | None, k: int, visibility: str,
               owner: str | None) -> list[Hit]:
        where, args = self._scope(visibility, owner)
        if k < 1:
            raise StoreError(f"k={k}: ask for at least one image.", "set k >= 1.", "k")
        total = len(self)
        if total == 0:
            raise StoreError("the store is empty.", "add images to it first.", "store")
        visible = np.array([r[0] for r in self.db.execute(f"SELECT id FROM items {where}", args)], dtype=np.int64)
        whose = f" of owner {args[0]!r}" if args else ""
        if len(visible) == 0:
            raise StoreError(f"the store holds {total} images but none is {visibility}{whose}.",
                             "mark some images " + visibility + ", change the visibility filter or the owner.",
                             "visibility")
        if k > len(visible):
            raise StoreError(f"k={k} but only {len(visible)} {'' if visibility == 'all' else visibility + ' '}images"
                             f"{whose} are in the store.", f"set k <= {len(visible)}.", "k")
        q = self.query_vector(text, image)
        scores, ids = self.index.search(q, k, visible)
        keep = [(int(i), float(s)) for i, s in zip(ids[0], scores[0], strict=True) if i >= 0]
        items = {it.id: it for it in self.get([i for i, _ in keep])}
        return [Hit(**asdict(items[i]), score=s) for i, s in keep]

    def load_images(self, hits: Sequence[Item], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Stored copies as one ComfyUI IMAGE [B, H, W, 3] float 0..1.

        A batch needs one size: ``size`` (h, w), else the first image's; others are
        cover-resized and centre-cropped to it.
        """
        if not hits:
            raise StoreError("no hits to load.", "query with k >= 1 first.", "hits")
        imgs = []
        for h in hits:
            p = self.path / h.file
            if not p.is_file():
                raise StoreError(f"image {h.id} ({h.sha256[:12]}) is no longer in the store.",
                                 "query again: it was forgotten.", "hits")
            imgs.append(decode_image(p.read_bytes())[0])
        th, tw = size or tuple(imgs[0].shape[:2])
        return torch.stack([fit(im, th, tw) for im in imgs])

    def image_embeddings(self, ids: Sequence[int]) -> torch.Tensor:
        """Stored unit image embeddings [N, dim] float32 for these ids (in that order)."""
        ids = [int(i) for i in ids]
        self.get(ids)
        if not ids:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        rows = dict(self.db.execute(f"SELECT id, slot FROM items WHERE id IN ({','.join('?' * len(set(ids)))})",
                                    sorted(set(ids))).fetchall())
        return torch.from_numpy(self.slots.read([rows[i] for i in ids]))


def store_revision(path: str | Path) -> int | None:
    """The store's write counter read straight from SQLite (no index load): a cheap cache key."""
    db = Path(path) / DB_NAME
    if not db.is_file():
        return None
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            row = con.execute("SELECT value FROM meta WHERE key='revision'").fetchone()
        finally:
            con.close()
    except sqlite3.Error:
        return None
    return int(row[0]) if row else None


def build_or_update(path: str | Path, embedder: Embedder, folder: str | Path, owner: str = "",
                    visibility: str = "private", progress: Progress | None = None) -> tuple[ImageStore, AddReport, bool]:
    """Add ``folder`` to the store at ``path``, creating it if needed: (store, report, created).

    A new store is built entirely in a hidden sibling folder and renamed into place only when
    the add succeeded, so a failed or cancelled first build leaves no store behind.
    """
    path = Path(path)
    if (path / DB_NAME).is_file():  # opening it sweeps what killed first builds left beside it
        store = ImageStore(path, embedder)
        try:
            return store, store.add_folder(folder, owner=owner, visibility=visibility, progress=progress), False
        except BaseException:
            store.close()
            raise
    if path.exists():
        raise StoreError(f"'{path}' exists and is not an image store.", "pick another store name.", "store")
    sweep_abandoned_builds(path.parent)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.building")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        store = ImageStore.create(tmp, embedder)
        try:
            store.set_default_owner(owner)
            report = store.add_folder(folder, owner=owner, visibility=visibility, progress=progress)
        finally:
            store.close()
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ImageStore(path, embedder), report, True
