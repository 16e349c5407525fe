"""Image store nodes: build/update, load, retrieve, set visibility, forget, list.

Stores are folders in ``models/retrieval_stores`` (a dropdown), or stores in a PostgreSQL
database named by a ``NAME.pgstore.json`` config there (``{"url": "postgresql://user@host/db"}``;
the password comes from ``PGPASSWORD`` or ``~/.pgpass``, never from a workflow); the open_clip weights come
from ``models/open_clip`` or ``models/clip_vision`` (safetensors in open_clip's key layout).
The nodes pass a ``COMPARTMENTS_IMAGE_STORE`` handle along, so a graph orders its writes:
Build -> Forget -> Retrieve retrieves from the store after the forget. The work is in
``retrieval/``; these classes translate ComfyUI objects and errors.
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

import comfy.model_management
import comfy.model_patcher
import folder_paths
from comfy_api.latest import io

from ..retrieval.backends import PG_CONFIG_SUFFIX, StoreRef
from ..retrieval.embed import Embedder, EmbedderError
from ..retrieval.pgstore import PgImageStore
from ..retrieval.store import FILTERS, VISIBILITIES, ImageStore, StoreError, attribution, parse_refs
from . import _host

STORES = "retrieval_stores"
OPEN_CLIP = "open_clip"
CATEGORY = "Compartments/Retrieval"

_host.register_model_folder(STORES, is_dir=True)
_host.register_model_folder(OPEN_CLIP)

StoreType = io.Custom("COMPARTMENTS_IMAGE_STORE")


@dataclass(frozen=True)
class StoreHandle:
    """What flows between the nodes: where the store is and which model embeds its queries."""

    path: str  # a store folder, or a .pgstore.json config
    weights: str
    model_name: str = "auto"

    def open(self, with_embedder: bool = True) -> ImageStore | PgImageStore:
        with _blame("store"):
            return StoreRef.parse(self.path).open(_embedder(self.weights, self.model_name) if with_embedder else None)


# -- helpers ------------------------------------------------------------------------------
def _blame(input_name: str):
    """Store errors that name no input are about ``input_name``; the embedder's about the weights."""
    return _host.blame(input_name, {EmbedderError: "weights"})


def _weights_options() -> list[str]:
    names = set(folder_paths.get_filename_list(OPEN_CLIP)) | set(folder_paths.get_filename_list("clip_vision"))
    return sorted(n for n in names if n.endswith(".safetensors"))


def _weights_path(name: str) -> str:
    for folder in (OPEN_CLIP, "clip_vision"):
        if folder_paths.get_full_path(folder, name):
            return _host.resolve_file(folder, name, "weights")
    raise _host.BadInput("weights", f"'{name}' is in neither models/{OPEN_CLIP} nor models/clip_vision.",
                         f"put open_clip safetensors weights in {_host.folder_dirs(OPEN_CLIP)[0]} and refresh.")


_EMBEDDERS: dict[tuple, tuple[Embedder, comfy.model_patcher.ModelPatcher]] = {}


def _embedder(weights_path: str, model_name: str) -> Embedder:
    """Cached open_clip model for these weights, loaded through ComfyUI's memory manager."""
    st = os.stat(weights_path)
    key = (weights_path, st.st_mtime_ns, st.st_size, model_name)
    if key not in _EMBEDDERS:
        try:
            emb = Embedder(weights_path, model_name)
        except EmbedderError as exc:
            raise _host.BadInput("model_config", str(exc),
                                 "pick the open_clip config that matches the weights.") from exc
        patcher = comfy.model_patcher.ModelPatcher(emb.model, load_device=comfy.model_management.get_torch_device(),
                                                   offload_device=comfy.model_management.unet_offload_device())
        _EMBEDDERS.clear()
        _EMBEDDERS[key] = (emb, patcher)
    emb, patcher = _EMBEDDERS[key]
    comfy.model_management.load_models_gpu([patcher])
    emb.device = patcher.load_device
    return emb


