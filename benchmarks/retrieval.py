"""Retrieval index benchmark: build rate, query latency, forget and open cost, faiss vs brute force.

Random unit vectors stand in for open_clip embeddings (the index never sees pixels), so the
figures isolate the index. One JSON line per figure:

    python benchmarks/retrieval.py                         # 10k and 100k, dim 512
    python benchmarks/retrieval.py --quick                 # 10k only, fewer queries
    python benchmarks/retrieval.py --dim 768 --threads 2
    python benchmarks/retrieval.py --huge-images 6         # peak RSS of a build from 6000x6000 PNGs

Backends: ``faiss`` = the store's FaissIndex (IndexFlatIP on normalised vectors, exact), ``numpy``
= NumpyIndex (a matmul + argpartition, the brute-force reference). Forget and open are
measured on a real ImageStore filled through its write path with the same random vectors.

``--postgres`` adds the same store figures on PostgreSQL + pgvector (a real server started by the
``pgserver`` package in a temp folder, a benchmark-only dependency): open, build rate through the
store's write path (rows, vectors and 1 KB copies, COPY in one transaction per 1000), query latency
exact and through an HNSW index (with its agreement with the exact top-k), forget latency with and
without the VACUUM the store runs, and the write-ahead-log bytes per forget.

    python benchmarks/retrieval.py --postgres --sizes 10000 100000
    python benchmarks/retrieval.py --postgres-only --sizes 1000000 --queries 20 --hnsw-up-to 100000

HNSW's agreement with the exact top-k depends on the data, so the PostgreSQL figures run on
``--vectors``: ``clustered`` (default; embedding-like: one centre per 100 vectors, each vector its
centre plus noise, cosine about 0.3 within a cluster and 0.1 across, queries near a stored vector as
a similar image is) and ``random`` (uniform on the sphere, queries as well: no structure at all,
the worst case for any graph index).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from compartments.retrieval.index import FaissIndex, NumpyIndex


def _unit(n: int, dim: int, rng: np.random.Generator) -> np.ndarray:
    v = rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _clustered(n: int, dim: int, rng: np.random.Generator, spread: float = 2.0) -> np.ndarray:
    centres = _unit(max(1, n // 100), dim, rng)
    v = centres[rng.integers(0, len(centres), n)]
    v += spread / np.sqrt(dim) * rng.standard_normal((n, dim), dtype=np.float32)
    v /= np.linalg.norm(v, axis=1, keepdims=True)
    return v


def _queries(kind: str, vecs: np.ndarray, count: int, rng: np.random.Generator) -> np.ndarray:
    if kind == "random":
        return _unit(count, vecs.shape[1], rng)
    q = vecs[rng.integers(0, len(vecs), count)] + 0.5 / np.sqrt(vecs.shape[1]) * rng.standard_normal(
        (count, vecs.shape[1]), dtype=np.float32)
    return q / np.linalg.norm(q, axis=1, keepdims=True)


def _emit(figure: str, value: float, unit: str, **params) -> None:
    print(json.dumps({"benchmark": "retrieval", "figure": figure, "value": round(value, 4), "unit": unit, **params}),
          flush=True)


def run(n: int, dim: int, queries: int, k: int, threads: int) -> None:
    rng = np.random.default_rng(n + dim)
    vecs = _unit(n, dim, rng)
    ids = np.arange(1, n + 1, dtype=np.int64)
    qs = _unit(queries, dim, rng)
    private = ids[rng.random(n) < 0.5]  # a visibility filter that keeps about half
    common = {"n": n, "dim": dim, "k": k, "threads": threads, "device": "cpu", "machine": platform.machine()}
    built = {}
    for name, cls in (("faiss", FaissIndex), ("numpy", NumpyIndex)):
        index = cls(dim)
        t0 = time.perf_counter()
        for start in range(0, n, 1000):  # the store adds in batches
            index.add(ids[start:start + 1000], vecs[start:start + 1000])
        dt = time.perf_counter() - t0
        _emit("index_build_rate", n / dt, "vectors/s", backend=name, **common)
        built[name] = index
        for label, allowed in (("query_latency", None), ("filtered_query_latency", private)):
            index.search(qs[:1], k, allowed)  # warm-up
            times = []
            for q in qs:
                t0 = time.perf_counter()
                index.search(q[None], k, allowed)
                times.append(time.perf_counter() - t0)
            _emit(label, statistics.median(times) * 1e3, "ms", backend=name, queries=queries,
                  p95_ms=round(sorted(times)[int(0.95 * (len(times) - 1))] * 1e3, 4), **common)
    agree = (built["faiss"].search(qs, k)[1] == built["numpy"].search(qs, k)[1]).mean()
    _emit("faiss_vs_bruteforce_agreement", float(agree), "fraction of top-k ids equal", **common)
    store_figures(n, dim, threads, common)


def _embedder(dim: int, folder: Path):
    """A real open_clip model with ``dim``-d embeddings (random weights, tiny towers): the store
    binds to a model, but forget and open never run it, so its size does not matter here."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    from compartments.retrieval import Embedder

    cfg = {"embed_dim": dim, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "head_width": 32,
                                             "patch_size": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    torch.manual_seed(0)
    model = open_clip.CLIP(**cfg)
    path = folder / f"bench-open-clip-{dim}.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path),
              metadata={"open_clip_config": json.dumps({"name": "bench", "model_cfg": cfg})})
    return Embedder(path)


