"""The image store on PostgreSQL + pgvector: the same API and guarantees as :class:`.store.ImageStore`,
shared by every process and machine that can reach the database.

One store is one schema (``compartments_<name>``) in a database the URL names::

    store = PgImageStore.create("postgresql://me@db:5432/images", "studio", embedder)
    store = PgImageStore("postgresql://me@db:5432/images", "studio", embedder)

Tables: ``items`` (one row per image, its unit embedding in a ``vector(dim)`` column), ``images``
(the stored copy as ``bytea``, TOASTed; ``ON DELETE CASCADE`` from its item), ``forgotten``
(content hashes never to re-add) and ``meta`` (config, write counters, default owner).

Image copies live in the database by default. A store created with ``images_folder`` keeps them
as files in a folder every worker mounts (``<sha256>.<ext>``, beside a marker naming the store),
with a table ``unlinks``: a forget records the copies to delete in its own transaction, deletes
them right after the commit, and a deletion that fails (the folder unreachable, a permission)
stays recorded and is retried at every later add or forget and by :meth:`cleanup`.

Why it is exact: a row and its vector are one tuple, and the copy is deleted by the same
statement's cascade, so one ``COMMIT`` makes an item, its vector and its copy appear or disappear
together; no reader (any process, any machine) sees one without the others, and a query that
starts after a forget commits runs on a snapshot without the item. There is no in-memory index to
rebuild on open: kNN is SQL (``ORDER BY embedding <=> q``), exact by default, or through an HNSW
index when the store was created with ``index="hnsw"`` (approximate: see :meth:`query`).

What a forget leaves (PostgreSQL's own behaviour, measured in tests/unit/test_pgstore.py): no
query, on any connection, can see the item after the commit. On disk, the deleted tuples stay in
their heap and TOAST pages until ``VACUUM`` prunes them, and pruning frees the space without zeroing
it: the row's bytes (hash, source path, vector) can remain in the table files until new rows
overwrite them. Each forget runs ``VACUUM`` on the store's two tables right after its commit (a
failed vacuum is reported in :attr:`last_vacuum`, never undoes the forget); :meth:`compact`
(``VACUUM FULL``) rewrites the tables without them. The write-ahead log keeps the bytes until its
segments are recycled, and backups and replicas are the operator's (README, "Retrieval store").

Passwords are never taken from a workflow or written anywhere: libpq reads them from
``PGPASSWORD`` or ``~/.pgpass``; every URL this module prints has its password removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
import torch

from ..atomic import write_bytes
from .common import COLS as _COLS
from .common import StoreCommon
from .credits import check_ref
from .embed import Embedder
from .images import decode_image, fit, write_copies
from .items import VISIBILITIES, AddReport, Hit, Item, Progress, StoreError

FORMAT_VERSION = 1
SCHEMA_PREFIX = "compartments_"
NAME_RE = re.compile(r"[a-z][a-z0-9_]{0,47}")
INDEXES = ("exact", "hnsw")
HNSW_EF_SEARCH = 100  # candidates an HNSW scan keeps (pgvector's hnsw.ef_search; its default is 40)
HNSW_BUILD_MEM = "1GB"  # maintenance_work_mem for building an HNSW index
HNSW_EF_MAX = 1000  # pgvector's limit for hnsw.ef_search: larger k is answered exactly

_TABLES = """
CREATE TABLE {s}.meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE {s}.items(
    id BIGSERIAL PRIMARY KEY,
    sha256 TEXT COLLATE "C" NOT NULL UNIQUE,
    path TEXT NOT NULL,
    file TEXT NOT NULL,
    owner TEXT NOT NULL,
    visibility TEXT NOT NULL CHECK (visibility IN ('private', 'public')),
    added DOUBLE PRECISION NOT NULL,
    width INTEGER NOT NULL,
    height INTEGER NOT NULL,
    embedding vector({dim}) STORAGE PLAIN NOT NULL
);
CREATE INDEX ON {s}.items(visibility, owner);
CREATE TABLE {s}.images(item BIGINT PRIMARY KEY REFERENCES {s}.items(id) ON DELETE CASCADE, data BYTEA NOT NULL);
CREATE TABLE {s}.forgotten(sha256 TEXT COLLATE "C" PRIMARY KEY, at DOUBLE PRECISION NOT NULL);
"""
# A store whose copies are files in a shared folder: the copies its forgets still have to delete.
_UNLINKS = """
CREATE TABLE {s}.unlinks(sha256 TEXT COLLATE "C" PRIMARY KEY, file TEXT NOT NULL, at DOUBLE PRECISION NOT NULL,
                         tries INTEGER NOT NULL DEFAULT 0, error TEXT)