def _store_path(name: str) -> Path:
    """The store folder, or the ``NAME.pgstore.json`` config when there is one (a database store)."""
    name = name.strip().removesuffix(PG_CONFIG_SUFFIX)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._ -]{0,99}", name) or ".." in name:
        raise _host.BadInput("store_name", f"'{name}' is not a usable store name.",
                             "use letters, digits, '-', '_', '.', spaces; no slashes.")
    for base in _host.folder_dirs(STORES):
        if (Path(base) / (name + PG_CONFIG_SUFFIX)).is_file():
            return Path(base) / (name + PG_CONFIG_SUFFIX)
        if (Path(base) / name).is_dir():
            return Path(base) / name
    return Path(_host.folder_dirs(STORES)[0]) / name


def _store_config(name: str) -> str:
    """The path of a ``NAME.pgstore.json`` directly in models/retrieval_stores (never outside it)."""
    _host.check_name(name, "store")
    if "/" in name or "\\" in name or name.startswith("."):
        raise _host.BadInput("store", f"'{name}' is not a config name.", "pick a NAME.pgstore.json from the list.")
    for base in _host.folder_dirs(STORES):
        if os.path.isfile(os.path.join(base, name)):
            return os.path.join(base, name)
    raise _host.BadInput("store", f"'{name}' is not in models/{STORES}.",
                         f"put the config in {_host.folder_dirs(STORES)[0]} and refresh the page.")


def _store_options() -> list[str]:
    """Store folders and database-store configs in models/retrieval_stores."""
    configs = {f for base in _host.folder_dirs(STORES) if os.path.isdir(base)
               for f in os.listdir(base) if f.endswith(PG_CONFIG_SUFFIX) and not f.startswith(".")}
    return sorted(set(_host.list_dirs(STORES)) | configs)


def _input_folders() -> list[str]:
    base = folder_paths.get_input_directory()
    if not os.path.isdir(base):
        return []
    return sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)) and not d.startswith("."))


def _input_folder(name: str) -> Path:
    return Path(_host.io_subfolder("input", name, "folder"))


def _folder_signature(folder: Path) -> list:
    try:
        return sorted((str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns)
                      for p in folder.rglob("*") if p.is_file())
    except OSError:
        return []


def _revision(path: Path) -> int | str | None:
    """The store's write counter; a fresh value each time the store cannot be read (unreachable
    database, broken config), so ComfyUI runs the node again instead of trusting its cache."""
    try:
        return StoreRef.parse(str(path)).revision()
    except StoreError:
        return f"unreadable-{time.monotonic_ns()}"


