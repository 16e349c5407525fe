"""Which backend a store lives in, from what names it: a folder, or a PostgreSQL database.

    ref = StoreRef.parse("models/retrieval_stores/my-images")             # folder: SQLite + faiss
    ref = StoreRef.parse("studio", db="postgresql://me@db:5432/images")   # a store in a database
    ref = StoreRef.parse("models/retrieval_stores/studio.pgstore.json")   # the same, from a config file
    with ref.open(embedder) as store: ...

A ``.pgstore.json`` config (what the nodes read from ``models/retrieval_stores``) is
``{"url": "postgresql://user@host:5432/database", "store": "studio"}``, plus
``"images_folder": "/mnt/shared/studio-images"`` for a store that keeps its image copies in a
shared folder instead of the database (as this machine mounts it; a relative path is taken from
the config's folder). It may not hold a password: libpq takes it from ``PGPASSWORD`` or
``~/.pgpass``, so workflows, configs and logs never carry one.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from .embed import Embedder
from .items import AddReport, Progress, StoreError
from .pgstore import PgImageStore, check_name, has_password, is_url, pg_revision, redact
from .store import ImageStore, build_or_update, store_revision

PG_CONFIG_SUFFIX = ".pgstore.json"


def read_pg_config(path: str | Path) -> tuple[str, str, str | None]:
    """(url, store name, images folder or None) of a ``.pgstore.json`` config; refuses a password
    written into it."""
    path = Path(path)
    try:
        cfg = json.loads(path.read_text())
        url, name = cfg["url"], cfg.get("store") or path.name.removesuffix(PG_CONFIG_SUFFIX)
        images = cfg.get("images_folder")
        if images is not None and not isinstance(images, str):
            raise TypeError("images_folder must be a path")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise StoreError(f"'{path.name}' is not a store config ({type(exc).__name__}: {exc}).",
                         'write {"url": "postgresql://user@host:5432/database", "store": "name"}.', "store") from None
    if not is_url(url):
        raise StoreError(f"'{path.name}': url must start with postgresql://.", "", "store")
    if has_password(url):
        raise StoreError(f"'{path.name}' has a password in its URL ({redact(url)}).",
                         "remove it and put it in PGPASSWORD or ~/.pgpass of the user running ComfyUI.", "store")
    if images:
        images = str((path.parent / Path(images).expanduser()).resolve())
    return url, check_name(name), images or None


@dataclass(frozen=True)
class StoreRef:
    """A store's address: a folder (``path``) or a database (``url`` + ``name``, and ``images``: the
    shared folder of its copies, for a store that keeps them outside the database)."""

    path: str | None = None
    url: str | None = None
    name: str | None = None
    images: str | None = None

    @classmethod
    def parse(cls, ref: str | Path, db: str | None = None, images: str | None = None) -> StoreRef:
        if db:
            if not is_url(db):
                raise StoreError(f"--db '{redact(db)}' is not a PostgreSQL URL.",
                                 "give postgresql://user@host:port/database.", "db")
            return cls(url=db, name=check_name(str(ref)), images=images)
        if str(ref).endswith(PG_CONFIG_SUFFIX):
            url, name, from_config = read_pg_config(ref)
            return cls(url=url, name=name, images=images or from_config)
        if images:
            raise StoreError("--images-folder is for a store in PostgreSQL; a folder store keeps its copies "
                             "in its own folder.", "drop --images-folder, or give --db.", "images_folder")
        return cls(path=str(ref))

    @property
    def label(self) -> str:
        return f"{self.name} in {redact(self.url)}" if self.url else Path(self.path).name

    def open(self, embedder: Embedder | None = None) -> ImageStore | PgImageStore:
        if self.url:
            return PgImageStore(self.url, self.name, embedder, images_folder=self.images)
        return ImageStore(self.path, embedder)

    def revision(self) -> int | None:
        """The write counter (a cheap cache key), None when the store does not exist or is unreachable."""
        return pg_revision(self.url, self.name) if self.url else store_revision(self.path)

    def build_or_update(self, embedder: Embedder, folder: str | Path, owner: str = "", visibility: str = "private",
                        progress: Progress | None = None) -> tuple[ImageStore | PgImageStore, AddReport, bool]:
        """Add ``folder``, creating the store first if needed: (store, report, created). A first build
        that fails leaves no store behind, on either backend."""
        if not self.url:
            return build_or_update(self.path, embedder, folder, owner=owner, visibility=visibility, progress=progress)
        created = False
        if not PgImageStore.exists(self.url, self.name):
            try:
                store = PgImageStore.create(self.url, self.name, embedder, images_folder=self.images)
                created = True
            except StoreError as exc:  # another worker created it meanwhile: add to theirs
                if "already exists" not in str(exc):
                    raise
        if not created:
            store = PgImageStore(self.url, self.name, embedder, images_folder=self.images)
            try:
                return store, store.add_folder(folder, owner=owner, visibility=visibility, progress=progress), False
            except BaseException:
                store.close()
                raise
        try:
            report = store.add_folder(folder, owner=owner, visibility=visibility, progress=progress)
            store.set_default_owner(owner)
        except BaseException:
            try:  # undo the creation, unless another worker has written to the store meanwhile
                store.drop(only_if_unwritten=True)
            except Exception:  # noqa: BLE001 - the add's error is the one to report
                store.close()
            raise
        return store, report, True
