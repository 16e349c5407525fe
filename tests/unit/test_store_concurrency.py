"""Two processes adding and forgetting in one image store while a third opens and queries it.

Before the writer lock, opening a store garbage-collected every copy no committed row named,
including another process's in-flight copies: an add aborted 3 times out of 3. Here every
writer must succeed and the store must end consistent: rows, vectors and copies agree, and
nothing forgotten is ever returned. Bounded: 8 adds per writer, 120 s at most.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
from PIL import Image

from compartments.retrieval.embed import Embedder
from compartments.retrieval.store import IMAGE_DIR, ImageStore, build_or_update
from compartments.tiny import retrieval as tiny_retrieval

ADDS = 8


def _images(folder: Path, start: int) -> list[Path]:
    folder.mkdir(parents=True)
    out = []
    for i in range(start, start + ADDS):
        arr = tiny_retrieval.image_array(i % tiny_retrieval.IMAGE_COUNT)
        arr = np.roll(arr, i * 7, axis=1)  # distinct bytes and pixels for every image
        arr[0, 0] = [i % 256, (i * 3) % 256, 7]
        path = folder / f"w{i:03d}.png"
        Image.fromarray(arr).save(path)
        out.append(path)
    return out


WRITER = """
    import json, sys
    from compartments.retrieval.embed import Embedder
    from compartments.retrieval.store import ImageStore
    store_path, weights, files, report = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
    emb = Embedder(weights)
    forgotten, added = [], []
    for i, f in enumerate(files):
        with ImageStore(store_path, emb) as s:
            new = s.add_files([f], owner="w").added
            assert len(new) == 1, new
            added.append(new[0])
            if i % 2 == 1:  # forget every second one of our own, then check it never comes back
                gone = s.forget([added.pop(0)])[0]
                forgotten.append(gone.sha256)
            hits = s.query(text="a picture", k=min(3, len(s)), visibility="all", owner="w")
            assert not {h.sha256 for h in hits} & set(forgotten)
    json.dump({"forgotten": forgotten, "kept": added}, open(report, "w"))
"""


def test_two_writers_and_a_reader_end_consistent(tmp_path):
    weights = tiny_retrieval.clip_weights()
    emb = Embedder(weights)
    store, _, _ = build_or_update(tmp_path / "store", emb, tiny_retrieval.images_folder(), owner="w")
    store.close()
    procs, reports = [], []
    for w in range(2):
        files = _images(tmp_path / f"in{w}", 1000 * (w + 1))
        reports.append(tmp_path / f"report{w}.json")
        procs.append(subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(WRITER), str(tmp_path / "store"), str(weights),
             json.dumps([str(f) for f in files]), str(reports[-1])], stderr=subprocess.PIPE, text=True))
    deadline, opens = time.monotonic() + 120, 0
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        with ImageStore(tmp_path / "store", emb) as s:  # each open runs the recovery / clean-up step
            s.query(text="a gradient", k=1, visibility="all", owner="w")
        opens += 1
    for p in procs:
        try:
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
        assert p.returncode == 0, p.stderr.read()[-3000:]
    assert opens > 0
    forgotten = {sha for r in reports for sha in json.loads(r.read_text())["forgotten"]}
    assert len(forgotten) == ADDS  # ADDS // 2 per writer
    with ImageStore(tmp_path / "store", emb) as s:
        items = s.list()
        assert len(items) == tiny_retrieval.IMAGE_COUNT + ADDS  # each writer keeps ADDS // 2
        files = {p.name for p in (s.path / IMAGE_DIR).iterdir()}
        assert files == {Path(it.file).name for it in items}, "copies and rows disagree"
        assert set(s.index.ids().tolist()) == {it.id for it in items}, "vectors and rows disagree"
        assert not forgotten & {it.sha256 for it in items}
        hits = s.query(text="a picture", k=len(items), visibility="all", owner="w")
        assert not forgotten & {h.sha256 for h in hits}
