"""Tier 1: the same store semantics on both backends (a folder: SQLite + faiss; PostgreSQL + pgvector).

Every test here runs three times, on the tiny open_clip model: a folder store, a PostgreSQL store
with its image copies in the database, and one with them in a shared folder. The PostgreSQL server is
real (``pgserver``: PostgreSQL 16 + pgvector in this run's temp folder); backend-specific behaviour
(slot files, crash recovery; lost connections, VACUUM) has its own tests beside.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
import torch

from compartments.retrieval import Embedder, StoreError, StoreRef, attribution
from compartments.tiny import retrieval as tiny_retrieval

BACKENDS = ["folder", "postgresql", "postgresql-shared-folder"]
_names = itertools.count()


@pytest.fixture(params=BACKENDS)
def make(request, tmp_path):
    """``make(tag) -> StoreRef``: a new, not yet created store on this test's backend."""
    made: list[StoreRef] = []

    def new(tag: str = "s") -> StoreRef:
        n = next(_names)
        if request.param == "folder":
            ref = StoreRef(path=str(tmp_path / f"{tag}{n}"))
        else:
            images = str(tmp_path / f"{tag}{n}-copies") if request.param.endswith("folder") else None
            ref = StoreRef(url=request.getfixturevalue("pg_server").url, name=f"t_{tag}_{n}", images=images)
        made.append(ref)
        return ref

    def ref_of(s) -> StoreRef:
        """The address another process would open ``s`` by."""
        if request.param == "folder":
            return StoreRef(path=str(s.path))
        return StoreRef(url=s.url, name=s.name, images=str(s.images_dir) if s.images_dir else None)

    new.backend = request.param
    new.ref_of = ref_of
    yield new
    for ref in made:
        if ref.url:
            from compartments.retrieval.pgstore import PgImageStore

            try:
                PgImageStore(ref.url, ref.name, images_folder=ref.images).drop()
            except StoreError:
                pass


@pytest.fixture
def store(make, embedder, folder):
    s, _, _ = make().build_or_update(embedder, folder, owner="alice")
    yield s
    s.close()


def _img(i: int) -> torch.Tensor:
    return torch.from_numpy(tiny_retrieval.image_array(i)).float() / 255


def test_build_from_a_folder_skips_bad_files_and_duplicates(store, folder):
    assert len(store) == tiny_retrieval.IMAGE_COUNT
    s = store.summary()
    assert s["private"] == tiny_retrieval.IMAGE_COUNT and s["public"] == 0
    again = store.add_folder(folder)
    reasons = {p.split("/")[-1]: r for p, r in again.skipped}
    assert again.added == []
    assert "not a readable image" in reasons["broken.png"] and "not a readable image" in reasons["notes.txt"]
    assert reasons["img_00.png"].startswith("duplicate")
    item = store.list()[0]
    assert item.owner == "alice" and item.path.endswith("img_00.png") and len(item.sha256) == 64
    assert store.default_owner() == "alice"


def test_retrieve_by_image_and_text_ranks_by_cosine(store):
    hits = store.query(image=_img(3), k=3, visibility="private")
    assert hits[0].path.endswith("img_03.png") and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    text_hits = store.query(text="a blue and green gradient", k=len(store), visibility="all")
    q = store.query_vector(text="a blue and green gradient")[0]
    emb = store.image_embeddings([h.id for h in text_hits]).numpy()
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose([h.score for h in text_hits], emb @ q, atol=1e-5)
    imgs = store.load_images(hits)
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == torch.float32
    torch.testing.assert_close(imgs[0], _img(3), atol=1e-6, rtol=0)


def test_both_backends_return_the_same_hits(embedder, folder, pg_server, tmp_path):
    a, _, _ = StoreRef(path=str(tmp_path / "a")).build_or_update(embedder, folder, owner="o")
    b, _, _ = StoreRef(url=pg_server.url, name="t_same_hits").build_or_update(embedder, folder, owner="o")
    try:
        for q in [{"image": _img(i)} for i in range(tiny_retrieval.IMAGE_COUNT)] + [{"text": "a gradient"}]:
            ha, hb = a.query(k=4, visibility="all", **q), b.query(k=4, visibility="all", **q)
            assert [h.sha256 for h in ha] == [h.sha256 for h in hb]
            np.testing.assert_allclose([h.score for h in ha], [h.score for h in hb], atol=1e-5)
    finally:
        a.close()
        b.drop()


