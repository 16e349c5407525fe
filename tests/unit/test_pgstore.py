"""Tier 1: what only the PostgreSQL store does: connections, extensions, names, lost connections,
what a forget leaves in the database files, HNSW, and several processes at once (real pgserver)."""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from compartments.retrieval import Embedder, PgImageStore, StoreError, StoreRef
from compartments.retrieval.backends import read_pg_config
from compartments.retrieval.pgstore import redact
from compartments.tiny import retrieval as tiny_retrieval


@pytest.fixture
def url(pg_server):
    return pg_server.url


def _fresh(url: str, name: str, embedder, folder, **kw) -> PgImageStore:
    if PgImageStore.exists(url, name):
        PgImageStore(url, name).drop()
    store, _, _ = StoreRef(url=url, name=name).build_or_update(embedder, folder, owner="alice", **kw)
    return store


def _sql(url: str, query: str, *args):
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(query, args or None)
        return cur.fetchall() if cur.description else None


def _img(i: int) -> torch.Tensor:
    return torch.from_numpy(tiny_retrieval.image_array(i)).float() / 255


def test_unreachable_url_is_a_clear_error_without_the_password():
    with pytest.raises(StoreError) as err:
        PgImageStore("postgresql://me:sekrit@127.0.0.1:1/images", "studio")
    msg = str(err.value)
    assert "cannot connect" in msg and "127.0.0.1" in msg and "sekrit" not in msg and err.value.field == "store"
    assert redact("postgresql://me:sekrit@host/db") == "postgresql://me:***@host/db"
    for leaky in ("postgresql://me:pa@ss@host/db", "postgresql://me:pa/ss@host/db",
                  "postgresql://me@host/db?sslmode=require&password=sekrit"):
        assert "ss@" not in redact(leaky).split("@")[0] and "sekrit" not in redact(leaky), redact(leaky)
    with pytest.raises(StoreError) as err:
        PgImageStore("postgresql://me@127.0.0.1:1/images?password=sekrit", "studio")
    assert "sekrit" not in str(err.value)


def test_a_database_without_pgvector_and_a_missing_store(url):
    _sql(url, "DROP DATABASE IF EXISTS noext")
    _sql(url, "CREATE DATABASE noext")
    noext = url.replace("/postgres?", "/noext?")
    with pytest.raises(StoreError, match="no pgvector extension"):
        PgImageStore(noext, "studio")
    _sql(url, "CREATE EXTENSION IF NOT EXISTS vector")
    with pytest.raises(StoreError, match="no image store 'nothing_here'"):
        PgImageStore(url, "nothing_here")
    with pytest.raises(StoreError, match="not a usable store name"):
        PgImageStore(url, "Robert'); DROP TABLE")
    _sql(url, "DROP DATABASE noext")


def test_two_stores_with_one_name_are_refused(url, embedder, folder):
    store = _fresh(url, "twice", embedder, folder)
    with pytest.raises(StoreError, match="already exists"):
        PgImageStore.create(url, "twice", embedder)
    assert len(store) == tiny_retrieval.IMAGE_COUNT  # the first one is untouched
    store.drop()


def test_config_files_never_hold_a_password(tmp_path, url):
    cfg = tmp_path / "studio.pgstore.json"
    cfg.write_text(json.dumps({"url": "postgresql://me:sekrit@db:5432/images", "store": "studio"}))
    with pytest.raises(StoreError, match="password in its URL") as err:
        read_pg_config(cfg)
    assert "sekrit" not in str(err.value)
    cfg.write_text(json.dumps({"url": "postgresql://me@db:5432/images"}))
    assert read_pg_config(cfg) == ("postgresql://me@db:5432/images", "studio", None)
    cfg.write_text("{nope")
    with pytest.raises(StoreError, match="not a store config"):
        read_pg_config(cfg)


def _kill(url: str, pid: int) -> None:
    _sql(url, "SELECT pg_terminate_backend(%s)", pid)


def test_a_connection_lost_mid_build_commits_nothing(url, embedder, folder, tmp_path):
    store = _fresh(url, "lost_add", embedder, folder)
    before = _sql(url, 'SELECT (SELECT count(*) FROM "compartments_lost_add".items), '
                       '(SELECT count(*) FROM "compartments_lost_add".images)')
    from PIL import Image

    new = [tmp_path / f"n{i}.png" for i in range(3)]
    for i, p in enumerate(new):
        Image.fromarray(tiny_retrieval.image_array(30 + i)).save(p)
    with pytest.raises(StoreError, match="was lost during the add .*nothing of it was committed"):
        store.add_files(new, progress=lambda d, t: _kill(url, store.conn.info.backend_pid))
    assert _sql(url, 'SELECT (SELECT count(*) FROM "compartments_lost_add".items), '
                     '(SELECT count(*) FROM "compartments_lost_add".images)') == before
    with PgImageStore(url, "lost_add", embedder) as again:
        assert len(again.add_files(new).added) == 3
        again.drop()