def store_figures(n: int, dim: int, threads: int, common: dict) -> None:
    """forget and open on a real ImageStore of ``n`` vectors (what the Forget node runs)."""
    import hashlib

    from compartments.retrieval import ImageStore
    from compartments.retrieval.store import DB_NAME, VECTORS_NAME

    rng = np.random.default_rng(7)
    with tempfile.TemporaryDirectory() as tmp:
        store = ImageStore.create(Path(tmp) / "store", _embedder(dim, Path(tmp)))
        ids: list[int] = []
        for start in range(0, n, 1000):  # the store's real write path, without embedding pixels
            m = min(1000, n - start)
            staged = [{"sha": hashlib.sha256(str(start + i).encode()).hexdigest(), "path": f"{start + i}.png",
                       "file": f"images/{start + i}.png", "width": 1, "height": 1} for i in range(m)]
            ids += store._insert(staged, _unit(m, dim, rng), "bench", "private")
        vec_file, db_file = store.path / VECTORS_NAME, store.path / DB_NAME
        sizes = (vec_file.stat().st_size, db_file.stat().st_size)
        times = []
        for victim in ids[1::max(1, n // 7)][:7]:
            t0 = time.perf_counter()
            store.forget([victim])
            times.append(time.perf_counter() - t0)
        same = sizes == (vec_file.stat().st_size, db_file.stat().st_size)
        _emit("forget_latency", statistics.median(times) * 1e3, "ms", backend="faiss", forgets=len(times),
              max_ms=round(max(times) * 1e3, 3), includes="SQLite delete (fsync) + zero one slot (fsync) + "
              "in-memory remove + copy unlink", bytes_written_vectors=dim * 4, file_sizes_unchanged=same, **common)
        store.close()
        t0 = time.perf_counter()
        store = ImageStore(Path(tmp) / "store")
        _emit("open_latency", (time.perf_counter() - t0) * 1e3, "ms", backend="faiss",
              includes="read vectors.f32 + build the in-memory index", vectors_mb=round(sizes[0] / 2**20, 1),
              **common)
        store.close()


def _plan(store, q: np.ndarray, k: int) -> str:
    """Which access path PostgreSQL takes for the store's HNSW query (the scan lines of its EXPLAIN)."""
    return " / ".join(line.strip().lstrip("-> ").split("  ")[0] for line in store.explain(q, k, "all").splitlines()
                      if "Scan" in line)


def pg_figures(n: int, dim: int, queries: int, k: int, common: dict, hnsw: bool = True,
               vectors: str = "clustered") -> None:
    """The store figures on PostgreSQL + pgvector (see the module doc)."""
    import hashlib
    import shutil

    import pgserver

    from compartments.retrieval import PgImageStore

    rng = np.random.default_rng(11)
    tmp = Path(tempfile.mkdtemp(prefix="compartments-bench-pg-"))
    server = pgserver.get_server(str(tmp / "pg"), cleanup_mode="stop")
    try:
        url = server.get_uri()
        params = {**common, "backend": "postgresql", "server": "PostgreSQL 16.2 + pgvector 0.6.2 (pgserver)",
                  "vectors": vectors}
        store = PgImageStore.create(url, "bench", _embedder(dim, tmp))
        store.set_default_owner("bench")  # as a build records it (else every query looks the owner up)
        vecs = _unit(n, dim, rng) if vectors == "random" else _clustered(n, dim, rng)
        blob = rng.bytes(1024)
        t0 = time.perf_counter()
        ids: list[int] = []
        for start in range(0, n, 1000):
            m = min(1000, n - start)
            staged = [{"sha": hashlib.sha256(str(start + i).encode()).hexdigest(), "path": f"{start + i}.png",
                       "file": f"{start + i}.png", "width": 1, "height": 1, "data": blob} for i in range(m)]
            ids += store._insert(staged, vecs[start:start + m], "bench", "private", False, _Report())
        _emit("store_build_rate", n / (time.perf_counter() - t0), "vectors/s", includes="rows + vectors + 1 KB "
              "copies, COPY, one transaction per 1000", **params)
        store.close()
        t0 = time.perf_counter()
        store = PgImageStore(url, "bench")
        _emit("open_latency", (time.perf_counter() - t0) * 1e3, "ms", includes="connect + read the config "
              "(no index to build)", **params)
        qs = _queries(vectors, vecs, queries, rng)
        del vecs

        def latency(exact: bool) -> tuple[float, list[list[int]]]:
            store.query_by_vector(qs[0], k, "all", exact=exact)
            times, tops = [], []
            for q in qs:
                t0 = time.perf_counter()
                tops.append([h.id for h in store.query_by_vector(q, k, "all", exact=exact)])
                times.append(time.perf_counter() - t0)
            return statistics.median(times) * 1e3, tops

        exact_ms, exact_top = latency(True)
        _emit("query_latency", exact_ms, "ms", index="exact (scan)", queries=queries, **params)
        if hnsw:
            t0 = time.perf_counter()
            store.add_index("hnsw")
            _emit("hnsw_build_seconds", time.perf_counter() - t0, "s", m=16, ef_construction=64, **params)
            hnsw_ms, hnsw_top = latency(False)
            recall = float(np.mean([len(set(a) & set(b)) / k for a, b in zip(hnsw_top, exact_top, strict=True)]))
            _emit("query_latency", hnsw_ms, "ms", index="hnsw", ef_search=100, queries=queries,
                  plan=_plan(store, qs[0], k), **params)
            _emit("hnsw_recall_at_k", recall, "fraction of the exact top-k", **params)
        for vacuum in (True, False):
            store.vacuum = vacuum
            times, wal = [], []
            for victim in ids[1::max(1, n // 7)][:7] if vacuum else ids[2::max(1, n // 7)][:7]:
                lsn = store.conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
                t0 = time.perf_counter()
                store.forget([victim])
                times.append(time.perf_counter() - t0)
                wal.append(int(store.conn.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s)",
                                                  (lsn,)).fetchone()[0]))
            _emit("forget_latency", statistics.median(times) * 1e3, "ms", vacuum=vacuum, forgets=len(times),
                  max_ms=round(max(times) * 1e3, 3), wal_bytes_per_forget=int(statistics.median(wal)),
                  includes="DELETE row + vector + copy (cascade), COMMIT" + (", VACUUM both tables" if vacuum else ""),
                  **params)
        store.drop()
    finally:
        server.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


class _Report:
    """The part of AddReport the store's insert writes to (skips: none in a benchmark)."""

    def __init__(self) -> None:
        self.skipped: list = []


_HUGE_CHILD = """
import resource, sys, time
from compartments.retrieval.embed import Embedder
from compartments.retrieval.store import build_or_update
t = time.perf_counter()
s, rep, _ = build_or_update(sys.argv[1], Embedder(sys.argv[2]), sys.argv[3], owner="bench")
print(len(rep.added), time.perf_counter() - t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def huge_image_figures(count: int, side: int = 6000) -> None:
    """Peak RSS of a fresh process building a store from ``count`` PNGs of ``side`` x ``side``
    (decoded for embedding one batch at a time, at most EMBED_SIDE on a side)."""
    import shutil
    import subprocess
    import sys

    from PIL import Image

    from compartments.retrieval.store import EMBED_BATCH, EMBED_SIDE
    from compartments.tiny import retrieval as tiny_retrieval

    work = Path(tempfile.mkdtemp(prefix="compartments-bench-huge-"))
    try:
        (work / "in").mkdir()
        for i in range(count):
            Image.new("RGB", (side, side), (40 * i % 256, 255 - 30 * i % 256, 90)).save(work / "in" / f"big{i}.png")
        out = subprocess.run([sys.executable, "-c", _HUGE_CHILD, str(work / "store"),
                              str(tiny_retrieval.clip_weights()), str(work / "in")],
                             capture_output=True, text=True, check=True).stdout.split()
        added, seconds, rss_kb = int(out[0]), float(out[1]), int(out[2])
        params = {"images": count, "size": f"{side}x{side}", "added": added, "embed_side": EMBED_SIDE,
                  "batch": EMBED_BATCH, "model": "tiny open_clip", "machine": platform.machine()}
        _emit("build_peak_rss_huge_images", rss_kb / 1024 ** 2, "GB", **params)
        _emit("build_seconds_huge_images", seconds, "s", **params)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k vectors only, 50 queries")
    ap.add_argument("--dim", type=int, default=512, choices=(512, 768))
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="default 10000 100000")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    ap.add_argument("--postgres", action="store_true", help="also the store figures on PostgreSQL + pgvector")
    ap.add_argument("--postgres-only", action="store_true", help="only the PostgreSQL figures")
    ap.add_argument("--vectors", nargs="+", choices=("clustered", "random"), default=["clustered"],
                    help="PostgreSQL: the data (and queries) to run on, each in its own store")
    ap.add_argument("--hnsw-up-to", type=int, default=10**9, metavar="N",
                    help="PostgreSQL: build and query the HNSW index only for sizes up to N")
    ap.add_argument("--huge-images", type=int, default=0, metavar="N",
                    help="only: peak RSS of a build from N 6000x6000 PNGs")
    args = ap.parse_args(argv)
    if args.huge_images:
        huge_image_figures(args.huge_images)
        return 0
    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000])
    queries = args.queries or (50 if args.quick else 200)
    for n in sizes:
        if not args.postgres_only:
            run(n, args.dim, queries, args.k, args.threads)
        for kind in args.vectors if args.postgres or args.postgres_only else ():
            pg_figures(n, args.dim, queries, args.k, {"n": n, "dim": args.dim, "k": args.k, "threads": args.threads,
                                                      "device": "cpu", "machine": platform.machine()},
                       hnsw=n <= args.hnsw_up_to, vectors=kind)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
