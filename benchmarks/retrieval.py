"""Retrieval index benchmark: build rate, query latency and forget cost, faiss vs brute force.

Random unit vectors stand in for open_clip embeddings (the index never sees pixels), so the
figures isolate the index. One JSON line per figure:

    python benchmarks/retrieval.py                         # 10k and 100k, dim 512
    python benchmarks/retrieval.py --quick                 # 10k only, fewer queries
    python benchmarks/retrieval.py --dim 768 --threads 2

Backends: ``faiss`` = the store's FaissIndex (IndexIDMap over IndexFlatIP, exact), ``numpy``
= NumpyIndex (a matmul + argpartition, the brute-force reference).
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
    # forget: remove one id from a copy and write the index atomically (what ImageStore.forget does)
    with tempfile.TemporaryDirectory() as tmp:
        times = []
        for victim in ids[:5]:
            t0 = time.perf_counter()
            nxt = built["faiss"].copy()
            nxt.remove(np.array([victim]))
            nxt.save(Path(tmp) / "index.faiss")
            times.append(time.perf_counter() - t0)
        _emit("forget_latency", statistics.median(times) * 1e3, "ms", backend="faiss",
              includes="copy + remove_ids + write temp + os.replace", **common)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10k vectors only, 50 queries")
    ap.add_argument("--dim", type=int, default=512, choices=(512, 768))
    ap.add_argument("--sizes", type=int, nargs="*", default=None, help="default 10000 100000")
    ap.add_argument("--queries", type=int, default=None)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "1")))
    args = ap.parse_args(argv)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    sizes = args.sizes or ([10_000] if args.quick else [10_000, 100_000])
    queries = args.queries or (50 if args.quick else 200)
    for n in sizes:
        run(n, args.dim, queries, args.k, args.threads)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