# -- nodes --------------------------------------------------------------------------------
class BuildImageStore(io.ComfyNode):
    """Create a store from a folder of images under input/, or add the folder's new images."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsRetrievalBuildStore",
            display_name="Build Image Store",
            category=CATEGORY,
            description="Embed every image of an input folder with open_clip and add it to a store (created if new). "
                        "Corrupt and non-image files are skipped and listed in the report; already stored or "
                        "forgotten images are not added again.",
            inputs=[
                io.String.Input("store_name", default="my-images",
                                tooltip="Folder name in models/retrieval_stores (new or existing); with a "
                                        "NAME.pgstore.json config there, the store NAME in that PostgreSQL database."),
                io.Combo.Input("folder", options=_input_folders(),
                               tooltip="A folder under ComfyUI's input directory."),
                io.Combo.Input("weights", options=_weights_options(),
                               tooltip="open_clip safetensors from models/open_clip or models/clip_vision."),
                io.Combo.Input("model_config", options=["auto", *_open_clip_configs()], default="auto",
                               tooltip="open_clip architecture; 'auto' reads it from the weights' metadata."),
                io.Combo.Input("visibility", options=list(VISIBILITIES), default="private",
                               tooltip="Visibility given to newly added images."),
                io.String.Input("owner", default="", tooltip="Owner recorded with each new image (credit)."),
            ],
            outputs=[StoreType.Output(display_name="store"), io.String.Output(display_name="report")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, store_name, folder, **kwargs):
        base = folder_paths.get_input_directory()
        sig = _folder_signature(Path(base) / folder)
        try:
            path = _store_path(store_name)
        except _host.BadInput:
            path = None
        return json.dumps([sig, _revision(path) if path is not None and path.exists() else None])

    @classmethod
    def execute(cls, store_name, folder, weights, model_config="auto", visibility="private",
                owner="") -> io.NodeOutput:
        path = _store_path(store_name)
        src = _input_folder(folder)
        weights_path = _weights_path(weights)
        emb = _embedder(weights_path, model_config)
        count = sum(1 for p in src.rglob("*") if p.is_file())
        progress = _host.progress(count, node_id=cls.hidden.unique_id if cls.hidden else None)
        with _blame("store"):
            store, report, created = StoreRef.parse(str(path)).build_or_update(
                emb, src, owner=owner, visibility=visibility, progress=progress)
        with store:
            summary = store.summary()
        base = str(src)
        out = {"store": store.name if hasattr(store, "url") else path.name, "created": created, "added": report.added,
               "skipped": [{"file": os.path.relpath(p, base), "reason": r} for p, r in report.skipped],
               "items": summary["items"], "public": summary["public"], "private": summary["private"]}
        return io.NodeOutput(StoreHandle(str(path), weights_path, model_config), json.dumps(out, indent=1))


def _open_clip_configs() -> list[str]:
    try:
        import open_clip

        return list(open_clip.list_models())
    except Exception:
        return []


class LoadImageStore(io.ComfyNode):
    """Open an existing store; its open_clip weights are found by the name it recorded."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsRetrievalLoadStore",
            display_name="Load Image Store",
            category=CATEGORY,
            description="Open a store from models/retrieval_stores: a store folder, or a NAME.pgstore.json config "
                        "naming a store in a PostgreSQL + pgvector database shared by several workers. The open_clip "
                        "weights it was built with must be in models/open_clip or models/clip_vision (override "
                        "with 'weights').",
            inputs=[
                io.Combo.Input("store", options=_store_options(),
                               tooltip="A store folder in models/retrieval_stores, or a NAME.pgstore.json config "
                                       "there naming a store in a PostgreSQL database."),
                io.Combo.Input("weights", options=["(recorded)", *_weights_options()], default="(recorded)",
                               tooltip="Which weights file to embed queries with; must be the model the store was built with."),
            ],
            outputs=[StoreType.Output(display_name="store"), io.String.Output(display_name="summary")],
        )

    @classmethod
    def fingerprint_inputs(cls, store, weights="(recorded)"):
        for base in _host.folder_dirs(STORES):
            if (Path(base) / store).exists():
                return _revision(Path(base) / store)
        return None

    @classmethod
    def execute(cls, store, weights="(recorded)") -> io.NodeOutput:
        path = _store_config(store) if store.endswith(PG_CONFIG_SUFFIX) else _host.resolve_dir(STORES, store, "store")
        with _blame("store"):
            with StoreRef.parse(path).open() as opened:
                model = opened.config["model"]
                summary = opened.summary()
        name = model["weights"] if weights == "(recorded)" else weights
        weights_path = _weights_path(name)
        handle = StoreHandle(path, weights_path, "auto" if model["name"].startswith("custom:") or
                             model["name"] not in _open_clip_configs() else model["name"])
        handle.open().close()
        return io.NodeOutput(handle, json.dumps(summary, indent=1))