def test_forgotten_images_never_come_back(store, embedder, folder, make):
    target = store.query(image=_img(1), k=1, visibility="all")[0]
    by_hash = store.query(image=_img(4), k=1, visibility="all")[0]
    store.forget([target.id])
    store.forget([by_hash.sha256[:16]])
    gone = {target.id, by_hash.id}
    assert store.forget([target.id], missing_ok=True) == []  # a repeated request is a no-op
    with pytest.raises(StoreError, match="no item with id"):
        store.forget([target.id])

    def never_returned(s) -> None:
        n = len(s)
        assert n == tiny_retrieval.IMAGE_COUNT - 2
        for q in [{"image": _img(i)} for i in range(tiny_retrieval.IMAGE_COUNT)] + [{"text": "x"}]:
            for vis in ("all", "private"):
                assert not gone & {h.id for h in s.query(k=n, visibility=vis, **q)}
        assert not gone & {it.id for it in s.list()}
        with pytest.raises(StoreError, match="not in the store"):
            s.image_embeddings([target.id])
        with pytest.raises(StoreError, match="no longer in the store"):
            s.load_images([target])

    never_returned(store)
    if make.backend == "postgresql-shared-folder":  # the copies left the folder with the commit
        names = {p.name for p in store.images_dir.iterdir()}
        assert target.file not in names and by_hash.file not in names and len(names) == len(store) + 1  # + marker
        assert store.summary()["copies_to_delete"] == 0
    with make.ref_of(store).open(embedder) as reopened:
        never_returned(reopened)
        report = reopened.add_folder(folder)  # a rebuild does not bring them back
        assert report.added == [] and sum("forgotten earlier" in r for _, r in report.skipped) == 2
        readded = reopened.add_files([target.path], allow_forgotten=True, owner="alice").added
        assert readded and readded[0] > max(gone)  # ids are never reused
        assert reopened.summary()["forgotten"] == 1


def test_visibility_and_owners(make, embedder, folder):
    store, _, created = make().build_or_update(embedder, folder, owner="alice")
    with store:
        assert created
        moved = store.list()[-3:]
        store.forget([it.id for it in moved])
        bob = store.add_files([it.path for it in moved], owner="bob", allow_forgotten=True).added
        store.set_visibility([store.list("private")[0].id], "public")
        alice_private = {it.id for it in store.list("private") if it.owner == "alice"}
        public = {it.id for it in store.list("public")}
        for q in [{"image": _img(i)} for i in range(3)] + [{"text": "x"}]:
            assert not set(bob) & {h.id for h in store.query(k=len(alice_private), visibility="private", **q)}
            assert {h.id for h in store.query(k=len(alice_private | public), visibility="all", **q)} == \
                alice_private | public
            assert {h.id for h in store.query(k=3, visibility="private", owner="bob", **q)} == set(bob)
            assert {h.id for h in store.query(k=1, visibility="public", **q)} == public
        with pytest.raises(StoreError, match="only 3 private images of owner 'bob'"):
            store.query(text="x", k=4, visibility="private", owner="bob")
        with pytest.raises(StoreError, match="none is private of owner 'mallory'"):
            store.query(text="x", k=1, visibility="private", owner="mallory")
        with pytest.raises(StoreError, match="not one of"):
            store.set_visibility([1], "secret")


def test_credit_record_names_what_was_retrieved(store):
    hits = store.query(image=_img(2), k=2, visibility="all")
    record = attribution(hits, store)
    assert [e["sha256"] for e in record["items"]] == [h.sha256 for h in hits]
    assert record["store"] and record["model"] == store.config["model"]["name"]
    assert all(e["owner"] == "alice" and "score" in e for e in record["items"])


def test_query_errors_and_other_models(store, make, embedder):
    with pytest.raises(StoreError, match="only 6 private images") as err:
        store.query(text="x", k=7)
    assert err.value.field == "k"
    with pytest.raises(StoreError, match="none is public"):
        store.query(text="x", k=1, visibility="public")
    with pytest.raises(StoreError, match="exactly one query"):
        store.query(text="x", image=_img(0), k=1)
    with pytest.raises(StoreError, match="at least one"):
        store.query(text="x", k=0)
    other = Embedder(tiny_retrieval.clip_weights(seed=1))
    with pytest.raises(StoreError, match="different model"):
        make.ref_of(store).open(other)


def test_a_cancelled_add_leaves_nothing(make, embedder, folder, tmp_path):
    ref = make("cancel")

    def cancel(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ref.build_or_update(embedder, folder, progress=cancel)
    assert ref.revision() is None
    with pytest.raises(StoreError, match="not an image store|no image store"):
        ref.open(embedder)
    if ref.images:  # no copy and no claim on the folder stays behind
        assert list(Path(ref.images).iterdir()) == []
    store, report, created = ref.build_or_update(embedder, folder)
    with store:
        assert created and len(report.added) == tiny_retrieval.IMAGE_COUNT
        before = (len(store), store.revision)
        from PIL import Image

        new = tmp_path / "new.png"
        Image.fromarray(tiny_retrieval.image_array(40)).save(new)
        with pytest.raises(KeyboardInterrupt):
            store.add_files([new], progress=cancel)
        assert (len(store), store.revision) == before and ref.revision() == before[1]
        if ref.images:
            assert len(list(Path(ref.images).iterdir())) == len(store) + 1
        assert store.add_files([new]).added  # and nothing half-added blocks it