def test_a_connection_lost_mid_forget_leaves_the_item_whole(url, embedder, folder, monkeypatch):
    store = _fresh(url, "lost_forget", embedder, folder)
    victim = store.list()[0]
    monkeypatch.setattr(store, "_bump", lambda vectors: _kill(url, store.conn.info.backend_pid))
    with pytest.raises(StoreError, match="lost during the forget"):
        store.forget([victim.id])  # the DELETE ran inside the transaction; the commit never came
    with PgImageStore(url, "lost_forget", embedder) as again:
        assert victim.id in {it.id for it in again.list()}
        assert again.load_images([victim]).shape[0] == 1 and again.image_embeddings([victim.id]).shape == (1, 64)
        assert again.forget([victim.id])[0].id == victim.id
        again.drop()



# ---------------------------------------------------------------- copies in a shared folder
def _shared(url: str, name: str, embedder, folder, copies: Path) -> PgImageStore:
    if PgImageStore.exists(url, name):
        PgImageStore(url, name, images_folder=copies).drop()
    store, _, _ = StoreRef(url=url, name=name, images=str(copies)).build_or_update(embedder, folder, owner="alice")
    return store


def _copies(store: PgImageStore) -> set[str]:
    return {p.name for p in store.images_dir.iterdir() if not p.name.startswith(".")}


def test_a_shared_folder_store_is_opened_only_with_its_folder(url, embedder, folder, tmp_path):
    copies = tmp_path / "copies"
    store = _shared(url, "shared_open", embedder, folder, copies)
    assert _copies(store) == {it.file for it in store.list()} and store.summary()["copies"] == str(copies)
    assert _sql(url, 'SELECT count(*) FROM "compartments_shared_open".images') == [(0,)]  # none in the database
    with pytest.raises(StoreError, match="in a shared folder, and none was given"):
        PgImageStore(url, "shared_open")
    with pytest.raises(StoreError, match=f"'{tmp_path}' is not the image folder .*no readable"):
        PgImageStore(url, "shared_open", images_folder=tmp_path)
    with pytest.raises(StoreError, match="already the image folder of store 'shared_open'"):
        PgImageStore.create(url, "shared_other", embedder, images_folder=copies)
    other = PgImageStore.create(url, "shared_other", embedder, images_folder=tmp_path / "other")
    with pytest.raises(StoreError, match="holds the copies of another store \\('shared_other'\\)"):
        PgImageStore(url, "shared_open", images_folder=tmp_path / "other")
    other.drop()
    assert not (tmp_path / "other" / ".compartments-store.json").exists()
    bytea = _fresh(url, "shared_bytea", embedder, folder)
    with pytest.raises(StoreError, match="in the database, not in a folder"):
        PgImageStore(url, "shared_bytea", images_folder=copies)
    bytea.drop()
    cfg = tmp_path / "shared_open.pgstore.json"  # what a worker's node reads: the folder relative to the config
    cfg.write_text(json.dumps({"url": url, "images_folder": "copies"}))
    with StoreRef.parse(str(cfg)).open(embedder) as again:
        hit = again.query(image=_img(2), k=1, visibility="all")[0]
        torch.testing.assert_close(again.load_images([hit])[0], _img(2), atol=1e-6, rtol=0)
    store.drop()
    assert list(copies.iterdir()) == []  # the copies and the folder's claim went with the store


def test_a_failed_deletion_is_recorded_retried_and_never_shows_the_item(url, embedder, folder, tmp_path, monkeypatch):
    copies = tmp_path / "copies"
    store = _shared(url, "shared_retry", embedder, folder, copies)
    victim, readded = store.list()[:2]
    real_unlink = Path.unlink

    def refuse(self, missing_ok=False):
        if self.parent == copies:
            raise PermissionError(13, "Permission denied")
        return real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)  # the shared folder refuses deletions (read-only mount, ACL)
    assert [g.id for g in store.forget([victim.id, readded.id])] == [victim.id, readded.id]
    assert "2 forgotten image copies could not be deleted" in store.last_cleanup
    assert store.summary()["copies_to_delete"] == 2 and {victim.file, readded.file} <= _copies(store)
    assert _sql(url, 'SELECT tries, error FROM "compartments_shared_retry".unlinks ORDER BY sha256') == \
        [(1, "PermissionError: Permission denied")] * 2
    # the forget is committed all the same: no query, list or load returns them
    with PgImageStore(url, "shared_retry", embedder, images_folder=copies) as other:
        n = len(other)
        for q in [{"image": _img(i)} for i in range(tiny_retrieval.IMAGE_COUNT)]:
            assert not {victim.id, readded.id} & {h.id for h in other.query(k=n, visibility="all", **q)}
        with pytest.raises(StoreError, match="no longer in the store"):
            other.load_images([victim])
    monkeypatch.undo()
    # one of them is added again on purpose before the retry: its copy is the new item's, and stays
    new_id = store.add_files([readded.path], owner="alice", allow_forgotten=True).added[0]
    assert store.last_cleanup is None and store.summary()["copies_to_delete"] == 0
    assert victim.file not in _copies(store) and readded.file in _copies(store)
    assert store.load_images(store.get([new_id])).shape[0] == 1
    store.drop()


