"""Tier 1: the image store on a tiny open_clip model (no ComfyUI)."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from compartments.retrieval import (
    Embedder,
    EmbedderError,
    ImageStore,
    StoreError,
    build_or_update,
    parse_refs,
)
from compartments.retrieval.slots import SlotFile
from compartments.retrieval.store import DB_NAME, VECTORS_NAME
from compartments.tiny import retrieval as tiny_retrieval


@pytest.fixture
def store(tmp_path, embedder, folder):
    s = ImageStore.create(tmp_path / "store", embedder)
    s.add_folder(folder, owner="alice")
    yield s
    s.close()


def _img(i: int) -> torch.Tensor:
    return torch.from_numpy(tiny_retrieval.image_array(i)).float() / 255


def _state(s: ImageStore) -> tuple:
    files = sorted(p.name for p in s.path.rglob("*") if p.is_file() and not p.name.endswith("-journal"))
    rows = [(it.id, it.sha256, it.visibility) for it in s.list()]
    vectors = hashlib.sha256((s.path / VECTORS_NAME).read_bytes()).hexdigest()
    return files, rows, s.generation, s.revision, vectors


def _slot(s: ImageStore, item_id: int) -> int:
    return s.db.execute("SELECT slot FROM items WHERE id=?", (item_id,)).fetchone()[0]


def test_embedder_reads_config_from_metadata_and_gives_unit_vectors(embedder):
    assert embedder.dim == 64 and embedder.image_size == (32, 32)
    v = embedder.embed_images([_img(0), torch.rand(40, 70, 3)])
    t = embedder.embed_texts(["a red square", "blue"])
    assert v.shape == (2, 64) and t.shape == (2, 64)
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(t, axis=1), 1, atol=1e-5)
    # same pixels -> same vector, batch or not
    np.testing.assert_allclose(embedder.embed_images(_img(0)[None])[0], v[0], atol=1e-5)


def test_embedder_errors(tmp_path):
    from safetensors.torch import save_file

    bare = tmp_path / "bare.safetensors"
    save_file({"x": torch.zeros(1)}, str(bare))
    with pytest.raises(EmbedderError, match="carries no open_clip config"):
        Embedder(bare)
    import json

    from safetensors import safe_open

    with safe_open(str(tiny_retrieval.clip_weights()), framework="pt") as fh:
        sd = {k: fh.get_tensor(k) for k in fh.keys()}
    wrong = json.loads(json.dumps(tiny_retrieval.MODEL_CONFIG))
    wrong["text_cfg"]["width"] = 48
    save_file(sd, str(tmp_path / "mismatch.safetensors"), metadata={"open_clip_config": json.dumps({"model_cfg": wrong})})
    with pytest.raises(EmbedderError, match="does not match open_clip config"):
        Embedder(tmp_path / "mismatch.safetensors")
    with pytest.raises(EmbedderError, match="not an open_clip model config"):
        Embedder(tiny_retrieval.clip_weights(), "no-such-arch")
    with pytest.raises(EmbedderError, match="only safetensors"):
        Embedder(tmp_path / "w.pt")


def test_add_folder_skips_and_reports_bad_files(store, folder):
    assert len(store) == tiny_retrieval.IMAGE_COUNT
    s = store.summary()
    assert s["private"] == tiny_retrieval.IMAGE_COUNT and s["public"] == 0 and s["generation"] == 1
    again = store.add_folder(folder)
    reasons = {p.split("/")[-1]: r for p, r in again.skipped}
    assert again.added == []
    assert "not a readable image" in reasons["broken.png"] and "not a readable image" in reasons["notes.txt"]
    assert reasons["img_00.png"].startswith("duplicate")
    item = store.list()[0]
    assert item.owner == "alice" and item.path.endswith("img_00.png") and len(item.sha256) == 64
    assert (store.path / item.file).read_bytes() == (folder / "img_00.png").read_bytes()


def test_query_by_image_and_text_ranks_by_cosine(store):
    hits = store.query(image=_img(3), k=3, visibility="private")
    assert hits[0].path.endswith("img_03.png") and hits[0].score == pytest.approx(1.0, abs=1e-4)
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    text_hits = store.query(text="a blue and green gradient", k=len(store), visibility="all")
    q = store.query_vector(text="a blue and green gradient")[0]
    emb = store.image_embeddings([h.id for h in text_hits]).numpy()
    np.testing.assert_allclose([h.score for h in text_hits], emb @ q, atol=1e-5)
    assert np.all(np.diff(emb @ q) <= 1e-6)
    imgs = store.load_images(hits)
    assert imgs.shape == (3, 64, 64, 3) and imgs.dtype == torch.float32
    torch.testing.assert_close(imgs[0], _img(3), atol=1e-6, rtol=0)


def test_forgotten_image_can_never_be_returned_again(store, embedder, folder):
    target = store.query(image=_img(1), k=1, visibility="all")[0]
    by_hash = store.query(image=_img(4), k=1, visibility="all")[0]
    gone_bytes = [store.image_embeddings([h.id])[0].numpy().tobytes() for h in (target, by_hash)]
    store.forget([target.id])
    store.forget([by_hash.sha256[:16]])
    gone = {target.id, by_hash.id}

    def never_returned(s: ImageStore) -> None:
        n = len(s)
        assert n == tiny_retrieval.IMAGE_COUNT - 2 and len(s.index) == n
        queries = [{"image": _img(i)} for i in range(tiny_retrieval.IMAGE_COUNT)]
        queries += [{"text": t} for t in ("x", "a picture", "gradient")]
        for q in queries:
            for vis in ("all", "private"):
                assert not gone & {h.id for h in s.query(k=n, visibility=vis, **q)}
        assert not gone & {it.id for it in s.list()}
        assert not gone & set(s.index.ids().tolist())
        on_disk = (s.path / VECTORS_NAME).read_bytes() + (s.path / DB_NAME).read_bytes()
        assert not any(b in on_disk for b in gone_bytes)
        assert not (s.path / target.file).exists() and not (s.path / by_hash.file).exists()
        with pytest.raises(StoreError, match="not in the store"):
            s.image_embeddings([target.id])
        with pytest.raises(StoreError, match="no longer in the store"):
            s.load_images([target])

    never_returned(store)
    store.close()
    reopened = ImageStore(store.path, embedder)
    never_returned(reopened)
    # a rebuild from the same folder does not bring it back; ids are never reused
    report = reopened.add_folder(folder)
    assert report.added == [] and sum("forgotten earlier" in r for _, r in report.skipped) == 2
    readded = reopened.add_files([target.path], allow_forgotten=True, owner="alice")
    assert readded.added and readded.added[0] > max(it.id for it in reopened.list() if it.id != readded.added[0])
    assert target.id not in {h.id for h in reopened.query(image=_img(1), k=1, visibility="all")}
    reopened.close()
    with pytest.raises(StoreError, match="no item with id"):
        ImageStore(store.path, embedder).forget([target.id])


def test_cancel_mid_add_leaves_the_store_as_it_was(tmp_path, embedder, folder):
    s = ImageStore.create(tmp_path / "s", embedder)
    s.add_files([folder / "img_00.png", folder / "img_01.png"])
    before = _state(s)
    ids_before = s.query(image=_img(0), k=2, visibility="all")

    def cancel(done: int, total: int) -> None:
        raise KeyboardInterrupt("cancelled")

    with pytest.raises(KeyboardInterrupt):
        s.add_folder(folder, progress=cancel)
    assert _state(s) == before
    s.close()
    s = ImageStore(tmp_path / "s", embedder)
    assert _state(s) == before and s.query(image=_img(0), k=2, visibility="all") == ids_before
    s.close()


def test_failure_before_the_commit_rolls_back_everything(tmp_path, embedder, folder, monkeypatch):
    s = ImageStore.create(tmp_path / "s", embedder)
    s.add_files([folder / "img_00.png", folder / "img_01.png"])
    s.forget([1])  # leaves a free slot, so the next add reuses it and also appends
    before = _state(s)

    def disk_full(self, slots, vectors):
        self._pwrite_all(b"partial", int(slots[0]) * self.row)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(SlotFile, "write", disk_full)
    with pytest.raises(OSError, match="No space"):
        s.add_folder(folder)
    monkeypatch.undo()
    assert _state(s) == before and len(s.index) == 1
    # a forget whose SQL fails (a real SQLite error, raised by a trigger) changes nothing
    s.db.execute("CREATE TEMP TRIGGER fail BEFORE DELETE ON items BEGIN SELECT RAISE(ABORT, 'disk I/O error'); END")
    with pytest.raises(Exception, match="disk I/O"):
        s.forget([2])
    s.db.execute("DROP TRIGGER fail")
    assert _state(s) == before and len(s.index) == 1
    s.close()
    s = ImageStore(tmp_path / "s", embedder)
    assert _state(s) == before and len(s) == 1 and s.list()[0].path.endswith("img_01.png")
    assert s.add_folder(folder).added  # the free slot is usable again
    s.close()


def test_crash_after_the_forget_commit_is_finished_on_open(store, embedder, monkeypatch):
    target = store.query(image=_img(2), k=1, visibility="all")[0]
    slot, vec = _slot(store, target.id), store.image_embeddings([target.id])[0].numpy()

    def crash(self, slots):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(SlotFile, "zero", crash)
    with pytest.raises(OSError):
        store.forget([target.id])
    monkeypatch.undo()
    # committed: gone from the rows, the in-memory index and the copy, but the slot still holds bytes
    assert target.id not in {h.id for h in store.query(image=_img(2), k=len(store), visibility="all")}
    assert target.id not in set(store.index.ids().tolist()) and not (store.path / target.file).exists()
    np.testing.assert_array_equal(store.slots.read([slot])[0], vec)
    path = store.path
    store.close()
    s = ImageStore(path, embedder)  # open zeroes slots no row names before anything is read
    assert not s.slots.read([slot]).any()
    assert vec.tobytes() not in (path / VECTORS_NAME).read_bytes()
    assert target.id not in {h.id for h in s.query(image=_img(2), k=len(s), visibility="all")}
    s.close()


def test_lost_or_damaged_vectors_are_re_embedded_from_the_copies(store, embedder):
    expected = [h.id for h in store.query(image=_img(2), k=4, visibility="all")]
    store.forget([expected[-1]])
    expected = [h.id for h in store.query(image=_img(2), k=4, visibility="all")]
    path, slot = store.path, _slot(store, expected[0])
    store.close()
    with SlotFile(path / VECTORS_NAME, 64) as f:
        f.write([slot], np.full((1, 64), 7.0, dtype=np.float32))  # damaged: not a unit vector
    s = ImageStore(path, embedder)
    assert [h.id for h in s.query(image=_img(2), k=4, visibility="all")] == expected
    s.close()
    (path / VECTORS_NAME).unlink()
    with pytest.raises(StoreError, match="missing or damaged"):
        ImageStore(path)  # no embedder: a clear error, never a wrong answer
    s = ImageStore(path, embedder)
    assert [h.id for h in s.query(image=_img(2), k=4, visibility="all")] == expected
    s.close()


def _bulk(s: ImageStore, n: int, seed: int) -> tuple[list[int], np.ndarray]:
    """Fill a store with ``n`` random unit vectors through its real write path (no images:
    embedding thousands of pictures would only slow the test; forget never reads pixels)."""
    rng = np.random.default_rng(seed)
    vecs = rng.standard_normal((n, s.dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    staged = [{"sha": hashlib.sha256(f"{seed}-{i}".encode()).hexdigest(), "path": f"bulk/{i}.png",
               "file": f"images/bulk-{i}.png", "width": 8, "height": 8} for i in range(n)]
    return s._insert(staged, vecs, "bulk", "private"), vecs


def _pages(data: bytes, size: int = 4096) -> list[bytes]:
    return [data[i:i + size] for i in range(0, len(data), size)]


@pytest.mark.parametrize("n", [40, 4000])
def test_forget_io_is_constant_and_leaves_no_bytes(tmp_path, embedder, monkeypatch, n):
    """Forget writes one slot (dim * 4 bytes) in place and a handful of SQLite pages, for 40
    items as for 4000: the bytes written do not grow with the store (timings are not asserted)."""
    s = ImageStore.create(tmp_path / "s", embedder)
    ids, vecs = _bulk(s, n, seed=n)
    victim = n // 2
    slot = _slot(s, ids[victim])
    page_size = s.db.execute("PRAGMA page_size").fetchone()[0]
    vec_file, db_file = s.path / VECTORS_NAME, s.path / DB_NAME
    vec_before, db_before = vec_file.read_bytes(), db_file.read_bytes()
    others = {p: p.stat().st_mtime_ns for p in s.path.rglob("*") if p.is_file() and p not in (vec_file, db_file)}
    writes: list[tuple[int, int]] = []
    real_write = SlotFile._pwrite_all

    def spy(self, data, offset):  # records every byte range written to vectors.f32, then writes it
        writes.append((offset, len(data)))
        real_write(self, data, offset)

    monkeypatch.setattr(SlotFile, "_pwrite_all", spy)
    s.forget([ids[victim]])
    monkeypatch.undo()
    assert writes == [(slot * s.dim * 4, s.dim * 4)]  # one slot written, nothing else in vectors.f32
    vec_after = vec_file.read_bytes()
    assert len(vec_after) == len(vec_before)
    row = s.dim * 4
    changed = [i for i, (a, b) in enumerate(zip(vec_before, vec_after, strict=True)) if a != b]
    assert changed and slot * row <= changed[0] and changed[-1] < (slot + 1) * row
    assert vec_after[slot * row:(slot + 1) * row] == bytes(row)
    assert vec_after[:slot * row] == vec_before[:slot * row] and vec_after[(slot + 1) * row:] == vec_before[(slot + 1) * row:]
    db_after = db_file.read_bytes()
    pages = sum(a != b for a, b in zip(_pages(db_before, page_size), _pages(db_after, page_size), strict=False))
    assert pages <= 8 and abs(len(db_after) - len(db_before)) <= page_size
    assert {p: p.stat().st_mtime_ns for p in others} == others
    assert vecs[victim].tobytes() not in vec_after + db_after
    # gone from search for any k, in memory and after reopening; the freed slot is reused
    _, found = s.index.search(vecs[victim][None], n)
    assert ids[victim] not in found[0].tolist() and len(s.index) == n - 1
    s.close()
    s = ImageStore(tmp_path / "s", embedder)
    _, found = s.index.search(vecs[victim][None], n)
    assert ids[victim] not in found[0].tolist() and len(s.index) == n - 1
    new_ids, _ = _bulk(s, 1, seed=n + 1)
    assert _slot(s, new_ids[0]) == slot and len(vec_file.read_bytes()) == len(vec_before)
    s.close()


def test_query_errors(tmp_path, embedder, store):
    empty = ImageStore.create(tmp_path / "empty", embedder)
    with pytest.raises(StoreError, match="empty") as err:
        empty.query(text="x", k=1)
    assert err.value.field == "store"
    with pytest.raises(StoreError, match="only 6 private images") as err:
        store.query(text="x", k=7)
    assert err.value.field == "k"
    with pytest.raises(StoreError, match="none is public"):
        store.query(text="x", k=1, visibility="public")
    with pytest.raises(StoreError, match="exactly one query"):
        store.query(text="x", image=_img(0), k=1)
    with pytest.raises(StoreError, match="exactly one query"):
        store.query(k=1)
    with pytest.raises(StoreError, match="visibility filter"):
        store.query(text="x", k=1, visibility="friends")
    with pytest.raises(StoreError, match="at least one"):
        store.query(text="x", k=0)
    with pytest.raises(StoreError, match="not an image store"):
        ImageStore(tmp_path)
    with pytest.raises(StoreError, match="already exists"):
        ImageStore.create(store.path, embedder)


def test_visibility_filters_queries(store):
    ids = [it.id for it in store.list()[:2]]
    store.set_visibility(ids, "public")
    assert {h.id for h in store.query(text="x", k=2, visibility="public")} == set(ids)
    assert not set(ids) & {h.id for h in store.query(text="x", k=4, visibility="private")}
    with pytest.raises(StoreError, match="only 2 public"):
        store.query(text="x", k=3, visibility="public")
    with pytest.raises(StoreError, match="not one of"):
        store.set_visibility(ids, "secret")


def test_other_model_is_refused(tmp_path, store):
    other = Embedder(tiny_retrieval.clip_weights(seed=1))
    with pytest.raises(StoreError, match="different model"):
        ImageStore(store.path, other)


def test_first_build_is_all_or_nothing(tmp_path, embedder, folder):
    def cancel(done: int, total: int) -> None:
        raise RuntimeError("cancelled")

    with pytest.raises(RuntimeError):
        build_or_update(tmp_path / "new", embedder, folder, progress=cancel)
    assert list(tmp_path.iterdir()) == []
    calls = []
    s, report, created = build_or_update(tmp_path / "new", embedder, folder, progress=lambda d, t: calls.append((d, t)))
    assert created and len(report.added) == tiny_retrieval.IMAGE_COUNT and calls[-1] == (6, 6)
    s.close()
    copy = tmp_path / "copy"
    shutil.copytree(tmp_path / "new", copy)
    s2, report2, created2 = build_or_update(copy, embedder, folder)
    assert not created2 and report2.added == [] and len(s2) == tiny_retrieval.IMAGE_COUNT
    s2.close()


def test_parse_refs():
    assert parse_refs("1, 2 3") == [1, 2, 3]
    assert parse_refs('{"items": [{"id": 4, "sha256": "ab"}, {"sha256": "cd"}]}') == [4, "cd"]
    assert parse_refs("[5, \"abcdef12\"]") == [5, "abcdef12"]
    assert parse_refs("  ") == []
    with pytest.raises(StoreError, match="do not parse"):
        parse_refs("{oops")


def test_private_items_are_returned_only_to_their_owner(tmp_path, embedder, folder):
    """Owners are a privacy boundary: one owner's private images never come back for another,
    whatever the query; public ones are shared; the default is the owner the store was built for."""
    from compartments.retrieval.store import build_or_update

    store, _, created = build_or_update(tmp_path / "s", embedder, folder, owner="alice")
    assert created and store.default_owner() == "alice"
    moved = store.list()[-3:]  # give three images to bob: forget them, re-add as bob's
    store.forget([it.id for it in moved])
    bob = store.add_files([it.path for it in moved], owner="bob", allow_forgotten=True).added
    store.set_visibility([store.list("private")[0].id], "public")
    n = len(store)
    alice_private = {it.id for it in store.list("private") if it.owner == "alice"}
    public = {it.id for it in store.list("public")}
    queries = [{"image": _img(i)} for i in range(4)] + [{"text": t} for t in ("x", "a picture")]
    for q in queries:
        assert not set(bob) & {h.id for h in store.query(k=len(alice_private), visibility="private", **q)}
        every = {h.id for h in store.query(k=len(alice_private | public), visibility="all", **q)}
        assert every == alice_private | public
        as_bob = {h.id for h in store.query(k=len(bob), visibility="private", owner="bob", **q)}
        assert as_bob == set(bob)
    with pytest.raises(StoreError, match="only 3 private images of owner 'bob'"):
        store.query(text="x", k=4, visibility="private", owner="bob")
    with pytest.raises(StoreError, match="none is private of owner 'mallory'"):
        store.query(text="x", k=1, visibility="private", owner="mallory")
    assert len(store) == n and len(public) == 1
    store.close()


def test_an_old_store_with_several_owners_needs_an_owner(store, embedder, folder):
    """A store built before owners were recorded: one owner is the default; several are ambiguous."""
    assert store.default_owner() == "alice"
    store.add_files([store.list()[0].path], owner="bob")  # already stored: nothing added
    extra = store.list()[-1]
    store.forget([extra.id])
    store.add_files([extra.path], owner="bob", allow_forgotten=True)
    assert store.default_owner() is None
    with pytest.raises(StoreError, match="several owners .*'alice', 'bob'.* set owner") as err:
        store.query(text="x", k=1, visibility="private")
    assert err.value.field == "owner"
    assert store.query(text="x", k=1, visibility="private", owner="bob")[0].owner == "bob"


def test_a_folder_of_huge_images_is_embedded_in_bounded_memory(tmp_path):
    """Six 6000x6000 PNGs (432 MB of float pixels each if decoded whole): decoded for embedding
    one batch at a time at most EMBED_SIDE on a side, so the build stays far below their sum."""
    import subprocess
    import sys

    from PIL import Image

    from compartments.tiny import retrieval as tiny_retrieval

    folder = tmp_path / "huge"
    folder.mkdir()
    for i in range(6):
        Image.new("RGB", (6000, 6000), (40 * i, 255 - 30 * i, 90)).save(folder / f"big{i}.png")
    code = (
        "import resource, sys\n"
        "from compartments.retrieval.embed import Embedder\n"
        "from compartments.retrieval.store import build_or_update\n"
        "s, rep, _ = build_or_update(sys.argv[1], Embedder(sys.argv[2]), sys.argv[3], owner='me')\n"
        "assert len(rep.added) == 6, rep\n"
        "assert {(it.width, it.height) for it in s.list()} == {(6000, 6000)}\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)\n")
    res = subprocess.run([sys.executable, "-c", code, str(tmp_path / "store"), str(tiny_retrieval.clip_weights()),
                          str(folder)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    peak_gb = int(res.stdout.split()[-1]) / 1024 ** 2
    assert peak_gb < 1.6, f"peak RSS {peak_gb:.2f} GB for six huge images"


def test_forget_also_removes_copies_that_killed_processes_left(store):
    """A first build killed mid-way beside the store, or an add killed between its copy and its
    commit, left copies of images: forgetting an image removes those too."""
    target = store.list()[0]
    data = (store.path / target.file).read_bytes()
    abandoned = store.path.parent / ".other.99999999.building" / "images"
    abandoned.mkdir(parents=True)
    (abandoned / Path(target.file).name).write_bytes(data)
    in_flight = store.path / "images" / f".{Path(target.file).name}.99999999.tmp"
    in_flight.write_bytes(data)
    store.forget([target.id])
    assert not abandoned.parent.exists() and not in_flight.exists()
    leftovers = [p for p in store.path.parent.rglob("*") if p.is_file() and p.read_bytes() == data]
    assert not leftovers, leftovers


def test_opening_a_store_removes_first_builds_killed_beside_it(store, embedder):
    dead = store.path.parent / ".half.99999999.building" / "images"
    dead.mkdir(parents=True)
    (dead / "copy.png").write_bytes(b"pixels of a private image")
    live = store.path.parent / f".mine.{__import__('os').getpid()}.building"
    live.mkdir()
    store.close()
    ImageStore(store.path, embedder).close()
    assert not dead.parent.exists() and live.exists()
    live.rmdir()
