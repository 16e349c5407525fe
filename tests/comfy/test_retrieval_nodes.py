"""Tier 2: the image store nodes inside a real, in-process ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def prepared(comfy):
    from compartments.tiny import retrieval as tiny_retrieval

    return tiny_retrieval.prepare(comfy.models_dir, comfy.input_dir)


def _build(comfy, name: str, **kw):
    from compartments.tiny import retrieval as tiny_retrieval

    args = {"store_name": name, "folder": tiny_retrieval.INPUT_FOLDER, "weights": tiny_retrieval.WEIGHTS_NAME,
            "model_config": "auto", "visibility": "private", "owner": "tester"}
    args.update(kw)
    return comfy.run("CompartmentsRetrievalBuildStore", hidden={"unique_id": "1"}, **args)


def test_folders_and_dropdowns_are_registered(comfy, prepared):
    import folder_paths

    from compartments.tiny import retrieval as tiny_retrieval

    assert "retrieval_stores" in folder_paths.folder_names_and_paths
    assert "open_clip" in folder_paths.folder_names_and_paths
    schema = comfy.node("CompartmentsRetrievalBuildStore").GET_SCHEMA()
    opts = {i.id: getattr(i, "options", None) for i in schema.inputs}
    assert tiny_retrieval.WEIGHTS_NAME in opts["weights"]
    assert tiny_retrieval.INPUT_FOLDER in opts["folder"]


def test_build_retrieve_forget_list(comfy, prepared):
    from compartments.tiny import retrieval as tiny_retrieval

    store, report = _build(comfy, "nodes-demo")
    rep = json.loads(report)
    assert rep["created"] and len(rep["added"]) == tiny_retrieval.IMAGE_COUNT
    assert {s["file"] for s in rep["skipped"]} == {"broken.png", "notes.txt"}
    assert (comfy.models_dir / "retrieval_stores" / "nodes-demo" / "meta.sqlite").is_file()

    # image query: the stored copy of img_02 is its own nearest neighbour
    query = torch.from_numpy(tiny_retrieval.image_array(2)).float()[None] / 255
    images, ids = comfy.run("CompartmentsRetrievalRetrieve", store=store, text="", k=3, visibility="private", image=query)
    record = json.loads(ids)
    assert images.shape == (3, 64, 64, 3) and 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    top = record["items"][0]
    assert top["score"] == pytest.approx(1.0, abs=1e-4) and len(top["sha256"]) == 64 and top["owner"] == "tester"
    assert torch.allclose(images[0], query[0], atol=1 / 255)

    # forget it through the JSON the retrieve node output, then it is gone for good
    load_cls = comfy.node("CompartmentsRetrievalLoadStore")
    fingerprint = load_cls.fingerprint_inputs(store="nodes-demo")
    _, forget_report = comfy.run("CompartmentsRetrievalForget", store=store, ids=json.dumps({"items": [top]}))
    assert [f["id"] for f in json.loads(forget_report)["forgotten"]] == [top["id"]]
    assert load_cls.fingerprint_inputs(store="nodes-demo") != fingerprint  # downstream caches re-run
    _, ids_after = comfy.run("CompartmentsRetrievalRetrieve", store=store, text="", k=5, visibility="all", image=query)
    assert top["id"] not in [it["id"] for it in json.loads(ids_after)["items"]]
    # repeating the forget is a no-op, not an error
    _, again = comfy.run("CompartmentsRetrievalForget", store=store, ids=str(top["id"]))
    assert json.loads(again)["forgotten"] == []

    # rebuilding from the same folder does not bring it back
    store2, report2 = _build(comfy, "nodes-demo")
    assert json.loads(report2)["added"] == []
    assert any("forgotten" in s["reason"] for s in json.loads(report2)["skipped"])

    # visibility filter
    with pytest.raises(ValueError, match="none is public"):
        comfy.run("CompartmentsRetrievalRetrieve", store=store2, text="a gradient", k=1, visibility="public")
    comfy.run("CompartmentsRetrievalSetVisibility", store=store2, ids="1, 2", visibility="public")
    _, pub = comfy.run("CompartmentsRetrievalRetrieve", store=store2, text="a gradient", k=2, visibility="public")
    assert sorted(it["id"] for it in json.loads(pub)["items"]) == [1, 2]
    # owners: the store's owner ("tester") is the default; another owner gets no private image
    with pytest.raises(ValueError, match="Retrieve Images: input 'visibility': .*none is private of owner 'mallory'"):
        comfy.run("CompartmentsRetrievalRetrieve", store=store2, text="a gradient", k=1, visibility="private",
                  owner="mallory")
    _, mine = comfy.run("CompartmentsRetrievalRetrieve", store=store2, text="a gradient", k=1, visibility="private",
                        owner="tester")
    assert json.loads(mine)["items"][0]["owner"] == "tester"

    (listing,) = comfy.run("CompartmentsRetrievalList", store=store2, visibility="all")
    data = json.loads(listing)
    assert data["summary"]["items"] == tiny_retrieval.IMAGE_COUNT - 1 and data["summary"]["public"] == 2
    assert top["id"] not in [r["id"] for r in data["items"]]

    # the load node reopens it by name with the recorded weights
    loaded, summary = comfy.run("CompartmentsRetrievalLoadStore", store="nodes-demo", weights="(recorded)")
    assert json.loads(summary)["items"] == tiny_retrieval.IMAGE_COUNT - 1


def test_bad_inputs_are_clear_errors(comfy, prepared):
    store, _ = _build(comfy, "nodes-bad")
    with pytest.raises(ValueError, match=r"Retrieve Images: input 'k'.*only 6"):
        comfy.run("CompartmentsRetrievalRetrieve", store=store, text="x", k=7, visibility="all")
    with pytest.raises(ValueError, match=r"input 'query'"):
        comfy.run("CompartmentsRetrievalRetrieve", store=store, text="  ", k=1, visibility="all")
    with pytest.raises(ValueError, match=r"Forget Images: input 'ids'.*neither an id nor a sha256"):
        comfy.run("CompartmentsRetrievalForget", store=store, ids="nonsense-ref")
    with pytest.raises(ValueError, match=r"Set Image Visibility: input 'ids'.*no item with id 999"):
        comfy.run("CompartmentsRetrievalSetVisibility", store=store, ids="999", visibility="public")
    with pytest.raises(ValueError, match=r"Build Image Store: input 'store_name'"):
        _build(comfy, "../escape")
    with pytest.raises(ValueError, match=r"Build Image Store: input 'folder'"):
        _build(comfy, "nodes-bad", folder="../")


def test_cancel_mid_build_leaves_no_store(comfy, prepared):
    import comfy.model_management as mm

    mm.interrupt_current_processing(True)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _build(comfy, "nodes-cancelled")
    finally:
        mm.interrupt_current_processing(False)
    assert not (comfy.models_dir / "retrieval_stores" / "nodes-cancelled").exists()
    assert not [p for p in (comfy.models_dir / "retrieval_stores").iterdir() if "nodes-cancelled" in p.name]


def test_building_folders_are_never_offered(comfy, prepared):
    """A killed first build leaves '.NAME.PID.building' (copies of images): never a dropdown choice."""
    root = comfy.models_dir / "retrieval_stores"
    root.mkdir(parents=True, exist_ok=True)
    hidden = root / ".half.4242.building"
    (hidden / "images").mkdir(parents=True, exist_ok=True)
    try:
        schema = comfy.node("CompartmentsRetrievalLoadStore").GET_SCHEMA()
        options = next(i.options for i in schema.inputs if i.id == "store")
        assert not [o for o in options if o.startswith(".")], options
    finally:
        import shutil

        shutil.rmtree(hidden, ignore_errors=True)


@pytest.mark.parametrize("copies", ["database", "shared folder"])
def test_the_same_nodes_on_a_postgresql_store(comfy, prepared, pg_server, copies, tmp_path):
    """A ``NAME.pgstore.json`` in models/retrieval_stores makes Build/Load/Retrieve/Forget/List use a store
    in that PostgreSQL database, its copies there or in the config's shared folder; the workflow never
    carries the URL's password."""
    from compartments.retrieval import PgImageStore
    from compartments.tiny import retrieval as tiny_retrieval

    cfg = comfy.models_dir / "retrieval_stores" / "nodes_pg.pgstore.json"
    shared = tmp_path / "mnt" / "nodes-pg-copies" if copies == "shared folder" else None
    cfg.write_text(json.dumps({"url": pg_server.url, **({"images_folder": str(shared)} if shared else {})}))
    try:
        schema = comfy.node("CompartmentsRetrievalLoadStore").GET_SCHEMA()
        assert cfg.name in {i.id: getattr(i, "options", None) for i in schema.inputs}["store"]
        store, report = _build(comfy, "nodes_pg")
        rep = json.loads(report)
        assert rep["created"] and len(rep["added"]) == tiny_retrieval.IMAGE_COUNT and rep["store"] == "nodes_pg"
        assert not (comfy.models_dir / "retrieval_stores" / "nodes_pg").exists()  # nothing on disk: it is in the db
        if shared:
            assert len([f for f in shared.iterdir() if not f.name.startswith(".")]) == tiny_retrieval.IMAGE_COUNT
        loaded, summary = comfy.run("CompartmentsRetrievalLoadStore", store=cfg.name, weights="(recorded)")
        assert json.loads(summary)["backend"] == "postgresql" and json.loads(summary)["items"] == tiny_retrieval.IMAGE_COUNT
        query = torch.from_numpy(tiny_retrieval.image_array(2)).float()[None] / 255
        images, ids = comfy.run("CompartmentsRetrievalRetrieve", store=loaded, text="", k=2, visibility="private",
                                image=query)
        top = json.loads(ids)["items"][0]
        assert top["score"] == pytest.approx(1.0, abs=1e-4) and torch.allclose(images[0], query[0], atol=1 / 255)
        fingerprint = comfy.node("CompartmentsRetrievalLoadStore").fingerprint_inputs(store=cfg.name)
        _, forgot = comfy.run("CompartmentsRetrievalForget", store=loaded, ids=ids)
        assert {f["id"] for f in json.loads(forgot)["forgotten"]} == {it["id"] for it in json.loads(ids)["items"]}
        assert comfy.node("CompartmentsRetrievalLoadStore").fingerprint_inputs(store=cfg.name) != fingerprint
        (listing,) = comfy.run("CompartmentsRetrievalList", store=loaded, visibility="all")
        assert top["id"] not in {it["id"] for it in json.loads(listing)["items"]}
        if shared:  # the forgotten copies left the shared folder with the commit
            assert len([f for f in shared.iterdir() if not f.name.startswith(".")]) == tiny_retrieval.IMAGE_COUNT - 2
        cfg.write_text(json.dumps({"url": "postgresql://me:sekrit@127.0.0.1:1/x"}))
        with pytest.raises(ValueError, match="'store'.*password") as err:
            comfy.run("CompartmentsRetrievalLoadStore", store=cfg.name, weights="(recorded)")
        assert "sekrit" not in str(err.value)
    finally:
        cfg.unlink(missing_ok=True)
        if PgImageStore.exists(pg_server.url, "nodes_pg"):
            PgImageStore(pg_server.url, "nodes_pg", images_folder=shared).drop()