"""
MARKER = ".compartments-store.json"  # in an images folder: which store's copies it holds


def is_url(ref: str | Path) -> bool:
    return isinstance(ref, str) and ref.startswith(("postgresql://", "postgres://"))


def redact(url: str) -> str:
    """The URL without its password, in the user part or a ``password=`` parameter (what errors and
    summaries show)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "postgresql://(unparseable URL)"
    netloc = parts.netloc
    if "@" in netloc:
        userinfo, host = netloc.rsplit("@", 1)
        user, has_password, _ = userinfo.partition(":")
        netloc = f"{user}:***@{host}" if has_password else f"{user}@{host}"
    query = "&".join("password=***" if p.lower().startswith("password=") else p for p in parts.query.split("&")) \
        if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def has_password(url: str) -> bool:
    """Does the URL carry a password (``user:pw@`` or ``?password=``)?"""
    try:
        parts = urlsplit(url)
    except ValueError:
        return True
    userinfo = parts.netloc.rsplit("@", 1)[0] if "@" in parts.netloc else ""
    return bool(userinfo.partition(":")[2]) or any(p.lower().startswith("password=") for p in parts.query.split("&"))


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise StoreError(f"'{name}' is not a usable store name for PostgreSQL.",
                         "use lower-case letters, digits and '_', starting with a letter (at most 48).", "store")
    return name


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise StoreError("the PostgreSQL store needs the psycopg package, which is not installed.",
                         "pip install 'psycopg[binary]' into ComfyUI's Python (or use a folder store).",
                         "store") from None
    return psycopg


def _schema_exists(conn: Any, name: str) -> bool:
    """Does the database on ``conn`` hold store ``name`` (its schema)?"""
    return conn.execute("SELECT 1 FROM pg_namespace WHERE nspname=%s", (SCHEMA_PREFIX + name,)).fetchone() is not None


def _vec_text(v: np.ndarray) -> str:
    """pgvector's text form of a float32 row; 9 significant digits round-trip a float32 exactly."""
    return "[" + ",".join(f"{x:.9g}" for x in np.asarray(v, dtype=np.float32).tolist()) + "]"


def _vec_parse(text: str) -> np.ndarray:
    return np.array(json.loads(text), dtype=np.float32)