class RetrieveImages(io.ComfyNode):
    """kNN over the store by text or image; returns the images and their credit record."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsRetrievalRetrieve",
            display_name="Retrieve Images",
            category=CATEGORY,
            description="The k stored images most similar (open_clip cosine) to a text or an image, among the "
                        "private (the owner's only), public or all items. 'ids' is JSON with the id, sha256 and owner of every image "
                        "returned, for credit attribution.",
            inputs=[
                StoreType.Input("store", tooltip="The image store (Build Image Store or Load Image Store)."),
                io.String.Input("text", multiline=True, default="",
                                tooltip="Text query (leave empty to query by image)."),
                io.Int.Input("k", default=4, min=1, max=256,
                             tooltip="How many images to retrieve, nearest first by embedding similarity."),
                io.Combo.Input("visibility", options=list(FILTERS), default="private",
                               tooltip="Search public items, the owner's private items, or both."),
                io.Image.Input("image", optional=True, tooltip="Image query (batch: mean embedding)."),
                io.String.Input("owner", optional=True, default="",
                                tooltip="Whose private images to retrieve (empty: the owner the store was built "
                                        "for). Public images are shared; another owner's private ones never return."),
            ],
            outputs=[io.Image.Output(display_name="images"), io.String.Output(display_name="ids")],
        )

    @classmethod
    def execute(cls, store, text, k, visibility, image=None, owner: str = "") -> io.NodeOutput:
        _host.check_interrupt()
        with store.open() as opened:
            with _blame("text"):
                hits = opened.query(text=text if image is None else (text or None), image=image, k=k,
                                    visibility=visibility, owner=(owner or "").strip() or None)
                images = opened.load_images(hits)
            record = attribution(hits, opened)
        out = images.to(comfy.model_management.intermediate_device())
        return io.NodeOutput(out, json.dumps(record))


class SetImageVisibility(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsRetrievalSetVisibility",
            display_name="Set Image Visibility",
            category=CATEGORY,
            description="Mark stored images public or private (ids, sha256 hashes, or the JSON from Retrieve Images).",
            inputs=[
                StoreType.Input("store", tooltip="The image store (Build Image Store or Load Image Store)."),
                io.String.Input("ids", default="",
                                tooltip="Ids or sha256, comma separated, or Retrieve's ids JSON."),
                io.Combo.Input("visibility", options=list(VISIBILITIES), default="public",
                               tooltip="The visibility to give the listed items."),
            ],
            outputs=[StoreType.Output(display_name="store"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, store, ids, visibility) -> io.NodeOutput:
        with store.open() as opened:
            with _blame("ids"):
                refs = parse_refs(ids)
                if not refs:
                    raise StoreError("no ids given.", "type ids or sha256 hashes, or connect Retrieve's ids.", "ids")
                changed = opened.set_visibility(refs, visibility)
        return io.NodeOutput(store, json.dumps({"visibility": visibility, "ids": changed}))


class ForgetImages(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsRetrievalForget",
            display_name="Forget Images",
            category=CATEGORY,
            description="Unlearn stored images: the row, the vector and the stored copy are deleted in one "
                        "transaction, so no later query can return them; no model weights change. Items already "
                        "gone are reported, not an error (repeated requests are safe).",
            inputs=[
                StoreType.Input("store", tooltip="The image store (Build Image Store or Load Image Store)."),
                io.String.Input("ids", default="",
                                tooltip="Ids or sha256, comma separated, or Retrieve's ids JSON."),
            ],
            outputs=[StoreType.Output(display_name="store"), io.String.Output(display_name="report")],
        )

    @classmethod
    def execute(cls, store, ids) -> io.NodeOutput:
        _host.check_interrupt()
        with store.open() as opened:
            with _blame("ids"):
                refs = parse_refs(ids)
                if not refs:
                    raise StoreError("no ids given.", "type ids or sha256 hashes, or connect Retrieve's ids.", "ids")
                gone = opened.forget(refs, missing_ok=True)
            left = len(opened)
        report = {"requested": refs, "forgotten": [{"id": it.id, "sha256": it.sha256} for it in gone],
                  "items_left": left}
        return io.NodeOutput(store, json.dumps(report))


class ListImageStore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="CompartmentsRetrievalList",
            display_name="List Image Store",
            category=CATEGORY,
            description="The store's items (id, sha256, owner, visibility, source file) as JSON.",
            inputs=[StoreType.Input("store", tooltip="The image store (Build Image Store or Load Image Store)."),
                    io.Combo.Input("visibility", options=list(FILTERS), default="all",
                                   tooltip="Which items to list: all, public or private.")],
            outputs=[io.String.Output(display_name="items")],
        )

    @classmethod
    def execute(cls, store, visibility) -> io.NodeOutput:
        with store.open(with_embedder=False) as opened:
            with _blame("visibility"):
                items = opened.list(visibility)
            summary = opened.summary()
        rows = [{"id": it.id, "sha256": it.sha256, "owner": it.owner, "visibility": it.visibility,
                 "source": os.path.basename(it.path), "size": [it.width, it.height]} for it in items]
        return io.NodeOutput(json.dumps({"summary": summary, "items": rows}, indent=1))


NODES = [BuildImageStore, LoadImageStore, RetrieveImages, SetImageVisibility, ForgetImages, ListImageStore]