def test_adds_that_fail_leave_no_copies_and_cleanup_sweeps_strays(url, embedder, folder, tmp_path, monkeypatch):
    from PIL import Image

    from compartments.retrieval import pgstore

    copies = tmp_path / "copies"
    store = _shared(url, "shared_fail", embedder, folder, copies)
    before = _copies(store)
    new = [tmp_path / f"n{i}.png" for i in range(3)]
    for i, p in enumerate(new):
        Image.fromarray(tiny_retrieval.image_array(30 + i)).save(p)

    def broken(v):
        raise ValueError("a row the database refused")

    monkeypatch.setattr(pgstore, "_vec_text", broken)  # fails after the copies are written, before the commit
    with pytest.raises(ValueError, match="refused"):
        store.add_files(new)
    monkeypatch.undo()
    assert _copies(store) == before and len(store) == tiny_retrieval.IMAGE_COUNT
    # the connection breaks before the commit: the lock went with it, so the copy stays, as a stray
    monkeypatch.setattr(store, "_bump", lambda vectors: _kill(url, store.conn.info.backend_pid))
    with pytest.raises(StoreError, match="lost during the add"):
        store.add_files(new[:1])
    monkeypatch.undo()
    with PgImageStore(url, "shared_fail", embedder, images_folder=copies) as again:
        assert len(again) == tiny_retrieval.IMAGE_COUNT and len(_copies(again)) == len(before) + 1
        assert again.cleanup() == {"pending": 0, "orphans": 1}
        assert _copies(again) == before
        assert again.add_files(new).added and len(_copies(again)) == len(before) + 3
        again.drop()


def _relation_bytes(url: str, data: Path, *tables: str) -> bytes:
    """The on-disk bytes of tables (heap + TOAST, every segment), after a CHECKPOINT wrote every page."""
    _sql(url, "CHECKPOINT")
    out = b""
    for t in tables:
        ((heap, toast),) = _sql(url, "SELECT pg_relation_filepath(%s::regclass), pg_relation_filepath(reltoastrelid) "
                                     "FROM pg_class WHERE oid = %s::regclass", t, t)
        for rel in filter(None, (heap, toast)):
            for seg in sorted((data / rel).parent.glob((data / rel).name + "*")):
                out += seg.read_bytes()
    return out