class PgImageStore(StoreCommon):
    """A store in a PostgreSQL database; see the module docstring for the layout and guarantees."""

    backend_name = "postgresql"

    def __init__(self, url: str, name: str, embedder: Embedder | None = None, vacuum: bool = True,
                 images_folder: str | Path | None = None) -> None:
        self.url, self.name = url, check_name(name)
        self.schema = f'"{SCHEMA_PREFIX}{name}"'
        self.path = Path(name)  # what credit records and reports show as the store's name
        self.vacuum = vacuum
        self.last_vacuum: str | None = None
        self.last_cleanup: str | None = None
        self.conn = self._connect(url)
        try:
            self._require_vector()
            if not self._exists():
                raise StoreError(f"there is no image store '{name}' in {redact(url)}.",
                                 "build it first (store build --db URL, or Build Image Store with a "
                                 f"{name}.pgstore.json config).", "store")
            self.config = json.loads(self._meta("config"))
            if int(self.config.get("format_version", 0)) != FORMAT_VERSION:
                raise StoreError(f"store '{name}' has format {self.config.get('format_version')}, not {FORMAT_VERSION}.",
                                 "rebuild the store with this version.", "store")
            self.dim = int(self.config["dim"])
            self.index_kind = self.config.get("index", "exact")
            self.images_dir = self._images_dir(images_folder)
            self._embedder = embedder
            if embedder is not None:
                self._check_embedder(embedder)
        except BaseException:
            self.conn.close()
            raise

    # -- connection ---------------------------------------------------------------------------
    @staticmethod
    def _connect(url: str) -> Any:
        psycopg = _psycopg()
        try:
            return psycopg.connect(url, autocommit=True, connect_timeout=10)
        except psycopg.Error as exc:
            msg = " ".join(str(exc).split())
            raise StoreError(f"cannot connect to the store's database {redact(url)}: {redact(msg)[:300]}",
                             "check the URL (host, port, database, user), that the server is running, and the "
                             "password in PGPASSWORD or ~/.pgpass (never in the URL of a workflow).", "store") from None

    @contextmanager
    def _tx(self, what: str, read_only: bool = False) -> Iterator[Any]:
        """One transaction: a read is one REPEATABLE READ snapshot; a write is READ COMMITTED and holds
        the store's writer lock (:meth:`_lock`). A broken connection is a clear error."""
        psycopg = _psycopg()
        try:
            with self.conn.transaction():
                if read_only:
                    self.conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
                else:
                    self.conn.execute("SET TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    self._lock()
                yield self.conn
        except psycopg.OperationalError as exc:
            why = " ".join(str(exc).split())[:200]
            if self.conn.broken or self.conn.closed:
                raise StoreError(f"the connection to {redact(self.url)} was lost during {what} ({why}); PostgreSQL "
                                 "rolls back a transaction whose connection breaks, so nothing of it was committed "
                                 "(unless the break came during the COMMIT itself: list the store to check).",
                                 "retry when the database is reachable.", "store") from None
            raise StoreError(f"the database refused {what} ({why}); it was rolled back, nothing was committed.",
                             "retry; if it persists, ask the database's operator.", "store") from None

    def _lock(self) -> None:
        """The store's writer lock, until the transaction ends: adds, forgets and visibility changes of
        all processes take turns, so an add's re-check of forgotten hashes cannot race a forget."""
        self.conn.execute("SELECT pg_advisory_xact_lock(%s)", (self._lock_key,))

    @property
    def _lock_key(self) -> int:
        return int.from_bytes(hashlib.sha256(self.schema.encode()).digest()[:8], "big", signed=True)

    def _require_vector(self) -> None:
        row = self.conn.execute("SELECT extversion FROM pg_extension WHERE extname='vector'").fetchone()
        if row is None:
            raise StoreError(f"the database {redact(self.url)} has no pgvector extension.",
                             "run CREATE EXTENSION vector; in it (as a superuser or the database owner), or use "
                             "a server with pgvector installed.", "store")

    def _exists(self) -> bool:
        return _schema_exists(self.conn, self.name)

    def _meta(self, key: str) -> str:
        row = self.conn.execute(f"SELECT value FROM {self.schema}.meta WHERE key=%s", (key,)).fetchone()
        if row is None:
            raise StoreError(f"store '{self.name}' has no '{key}' record.", "rebuild the store.", "store")
        return row[0]

    def _images_dir(self, images_folder: str | Path | None) -> Path | None:
        """Where this store's copies are: None (in the database), or its shared folder, checked."""
        uid = self.config.get("images_uid")
        if uid is None:
            if images_folder:
                raise StoreError(f"store '{self.name}' keeps its image copies in the database, not in a folder.",
                                 "remove images_folder (from the .pgstore.json config or --images-folder).", "store")
            return None
        if not images_folder:
            raise StoreError(f"store '{self.name}' keeps its image copies in a shared folder, and none was given.",
                             "name the folder as this machine mounts it: images_folder in the store's .pgstore.json "
                             "config, or --images-folder.", "store")
        folder = Path(images_folder).expanduser()
        try:
            marker = json.loads((folder / MARKER).read_text())
        except (OSError, ValueError) as exc:
            raise StoreError(f"'{folder}' is not the image folder of store '{self.name}': no readable {MARKER} "
                             f"in it ({type(exc).__name__}).",
                             "give the folder the store was built with, as this machine mounts it.", "store") from None
        if marker.get("uid") != uid:
            raise StoreError(f"'{folder}' holds the copies of another store ('{marker.get('store')}'), not of "
                             f"'{self.name}'.", "give the folder this store was built with.", "store")
        return folder

    @staticmethod
    def _claim_folder(folder: Path, name: str, url: str) -> str:
        """Mark ``folder`` as the new store's image folder (refused if another store's); its uid."""
        folder.mkdir(parents=True, exist_ok=True)
        if (folder / MARKER).exists():
            try:
                other = json.loads((folder / MARKER).read_text()).get("store", "?")
            except (OSError, ValueError):
                other = "?"
            raise StoreError(f"'{folder}' is already the image folder of store '{other}'.",
                             "give each store a folder of its own.", "images_folder")
        uid = uuid.uuid4().hex
        write_bytes(folder / MARKER, json.dumps({"store": name, "database": redact(url), "uid": uid}).encode())
        return uid

    @classmethod
    def create(cls, url: str, name: str, embedder: Embedder, index: str = "exact",
               images_folder: str | Path | None = None) -> PgImageStore:
        """Make a new empty store in the database (one transaction: all of it or nothing).

        ``images_folder``: keep the image copies as files there (a folder every worker mounts)
        instead of in the database.
        """
        check_name(name)
        if index not in INDEXES:
            raise StoreError(f"unknown index '{index}'.", f"use one of {INDEXES}.", "index")
        conn = cls._connect(url)
        psycopg = _psycopg()
        schema = f'"{SCHEMA_PREFIX}{name}"'
        try:
            if conn.execute("SELECT 1 FROM pg_extension WHERE extname='vector'").fetchone() is None:
                try:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
                except psycopg.Error:
                    raise StoreError(f"the database {redact(url)} has no pgvector extension and this user may "
                                     "not create it.", "run CREATE EXTENSION vector; in it as a superuser.",
                                     "store") from None
            config = {"format_version": FORMAT_VERSION, "backend": "postgresql", "index": index,
                      "created": time.time(), "model": embedder.describe(), "dim": embedder.dim}
            if images_folder:
                if _schema_exists(conn, name):
                    raise StoreError(f"a store named '{name}' already exists in {redact(url)}.",
                                     "open it, or pick another name.", "store")
                config["images_uid"] = cls._claim_folder(Path(images_folder).expanduser(), name, url)
            try:
                with conn.transaction():
                    conn.execute(f"CREATE SCHEMA {schema}")
                    tables = _TABLES + (_UNLINKS if images_folder else "")
                    for stmt in filter(str.strip, tables.format(s=schema, dim=embedder.dim).split(";")):
                        conn.execute(stmt)
                    if index == "hnsw":
                        conn.execute(f"CREATE INDEX items_embedding_hnsw ON {schema}.items USING hnsw "
                                     "(embedding vector_cosine_ops)")
                    conn.execute(f"INSERT INTO {schema}.meta(key, value) VALUES (%s, %s), ('generation', '0'), "
                                 "('revision', '0')", ("config", json.dumps(config)))
            except (psycopg.errors.DuplicateSchema, psycopg.errors.UniqueViolation):  # (two creators at once)
                raise StoreError(f"a store named '{name}' already exists in {redact(url)}.",
                                 "open it, or pick another name.", "store") from None
            except BaseException:
                if images_folder:  # the folder's claim goes with the store that was not made
                    (Path(images_folder).expanduser() / MARKER).unlink(missing_ok=True)
                raise
        finally:
            conn.close()
        return cls(url, name, embedder, images_folder=images_folder)

    @classmethod
    def exists(cls, url: str, name: str) -> bool:
        """Is there a store ``name`` in the database (a database without pgvector has none)?"""
        conn = cls._connect(url)
        try:
            return _schema_exists(conn, check_name(name))
        finally:
            conn.close()

    def drop(self, only_if_unwritten: bool = False) -> bool:
        """Delete the whole store (schema, rows, vectors, copies) in one transaction; True if dropped.

        ``only_if_unwritten``: only while nothing was ever committed to it (revision 0) - what a failed
        first build undoes, never a store other workers have started to use meanwhile.
        """
        files: list[str] = []
        with self._tx("dropping the store"):
            if only_if_unwritten and self.revision != 0:
                dropped = False
            else:
                if self.images_dir is not None:
                    files = [r[0] for r in self.conn.execute(
                        f"SELECT file FROM {self.schema}.items UNION SELECT file FROM {self.schema}.unlinks")]
                self.conn.execute(f"DROP SCHEMA {self.schema} CASCADE")
                dropped = True
        self.close()
        if dropped and self.images_dir is not None:  # after the commit: the copies, then the folder's claim
            for f in files:
                (self.images_dir / f).unlink(missing_ok=True)
            (self.images_dir / MARKER).unlink(missing_ok=True)
        return dropped

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> PgImageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {self.schema}.items").fetchone()[0])

    @property
    def generation(self) -> int:
        return int(self._meta("generation"))

    @property
    def revision(self) -> int:
        return int(self._meta("revision"))

    # -- the embedder ---------------------------------------------------------------------------
    def _check_embedder(self, embedder: Embedder) -> None:
        want = self.config["model"]
        if embedder.dim != self.dim or embedder.sha256 != want["weights_sha256"]:
            raise StoreError(
                f"store '{self.name}' was built with '{want['weights']}' ({want['name']}, {self.dim}-d, sha256 "
                f"{want['weights_sha256'][:12]}); '{embedder.weights.name}' ({embedder.dim}-d) is a different model "
                "and its vectors are not comparable.", f"use '{want['weights']}' or build a new store.", "weights")

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            raise StoreError("this store was opened without an embedder, which text/image queries and adds need.",
                             f"open it with the weights '{self.config['model']['weights']}'.", "weights")
        return self._embedder

    def _bump(self, vectors: bool) -> None:
        keys = ["revision", "generation"] if vectors else ["revision"]
        self.conn.execute(f"UPDATE {self.schema}.meta SET value=(value::bigint + 1)::text WHERE key = ANY(%s)", (keys,))

    # -- writes ---------------------------------------------------------------------------------
    def add_files(self, files: Sequence[str | Path], owner: str = "", visibility: str = "private",
                  progress: Progress | None = None, allow_forgotten: bool = False) -> AddReport:
        """Add images: skips and reports corrupt, duplicate and forgotten files; the rest are embedded
        (``progress`` per batch; raising from it cancels with nothing written) and committed in one
        transaction with their copies."""
        if visibility not in VISIBILITIES:
            raise StoreError(f"visibility '{visibility}' is not one of {VISIBILITIES}.", "", "visibility")
        report = AddReport()
        staged = self._stage(files, report)
        kept = self._new_only(staged, self._known([s["sha"] for s in staged]), allow_forgotten, report)
        kept, vecs = self._embed_staged(kept, progress, report)
        if kept:
            self._retry_unlinks()
            psycopg = _psycopg()
            for attempt in range(3):
                try:
                    report.added = self._insert(kept, vecs, owner, visibility, allow_forgotten, report)
                    break
                except psycopg.errors.UniqueViolation:  # another process added one of these meanwhile: re-check
                    if attempt == 2:
                        raise StoreError("other processes kept adding the same images meanwhile.", "retry the add.",
                                         "store") from None
        return report

    def _known(self, shas: list[str]) -> dict[str, str]:
        if not shas:
            return {}
        out = {r[0]: "forgotten" for r in self.conn.execute(
            f"SELECT sha256 FROM {self.schema}.forgotten WHERE sha256 = ANY(%s)", (shas,))}
        out.update({r[0]: "stored" for r in self.conn.execute(
            f"SELECT sha256 FROM {self.schema}.items WHERE sha256 = ANY(%s)", (shas,))})
        return out

    def _insert(self, staged: list[dict], vecs: np.ndarray, owner: str, visibility: str, allow_forgotten: bool,
                report: AddReport) -> list[int]:
        """One transaction: rows with their vectors, then their copies; items another process added or
        forgot meanwhile are skipped and reported, never duplicated or brought back."""
        now = time.time()
        skipped = len(report.skipped)
        with self._tx("the add"):
            del report.skipped[skipped:]  # a retried attempt reports afresh
            # under the writer lock, and READ COMMITTED gives this statement a fresh snapshot: a forget or add
            # another process committed while this one was embedding is seen here, and none can commit until
            # this transaction ends
            known = self._known([s["sha"] for s in staged])
            todo = [(s, v) for s, v in zip(staged, vecs, strict=True)
                    if known.get(s["sha"]) is None or (known[s["sha"]] == "forgotten" and allow_forgotten)]
            for s, _ in zip(staged, vecs, strict=True):
                if known.get(s["sha"]) == "stored":
                    report.skipped.append((s["path"], "duplicate: added meanwhile by another process"))
                elif known.get(s["sha"]) == "forgotten" and not allow_forgotten:
                    report.skipped.append((s["path"], "forgotten meanwhile by another process: not added"))
            if not todo:
                return []
            ids = [r[0] for r in self.conn.execute(
                "SELECT nextval(pg_get_serial_sequence(%s, 'id')) FROM generate_series(1, %s)",
                (f"{self.schema}.items", len(todo)))]
            written = self._write_copies([s for s, _ in todo])  # under the writer lock (see _write_copies)
            try:
                with self.conn.cursor() as cur:
                    with cur.copy(f"COPY {self.schema}.items(id, sha256, path, file, owner, visibility, added, "
                                  "width, height, embedding) FROM STDIN") as copy:
                        for i, (s, v) in zip(ids, todo, strict=True):
                            copy.write_row((i, s["sha"], s["path"], s["file"], owner, visibility, now, s["width"],
                                            s["height"], _vec_text(v)))
                    if self.images_dir is None:
                        with cur.copy(f"COPY {self.schema}.images(item, data) FROM STDIN") as copy:
                            for i, (s, _) in zip(ids, todo, strict=True):
                                copy.write_row((i, s["data"]))
                if allow_forgotten:
                    self.conn.execute(f"DELETE FROM {self.schema}.forgotten WHERE sha256 = ANY(%s)",
                                      ([s["sha"] for s, _ in todo],))
                self._bump(vectors=True)
            except BaseException:
                # still under the lock, so no other writer can have taken these files as its own; with the
                # connection gone the lock is too, and the files stay for cleanup() (it deletes only copies
                # no item names), as they do when the COMMIT itself fails
                if not self.conn.broken:
                    for f in written:
                        f.unlink(missing_ok=True)
                raise
        return ids

    def _write_copies(self, staged: list[dict]) -> list[Path]:
        """The copies of a folder store, each written atomically unless already there; the files
        written. Called under the writer lock: a cleanup (which also takes it) never sees a copy
        whose item is not committed yet."""
        if self.images_dir is None:
            return []
        try:
            return write_copies(self.images_dir, [(s["file"], s["data"]) for s in staged])
        except OSError as exc:
            raise StoreError(f"cannot write image copies into the store's folder {self.images_dir}: "
                             f"{exc.strerror or exc}; nothing was added.",
                             "check that the folder is mounted, writable and has space.", "store") from None

    def _exists_ref(self, ref: int | str) -> bool:
        ref = check_ref(ref, "ids")
        if isinstance(ref, int):
            sql, arg = f"SELECT 1 FROM {self.schema}.items WHERE id=%s", ref
        else:
            return self.conn.execute(f"SELECT 1 FROM {self.schema}.items WHERE sha256 >= %s AND sha256 < %s LIMIT 1",
                                     (ref, ref + "g")).fetchone() is not None
        return self.conn.execute(sql, (arg,)).fetchone() is not None

    def _resolve(self, refs: Iterable[int | str], field_name: str) -> list[int]:
        """Ids or sha256 hex strings (full, or a unique prefix of 8+) -> existing row ids."""
        out: list[int] = []
        for raw in refs:
            ref = check_ref(raw, field_name)
            if isinstance(ref, int):
                if self.conn.execute(f"SELECT 1 FROM {self.schema}.items WHERE id=%s", (ref,)).fetchone() is None:
                    raise StoreError(f"no item with id {ref} in the store.", "list the store to see the ids it holds.",
                                     field_name)
                out.append(ref)
                continue
            # a hex prefix as a range: the "C"-collated unique index serves it (LIKE would scan)
            rows = self.conn.execute(f"SELECT id FROM {self.schema}.items WHERE sha256 >= %s AND sha256 < %s LIMIT 2",
                                     (ref, ref + "g")).fetchall()
            if len(rows) != 1:
                raise StoreError(f"sha256 '{ref}' matches {len(rows)} items.",
                                 "give the full hash or an id." if rows else "list the store to see its hashes.",
                                 field_name)
            out.append(int(rows[0][0]))
        return sorted(set(out))

    def forget(self, refs: Iterable[int | str], missing_ok: bool = False) -> list[Item]:
        """Delete items by id or sha256: row, vector and stored copy in one transaction, then VACUUM.

        ``missing_ok`` makes a repeated request for an item already gone a no-op (requests get retried).
        """
        refs = list(refs)
        if not refs:
            raise StoreError("nothing to forget: no ids or hashes given.", "give ids or sha256 hashes.", "ids")
        if missing_ok:
            refs = [r for r in refs if self._exists_ref(r)]
            if not refs:
                return []
        ids = self._resolve(refs, "ids")
        with self._tx("the forget"):
            rows = self.conn.execute(f"DELETE FROM {self.schema}.items WHERE id = ANY(%s) RETURNING {_COLS}",
                                     (ids,)).fetchall()
            if len(rows) != len(ids):
                if not missing_ok:
                    raise StoreError("some of these items were forgotten meanwhile (another process).",
                                     "list the store and retry.", "ids")
            if rows:
                now = time.time()
                self.conn.execute(f"INSERT INTO {self.schema}.forgotten(sha256, at) SELECT unnest(%s::text[]), %s "
                                  "ON CONFLICT (sha256) DO UPDATE SET at = EXCLUDED.at", ([r[1] for r in rows], now))
                if self.images_dir is not None:  # recorded with the delete: the copies go right after the commit
                    self.conn.execute(f"INSERT INTO {self.schema}.unlinks(sha256, file, at) SELECT unnest(%s::text[]), "
                                      "unnest(%s::text[]), %s ON CONFLICT (sha256) DO NOTHING",
                                      ([r[1] for r in rows], [r[8] for r in rows], now))
                self._bump(vectors=True)
        self._retry_unlinks()  # this forget's copies, and any an earlier one could not delete
        if rows and self.vacuum:
            self._vacuum()
        by_id = {r[0]: Item(*r) for r in rows}
        return [by_id[i] for i in ids if i in by_id]

    def _retry_unlinks(self) -> int:
        """Delete the copies forgets recorded and have not deleted yet; the number still pending.

        Under the writer lock. A copy whose image was added again meanwhile (``allow_forgotten``)
        belongs to that item and stays. A deletion that fails stays recorded, with its error in
        :attr:`last_cleanup`, and is retried at the next add or forget, or by :meth:`cleanup`.
        """
        if self.images_dir is None:
            return 0
        if self.conn.execute(f"SELECT 1 FROM {self.schema}.unlinks LIMIT 1").fetchone() is None:
            return 0
        failed: list[tuple[str, str]] = []
        with self._tx("the deletion of forgotten copies"):
            rows = self.conn.execute(
                f"SELECT u.sha256, u.file, EXISTS (SELECT 1 FROM {self.schema}.items i WHERE i.sha256 = u.sha256) "
                f"FROM {self.schema}.unlinks u").fetchall()
            done = []
            for sha, file, in_use in rows:
                try:
                    if not in_use:
                        (self.images_dir / file).unlink(missing_ok=True)
                    done.append(sha)
                except OSError as exc:
                    failed.append((sha, f"{type(exc).__name__}: {exc.strerror or exc}"))
            self.conn.execute(f"DELETE FROM {self.schema}.unlinks WHERE sha256 = ANY(%s)", (done,))
            for sha, why in failed:
                self.conn.execute(f"UPDATE {self.schema}.unlinks SET tries = tries + 1, error = %s WHERE sha256 = %s",
                                  (why, sha))
        self.last_cleanup = (f"{len(failed)} forgotten image copies could not be deleted from {self.images_dir} "
                             f"yet ({failed[0][1]}); they are recorded and retried at the next add or forget, "
                             "or by store cleanup." if failed else None)
        return len(failed)

    def cleanup(self) -> dict:
        """Finish what failures left in a folder store: retry the recorded deletions of forgotten
        copies, and delete copies no item names (an add whose connection broke before its commit).
        Returns {"pending": copies still to delete, "orphans": stray copies deleted}."""
        if self.images_dir is None:
            return {"pending": 0, "orphans": 0}
        pending = self._retry_unlinks()
        orphans = 0
        with self._tx("the sweep of the image folder"):  # under the lock: no add is between its copies and commit
            names = [e.name for e in os.scandir(self.images_dir) if e.is_file() and not e.name.startswith(".")]
            for start in range(0, len(names), 10_000):
                chunk = names[start:start + 10_000]
                named = {r[0] for r in self.conn.execute(
                    f"SELECT file FROM {self.schema}.items WHERE sha256 = ANY(%s)",
                    ([n.split(".", 1)[0] for n in chunk],))}
                for n in chunk:
                    if n not in named:
                        (self.images_dir / n).unlink(missing_ok=True)
                        orphans += 1
        return {"pending": pending, "orphans": orphans}

    def _vacuum(self) -> None:
        """Remove the dead tuples the forget left (heap and TOAST pages); outside any transaction."""
        psycopg = _psycopg()
        try:
            self.conn.execute(f"VACUUM {self.schema}.images, {self.schema}.items")
            self.last_vacuum = None
        except psycopg.Error as exc:  # the forget is committed; the dead tuples wait for autovacuum
            self.last_vacuum = f"VACUUM after the forget failed: {' '.join(str(exc).split())[:200]}"

    def add_index(self, kind: str = "hnsw") -> None:
        """Build an HNSW index over the embeddings of an existing store (queries then use it)."""
        if kind != "hnsw":
            raise StoreError(f"unknown index '{kind}'.", "use 'hnsw'.", "index")
        with self._tx("building the index"):
            # the build is fast only while the graph fits maintenance_work_mem (64 MB by default: about
            # 25k 512-d vectors); this transaction allows more, the server's own limits still apply
            self.conn.execute(f"SET LOCAL maintenance_work_mem = '{HNSW_BUILD_MEM}'")
            self.conn.execute(f"CREATE INDEX IF NOT EXISTS items_embedding_hnsw ON {self.schema}.items "
                              "USING hnsw (embedding vector_cosine_ops)")
            self.config["index"] = kind
            self.conn.execute(f"UPDATE {self.schema}.meta SET value=%s WHERE key='config'", (json.dumps(self.config),))
        self.index_kind = kind

    def compact(self) -> None:
        """Rewrite the store's tables without the dead tuples of forgotten items (VACUUM FULL).

        A plain VACUUM (what every forget runs) makes their space reusable but does not zero it: the
        row's bytes (hash, source path, vector) and the copy's TOAST chunks can stay in the table files
        until new rows overwrite them. This rewrites ``items`` and ``images`` into new files and deletes
        the old ones; it takes the tables' exclusive lock for a time proportional to the store's size.
        """
        psycopg = _psycopg()
        self.cleanup()
        try:
            self.conn.execute(f"VACUUM FULL {self.schema}.images, {self.schema}.items")
        except psycopg.OperationalError as exc:
            raise StoreError(f"the connection to {redact(self.url)} was lost during the compaction "
                             f"({' '.join(str(exc).split())[:200]}); the tables are as they were.",
                             "retry when the database is reachable.", "store") from None

    def set_visibility(self, refs: Iterable[int | str], visibility: str) -> list[int]:
        if visibility not in VISIBILITIES:
            raise StoreError(f"visibility '{visibility}' is not one of {VISIBILITIES}.", "", "visibility")
        ids = self._resolve(refs, "ids")
        with self._tx("the visibility change"):
            self.conn.execute(f"UPDATE {self.schema}.items SET visibility=%s WHERE id = ANY(%s)", (visibility, ids))
            self._bump(vectors=False)
        return ids

    # -- reads (get, list and the owner rules are StoreCommon's) -------------------------------
    _P = "%s"

    def _t(self, table: str) -> str:
        return f"{self.schema}.{table}"

    def _rows(self, sql: str, args: Sequence[Any] = ()) -> list[tuple]:
        cur = self.conn.execute(sql, list(args) or None)
        return cur.fetchall() if cur.description else []

    def summary(self) -> dict:
        with self._tx("the summary", read_only=True):  # one snapshot for every figure
            return self._summary()

    def _summary(self) -> dict:
        counts = dict(self.conn.execute(
            f"SELECT visibility, COUNT(*) FROM {self.schema}.items GROUP BY visibility").fetchall())
        return {"path": self.name, "backend": "postgresql", "database": redact(self.url), "index": self.index_kind,
                "items": len(self), "public": counts.get("public", 0), "private": counts.get("private", 0),
                "model": self.config["model"]["name"], "weights": self.config["model"]["weights"], "dim": self.dim,
                "generation": self.generation,
                "forgotten": int(self.conn.execute(f"SELECT COUNT(*) FROM {self.schema}.forgotten").fetchone()[0]),
                "copies": "database" if self.images_dir is None else str(self.images_dir),
                **({} if self.images_dir is None else {"copies_to_delete": int(self.conn.execute(
                    f"SELECT COUNT(*) FROM {self.schema}.unlinks").fetchone()[0])})}

    def query(self, text: str | None = None, image: torch.Tensor | None = None, k: int = 4,
              visibility: str = "private", owner: str | None = None, exact: bool | None = None) -> list[Hit]:
        """The ``k`` nearest items (cosine) with the given visibility, from one snapshot.

        Exact (a scan) unless the store has an HNSW index and ``exact`` is not True. HNSW trades
        recall for speed: it returns the nearest of about ``HNSW_EF_SEARCH`` candidates it visits,
        which need not be the true top-k; with a visibility / owner filter it may find fewer than
        ``k``, and then the query is answered exactly instead.
        """
        if k < 1:
            raise StoreError(f"k={k}: ask for at least one image.", "set k >= 1.", "k")
        return self.query_by_vector(self.query_vector(text, image)[0], k, visibility, owner, exact)

    def query_by_vector(self, vector: np.ndarray, k: int = 4, visibility: str = "private",
                        owner: str | None = None, exact: bool | None = None) -> list[Hit]:
        """:meth:`query` for an embedding already computed (a unit vector of the store's dimension)."""
        if k < 1:
            raise StoreError(f"k={k}: ask for at least one image.", "set k >= 1.", "k")
        q = _vec_text(vector)
        where, args = self._scope(visibility, owner)
        approximate = self.index_kind == "hnsw" and exact is not True and k <= HNSW_EF_MAX
        with self._tx("the query", read_only=True):
            rows: list = []
            if approximate:
                sql, params = self._knn(q, where, args, k, approximate=True)
                rows = self.conn.execute(sql, params).fetchall()
            if len(rows) < k:  # exact: no index, or HNSW's candidates held too few visible items
                self.conn.execute("SET LOCAL enable_indexscan = off")
                rows = self.conn.execute(*self._knn(q, where, args, k, approximate=False)).fetchall()
            if len(rows) < k:  # fewer visible items than asked: say which (counted only then)
                self._too_few(k, visibility, where, args)
        return [Hit(*r[:9], score=float(r[9])) for r in rows]

    def _knn(self, q: str, where: str, args: list, k: int, approximate: bool) -> tuple[str, list]:
        """The kNN statement and its parameters.

        Approximate: the index's ``ef`` nearest of *all* items, then the visibility / owner filter
        on those, then the best k. Written so, the inner ``ORDER BY ... LIMIT`` has no filter and
        the planner serves it from the HNSW index; with the filter inside, it took the (visibility,
        owner) index and sorted every visible row instead (measured at 100k: no faster than a scan).
        Exact: every visible row, ties ordered by id.
        """
        if not approximate:
            return (f"SELECT {_COLS}, 1 - (embedding <=> %s::vector) FROM {self.schema}.items {where} "
                    "ORDER BY embedding <=> %s::vector, id LIMIT %s", [q, *args, q, k])
        ef = min(HNSW_EF_MAX, max(HNSW_EF_SEARCH, k))
        self.conn.execute(f"SET LOCAL hnsw.ef_search = {ef}")
        return (f"SELECT {_COLS}, 1 - d FROM (SELECT {_COLS}, embedding <=> %s::vector AS d FROM {self.schema}.items "
                f"ORDER BY embedding <=> %s::vector LIMIT %s) AS candidates {where} ORDER BY d LIMIT %s",
                [q, q, ef, *args, k])

    def explain(self, vector: np.ndarray, k: int = 4, visibility: str = "private", owner: str | None = None) -> str:
        """PostgreSQL's plan for the first query :meth:`query_by_vector` runs (approximate on an HNSW
        store): what an operator checks to see whether the index serves the store's queries."""
        where, args = self._scope(visibility, owner)
        with self._tx("the plan", read_only=True):
            sql, params = self._knn(_vec_text(vector), where, args, k, approximate=self.index_kind == "hnsw")
            rows = self.conn.execute("EXPLAIN " + sql, params).fetchall()
        return "\n".join(r[0] for r in rows)

    def _too_few(self, k: int, visibility: str, where: str, args: list) -> None:
        total = len(self)
        if total == 0:
            raise StoreError("the store is empty.", "add images to it first.", "store")
        visible = int(self.conn.execute(f"SELECT COUNT(*) FROM {self.schema}.items {where}", args).fetchone()[0])
        whose = f" of owner {args[0]!r}" if args else ""
        if visible == 0:
            raise StoreError(f"the store holds {total} images but none is {visibility}{whose}.",
                             "mark some images " + visibility + ", change the visibility filter or the owner.",
                             "visibility")
        raise StoreError(f"k={k} but only {visible} {'' if visibility == 'all' else visibility + ' '}images"
                         f"{whose} are in the store.", f"set k <= {visible}.", "k")

    def load_images(self, hits: Sequence[Item], size: tuple[int, int] | None = None) -> torch.Tensor:
        """Stored copies as one ComfyUI IMAGE [B, H, W, 3] float 0..1 (cover-resized to one size)."""
        if not hits:
            raise StoreError("no hits to load.", "query with k >= 1 first.", "hits")
        imgs = []
        for h, blob in zip(hits, self._copies(hits), strict=True):
            if blob is None:
                raise StoreError(f"image {h.id} ({h.sha256[:12]}) is no longer in the store.",
                                 "query again: it was forgotten.", "hits")
            imgs.append(decode_image(blob)[0])
        th, tw = size or tuple(imgs[0].shape[:2])
        return torch.stack([fit(im, th, tw) for im in imgs])

    def _copies(self, hits: Sequence[Item]) -> list[bytes | None]:
        """Each hit's stored copy (None: gone), from the database or the store's folder."""
        if self.images_dir is None:
            data = dict(self.conn.execute(f"SELECT item, data FROM {self.schema}.images WHERE item = ANY(%s)",
                                          ([h.id for h in hits],)).fetchall())
            return [bytes(data[h.id]) if h.id in data else None for h in hits]
        live = {r[0] for r in self.conn.execute(f"SELECT id FROM {self.schema}.items WHERE id = ANY(%s)",
                                                ([h.id for h in hits],))}
        out: list[bytes | None] = []
        for h in hits:
            try:
                out.append((self.images_dir / h.file).read_bytes() if h.id in live else None)
            except FileNotFoundError:
                out.append(None)
        return out

    def image_embeddings(self, ids: Sequence[int]) -> torch.Tensor:
        """Stored unit image embeddings [N, dim] float32 for these ids (in that order)."""
        ids = [int(i) for i in ids]
        self.get(ids)
        if not ids:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        rows = dict(self.conn.execute(f"SELECT id, embedding::text FROM {self.schema}.items WHERE id = ANY(%s)",
                                      (sorted(set(ids)),)).fetchall())
        missing = [i for i in ids if i not in rows]
        if missing:  # forgotten between the two reads (another process)
            raise StoreError(f"ids {missing} are not in the store (forgotten or never added).", "", "ids")
        return torch.from_numpy(np.stack([_vec_parse(rows[i]) for i in ids]))


def pg_revision(url: str, name: str) -> int | None:
    """The store's write counter, one short query (a cache key for nodes); None if there is no such
    store. An unreachable database is a StoreError (a cache key must not say "unchanged" then)."""
    psycopg = _psycopg()
    schema = SCHEMA_PREFIX + check_name(name)
    try:
        with psycopg.connect(url, autocommit=True, connect_timeout=5) as conn:
            if not _schema_exists(conn, name):
                return None
            row = conn.execute(f'SELECT value FROM "{schema}".meta WHERE key=%s', ("revision",)).fetchone()
    except psycopg.Error as exc:
        raise StoreError(f"cannot read store '{name}' in {redact(url)}: {redact(' '.join(str(exc).split()))[:200]}",
                         "check that the database is reachable.", "store") from None
    return int(row[0]) if row else None
