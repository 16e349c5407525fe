"""``python -m compartments store ...``: manage an image store without ComfyUI.

STORE is a store folder, a ``NAME.pgstore.json`` config, or, with ``--db postgresql://...``
(every subcommand takes it), the name of a store in that PostgreSQL database.

    store build  STORE --folder DIR --weights W.safetensors [--model-config auto] [--owner O] [--visibility private]
    store query  STORE (--text T | --image FILE) [--k 4] [--visibility private|public|all] [--owner O]
    store forget STORE REF...        (ids or sha256 hashes)
    store visibility STORE public|private REF...
    store list   STORE [--visibility all]
    store compact STORE --db URL                  (PostgreSQL: rewrite the tables without forgotten rows)
    store cleanup STORE --db URL --images-folder DIR  (shared-folder copies: retry failed deletions)

``--images-folder DIR`` (with ``--db``): the store keeps its image copies as files in DIR, a folder
every worker mounts, instead of in the database (given when the store is built, and to every
later command, as this machine mounts it).

Queries and builds need the open_clip weights; ``--weights`` defaults to the file the store
recorded, looked up next to the store's parent ``models/`` folder (clip_vision, open_clip).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ..retrieval.backends import StoreRef
from ..retrieval.embed import Embedder, EmbedderError
from ..retrieval.pgstore import PgImageStore
from ..retrieval.store import FILTERS, VISIBILITIES, ImageStore, StoreError, decode_image, parse_refs


def _find_weights(store: Path, name: str) -> Path:
    for models in (store.parent.parent, store.parent):
        for sub in ("open_clip", "clip_vision"):
            if (models / sub / name).is_file():
                return models / sub / name
    raise StoreError(f"cannot find the store's weights '{name}'.", "pass --weights PATH.", "weights")


def _ref(args: argparse.Namespace) -> StoreRef:
    return StoreRef.parse(args.store, db=getattr(args, "db", None), images=getattr(args, "images_folder", None))


def _open(args: argparse.Namespace, need_embedder: bool = True) -> ImageStore | PgImageStore:
    ref = _ref(args)
    store = ref.open()
    if need_embedder:
        if getattr(args, "weights", None):
            weights = Path(args.weights)
        elif ref.path:
            weights = _find_weights(Path(args.store), store.config["model"]["weights"])
        else:
            store.close()
            raise StoreError("a store in a database has no models folder beside it to find its weights in.",
                             f"pass --weights PATH/{store.config['model']['weights']}.", "weights")
        store.set_embedder(Embedder(weights, getattr(args, "model_config", "auto")))
    return store


def _progress(done: int, total: int) -> None:
    print(f"\rembedding {done}/{total}", end="\n" if done >= total else "", file=sys.stderr, flush=True)


def cmd_build(args: argparse.Namespace) -> int:
    emb = Embedder(args.weights, args.model_config)
    store, report, created = _ref(args).build_or_update(emb, args.folder, owner=args.owner,
                                                        visibility=args.visibility, progress=_progress)
    with store:
        print(json.dumps({"created": created, **report.to_dict(), "summary": store.summary()}, indent=1))
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    image = decode_image(Path(args.image).read_bytes())[0] if args.image else None
    with _open(args) as store:
        hits = store.query(text=args.text, image=image, k=args.k, visibility=args.visibility, owner=args.owner)
        for h in hits:
            print(json.dumps({"id": h.id, "score": round(h.score, 5), "sha256": h.sha256, "owner": h.owner,
                              "visibility": h.visibility, "source": h.path}))
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    with _open(args, need_embedder=False) as store:
        gone = store.forget(parse_refs(" ".join(args.refs)))
        if args.compact:
            _compact(store)
        print(json.dumps({"forgotten": [{"id": g.id, "sha256": g.sha256} for g in gone], "items_left": len(store)}))
    return 0


def _compact(store: ImageStore | PgImageStore) -> None:
    if not isinstance(store, PgImageStore):
        raise StoreError("compact is for PostgreSQL stores; a folder store zeroes a forgotten vector in place.",
                         "", "store")
    store.compact()


def cmd_compact(args: argparse.Namespace) -> int:
    with _open(args, need_embedder=False) as store:
        _compact(store)
        print(json.dumps({"compacted": store.name, "items": len(store)}))
    return 0


def cmd_cleanup(args: argparse.Namespace) -> int:
    with _open(args, need_embedder=False) as store:
        if not isinstance(store, PgImageStore):
            raise StoreError("cleanup is for PostgreSQL stores with their copies in a shared folder.", "", "store")
        done = store.cleanup()
        print(json.dumps({"cleanup": store.name, **done, **({"error": store.last_cleanup} if store.last_cleanup else {})}))
    return 0 if not done["pending"] else 1


def cmd_visibility(args: argparse.Namespace) -> int:
    with _open(args, need_embedder=False) as store:
        print(json.dumps({"visibility": args.to, "ids": store.set_visibility(parse_refs(" ".join(args.refs)), args.to)}))
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    with _open(args, need_embedder=False) as store:
        print(json.dumps(store.summary()))
        for it in store.list(args.visibility):
            print(json.dumps({"id": it.id, "sha256": it.sha256, "owner": it.owner, "visibility": it.visibility,
                              "source": it.path}))
    return 0


def _guard(func):
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (StoreError, EmbedderError, FileNotFoundError) as exc:
            print(f"compartments store: {exc}", file=sys.stderr)
            return 2

    return run


def register(sub) -> None:
    p = sub.add_parser("store", help="manage a retrieval image store (build, query, forget, visibility, list)")
    cmds = p.add_subparsers(dest="store_cmd", required=True)
    b = cmds.add_parser("build", help="create a store from a folder, or add the folder's new images")
    b.add_argument("store")
    b.add_argument("--folder", required=True)
    b.add_argument("--weights", required=True, help="open_clip safetensors")
    b.add_argument("--model-config", default="auto")
    b.add_argument("--owner", default="")
    b.add_argument("--visibility", choices=VISIBILITIES, default="private")
    b.set_defaults(func=_guard(cmd_build))
    q = cmds.add_parser("query", help="k nearest images to a text or an image")
    q.add_argument("store")
    g = q.add_mutually_exclusive_group(required=True)
    g.add_argument("--text")
    g.add_argument("--image")
    q.add_argument("--k", type=int, default=4)
    q.add_argument("--visibility", choices=FILTERS, default="private")
    q.add_argument("--owner", help="whose private images (default: the owner the store was built for)")
    q.add_argument("--weights")
    q.add_argument("--model-config", default="auto")
    q.set_defaults(func=_guard(cmd_query))
    f = cmds.add_parser("forget", help="delete images by id or sha256 (row, vector, stored copy)")
    f.add_argument("store")
    f.add_argument("refs", nargs="+")
    f.add_argument("--compact", action="store_true",
                   help="PostgreSQL: also rewrite the tables so no byte of the forgotten rows stays in their files")
    f.set_defaults(func=_guard(cmd_forget))
    v = cmds.add_parser("visibility", help="mark images public or private")
    v.add_argument("store")
    v.add_argument("to", choices=VISIBILITIES)
    v.add_argument("refs", nargs="+")
    v.set_defaults(func=_guard(cmd_visibility))
    ls = cmds.add_parser("list", help="summary and items")
    ls.add_argument("store")
    ls.add_argument("--visibility", choices=FILTERS, default="all")
    ls.set_defaults(func=_guard(cmd_list))
    c = cmds.add_parser("compact", help="PostgreSQL: rewrite the tables without the forgotten rows' bytes")
    c.add_argument("store")
    c.set_defaults(func=_guard(cmd_compact))
    cl = cmds.add_parser("cleanup", help="PostgreSQL, copies in a shared folder: retry deletions a forget could "
                                         "not finish and delete stray copies")
    cl.add_argument("store")
    cl.set_defaults(func=_guard(cmd_cleanup))
    for sub in (b, q, f, v, ls, c, cl):
        sub.add_argument("--db", help="postgresql://user@host:port/database: STORE is then a store name in it "
                                      "(the password comes from PGPASSWORD or ~/.pgpass)")
        sub.add_argument("--images-folder", help="with --db: the shared folder holding the store's image copies "
                                                 "(instead of the database), as this machine mounts it")