def test_what_a_forget_leaves_in_the_table_files_and_compact(url, embedder, folder, pg_server, tmp_path):
    """No query sees a forgotten item; on disk, VACUUM frees its tuples' space without zeroing it, so
    its hash can stay in the heap file (as the README states); compact() rewrites the tables and then
    neither its hash, its vector nor its image bytes are in any of the store's table files."""
    from PIL import Image

    big = tmp_path / "big.png"  # a copy large enough to be TOASTed (stored out of line, in chunks)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(big)
    store = _fresh(url, "vacuum", embedder, folder)
    (new_id,) = store.add_files([big]).added
    sha = store.get([new_id])[0].sha256.encode()
    vector = store.image_embeddings([new_id])[0].numpy().astype("<f4").tobytes()
    data = big.read_bytes()
    probe = data[len(data) // 2: len(data) // 2 + 64]  # PNG data is incompressible: stored as is
    tables = ('"compartments_vacuum".items', '"compartments_vacuum".images')
    files = _relation_bytes(url, pg_server.data, *tables)
    assert probe in files and sha in files and vector in files  # the check sees them while they are stored
    store.forget([new_id])
    assert store.last_vacuum is None  # the forget's VACUUM ran
    assert not store.conn.execute(f"SELECT 1 FROM {store.schema}.items WHERE sha256 = %s", (sha.decode(),)).fetchone()
    left = _relation_bytes(url, pg_server.data, *tables)
    assert sha in left, "VACUUM zeroed the dead row: the README's statement about PostgreSQL is out of date"
    store.compact()
    files = _relation_bytes(url, pg_server.data, *tables)
    assert probe not in files and sha not in files and vector not in files
    assert len(store.list()) == tiny_retrieval.IMAGE_COUNT  # the live items are all still there
    store.drop()


def test_hnsw_store_agrees_with_exact(url, embedder, folder):
    if PgImageStore.exists(url, "hnsw"):
        PgImageStore(url, "hnsw").drop()
    store = PgImageStore.create(url, "hnsw", embedder, index="hnsw")
    store.add_folder(folder, owner="alice")
    q = np.full(64, 0.125, dtype=np.float32)
    store.conn.execute("SET enable_seqscan = off")  # six rows: make the planner use the index, as at scale
    for vis in ("all", "private", "public"):  # the store's own query, under its visibility / owner filter
        assert "items_embedding_hnsw" in store.explain(q, 3, vis), store.explain(q, 3, vis)
    for i in range(tiny_retrieval.IMAGE_COUNT):
        approx = [h.id for h in store.query(image=_img(i), k=3, visibility="all")]
        exact = [h.id for h in store.query(image=_img(i), k=3, visibility="all", exact=True)]
        assert approx == exact
    assert store.summary()["index"] == "hnsw"
    store.drop()


# -- several processes on one store ----------------------------------------------------------------
def _worker(role: str, url: str, name: str, weights: str, paths: list[str], out: str,
            images_folder: str | None = None) -> None:
    """One process on the shared store; logs what it did with CLOCK_MONOTONIC times (system-wide)."""
    torch.set_num_threads(1)
    emb = Embedder(weights)
    log = []
    with PgImageStore(url, name, emb, images_folder=images_folder) as store:
        if role == "adder":
            for p in paths:
                log.append({"added": store.add_files([p], owner="alice", allow_forgotten=True).added})
        elif role == "forgetter":
            for _ in range(len(paths)):
                items = store.list()
                if items:
                    gone = store.forget([items[-1].id], missing_ok=True)  # returns after its COMMIT
                    log.append({"forgot": [g.id for g in gone], "committed": time.monotonic()})
        else:
            for _ in range(4 * len(paths)):
                started = time.monotonic()
                try:
                    hits = store.query(image=torch.rand(1, 32, 32, 3), k=2, visibility="all")
                except StoreError as exc:  # the store may be briefly too small for k
                    log.append({"error": str(exc)})
                    continue
                log.append({"started": started, "hits": [h.id for h in hits]})
                try:  # the copies too (a hit forgotten since the query is a clear error, never a wrong image)
                    store.load_images(hits)
                except StoreError as exc:
                    assert "no longer in the store" in str(exc), exc
    Path(out).write_text(json.dumps(log))


@pytest.mark.parametrize("copies", ["database", "shared folder"])
def test_several_processes_add_forget_and_query_one_store(url, embedder, folder, tmp_path, copies):
    from PIL import Image

    images = str(tmp_path / "copies") if copies == "shared folder" else None
    if images:
        store = _shared(url, "shared", embedder, folder, Path(images))
    else:
        store = _fresh(url, "shared", embedder, folder)
    store.close()
    paths = []
    for i in range(8):
        p = tmp_path / f"c{i}.png"
        Image.fromarray(tiny_retrieval.image_array(60 + i)).save(p)
        paths.append(str(p))
    ctx = mp.get_context("spawn")
    outs = {r: str(tmp_path / f"{r}.json") for r in ("adder", "forgetter", "querier")}
    procs = [ctx.Process(target=_worker, args=(r, url, "shared", str(tiny_retrieval.clip_weights()), paths, o, images))
             for r, o in outs.items()]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
        assert p.exitcode == 0, f"a worker failed (exit {p.exitcode})"
    logs = {r: json.loads(Path(o).read_text()) for r, o in outs.items()}
    committed = {i: e["committed"] for e in logs["forgetter"] for i in e["forgot"]}
    added = {i for e in logs["adder"] for i in e["added"]}
    queries = [e for e in logs["querier"] if "hits" in e]
    assert len(added) == 8 and committed and queries
    for q in queries:  # a query that started after a forget committed never returned that item
        late = [i for i in q["hits"] if i in committed and q["started"] > committed[i]]
        assert not late, (q, {i: committed[i] for i in late})
    with PgImageStore(url, "shared", embedder, images_folder=images) as s:
        live = s.list()
        assert not {it.id for it in live} & set(committed)  # every committed forget stuck
        # every row has its vector and its copy; no vector or copy without its row
        rows, vectors = s.conn.execute(f"SELECT count(*), count(embedding) FROM {s.schema}.items").fetchone()
        if images:
            files = {f.name for f in Path(images).iterdir() if not f.name.startswith(".")}
            assert files == {it.file for it in live} and s.summary()["copies_to_delete"] == 0
            n_copies = len(files)
        else:
            n_copies = s.conn.execute(f"SELECT count(*) FROM {s.schema}.images").fetchone()[0]
        assert rows == vectors == n_copies == len(live) == tiny_retrieval.IMAGE_COUNT + len(added) - len(committed)
        s.drop()
