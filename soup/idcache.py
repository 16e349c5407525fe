"""Member ids computed once per file version: a small cache keyed by path, size, mtime and inode.

Hashing a member (sha256 over its souped tensors) costs a full read of its diffusion model;
a second soup over the same files, or a remove of a member already hashed, need not pay it
again. An entry is used only while the file's size, mtime (ns), inode and device are what
they were when it was hashed: replacing or rewriting the file changes at least one of them,
and the id is then recomputed from the bytes. Ids are a function of the bytes and of which
tensors are souped (``what``: the components), so the cache can never change a result, only
skip a read; a lost or corrupt cache file is ignored and rewritten.

Where: ``$COMPARTMENTS_ID_CACHE`` if set, else ``$XDG_CACHE_HOME/compartments/member-ids.json``
(``~/.cache/...``). ``COMPARTMENTS_ID_CACHE=off`` disables it.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path

from ..atomic import write_text

MAX_ENTRIES = 4096
_lock = threading.Lock()


def cache_file() -> Path | None:
    env = os.environ.get("COMPARTMENTS_ID_CACHE")
    if env == "off":
        return None
    if env:
        return Path(env)
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "compartments" / "member-ids.json"


def _version(path: str | os.PathLike) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _load(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def lookup(path: str | os.PathLike, what: str) -> str | None:
    """The cached id of ``path`` for ``what`` when the file is the version that was hashed."""
    file = cache_file()
    version = _version(path)
    if file is None or version is None:
        return None
    entry = _load(file).get(os.path.realpath(path))
    if not isinstance(entry, dict) or entry.get("version") != version:
        return None
    got = entry.get("ids", {}).get(what)
    return got if isinstance(got, str) and len(got) == 64 else None


def store(path: str | os.PathLike, what: str, digest: str, version: list[int] | None = None) -> None:
    """Remember ``digest`` for this version of ``path`` (``version``: as stat'ed before it was read).

    Best effort: a cache that cannot be written is skipped, never an error.
    """
    file = cache_file()
    version = version or _version(path)
    if file is None or version is None or version != _version(path):  # changed while it was read
        return
    with _lock:
        data = _load(file)
        key = os.path.realpath(path)
        entry = data.pop(key, None)
        if not isinstance(entry, dict) or entry.get("version") != version:
            entry = {"version": version, "ids": {}}
        entry["ids"][what] = digest
        data[key] = entry  # insertion order: newest last
        while len(data) > MAX_ENTRIES:
            data.pop(next(iter(data)))
        try:
            write_text(file, json.dumps(data))
        except OSError:
            pass


def version_of(path: str | os.PathLike) -> list[int] | None:
    """The file version an id would be stored under (stat it before reading the bytes)."""
    return _version(path)


class CachedId:
    """One file's id under ``what`` for one read: the cached id, or a sha256 to feed while reading.

    The file is stat'ed first (the version the id is stored under), then looked up; after the
    read, :meth:`remember` stores a computed id unless the file changed meanwhile.
    """

    def __init__(self, path: str | os.PathLike, what: str) -> None:
        self.path, self.what = path, what
        self.version = version_of(path)
        self.known = lookup(path, what)
        self.hasher = None if self.known else hashlib.sha256()

    def digest(self) -> str:
        return self.known or self.hasher.hexdigest()

    def remember(self) -> None:
        if self.hasher is not None:
            store(self.path, self.what, self.hasher.hexdigest(), self.version)
