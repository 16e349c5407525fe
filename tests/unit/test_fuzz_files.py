"""Tier 1 fault corpus: malformed files generated here, fed through every loader of the pack.

Each case must end in the loader's own clear error (a ValueError subclass that names the file),
never a raw exception from a library, and in bounded memory: a header that claims gigabytes
must be refused before anything of that size is allocated.
"""

from __future__ import annotations

import json
import sqlite3
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import open_clip  # noqa: F401 - imported up front: its import is not what is measured
import pytest
import torch
from safetensors.torch import save_file

from compartments.retrieval.embed import Embedder, EmbedderError
from compartments.retrieval.store import ImageStore, StoreError
from compartments.safetensors_header import HeaderError, check_file
from compartments.soup import SoupError, read_manifest
from compartments.soup.st import Reader
from compartments.soup.st import SafetensorsError as SoupFormatError
from compartments.temporal.formats import FormatError as TemporalFormatError
from compartments.temporal.formats import load_layers, load_motion_module
from compartments.temporal.train import TrainError, raw_load_layers

GIB = 1024 ** 3


def _st(header: dict | bytes, body: bytes = b"", claim: int | None = None) -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if claim is None else claim) + raw + body


def _entry(dtype: str = "F32", shape: list | None = None, offsets: list | None = None) -> dict:
    return {"dtype": dtype, "shape": [2, 2] if shape is None else shape, "data_offsets": offsets or [0, 16]}


K = "model.diffusion_model.input_blocks.0.0.weight"
CORPUS: dict[str, bytes] = {
    "zero-byte": b"",
    "text": b"this is not a model, just some text in a file\n" * 3,
    "short": b"\x01\x02\x03",
    "header longer than file": _st({K: _entry()}, claim=10_000),
    "huge header claim": _st(b"{}", claim=2 ** 63),
    "header not json": _st(b"\xff\xfe not json"),
    "header is a list": _st(b"[1, 2, 3]"),
    "lying 3 GiB tensor (147-byte file)": _st({K: _entry(shape=[3 * GIB // 4], offsets=[0, 3 * GIB])}),
    "offsets past the end": _st({K: _entry(offsets=[0, 16])}, b"\0" * 8),
    "overlapping tensors": _st({K: _entry(), K + "2": _entry(offsets=[8, 24])}, b"\0" * 24),
    "negative shape": _st({K: _entry(shape=[-4])}, b"\0" * 16),
    "overflowing shape": _st({K: _entry(shape=[2 ** 62, 2 ** 62])}, b"\0" * 16),
    "shape does not match bytes": _st({K: _entry(shape=[3, 3])}, b"\0" * 16),
    "unknown dtype": _st({K: _entry(dtype="F128")}, b"\0" * 16),
    "offsets not a range": _st({K: _entry(offsets=[16, 0])}, b"\0" * 16),
    "entry not an object": _st({K: 7}),
    "bad metadata": _st({"__metadata__": {"a": 1}, K: _entry()}, b"\0" * 16),
    "NUL and long key": _st({("\0" + "k" * 5000): _entry()}, b"\0" * 15),
}
CASES = sorted(CORPUS)


def _bounded(fn: Callable[[], object], limit: int = 64 * 1024 * 1024) -> None:
    tracemalloc.start()
    try:
        fn()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < limit, f"peak {peak / 1e6:.0f} MB while refusing a malformed file"


@pytest.fixture()
def corpus(tmp_path: Path) -> dict[str, Path]:
    out = {}
    for i, (name, data) in enumerate(CORPUS.items()):
        path = tmp_path / f"case{i:02d}.safetensors"
        path.write_bytes(data)
        out[name] = path
    return out


LOADERS: dict[str, tuple[Callable[[Path], object], type[Exception]]] = {
    "header check": (check_file, HeaderError),
    "soup reader": (lambda p: Reader(p).close(), SoupFormatError),
    "soup manifest": (read_manifest, (SoupFormatError, SoupError)),
    "motion module": (load_motion_module, TemporalFormatError),
    "temporal layers": (load_layers, TemporalFormatError),
    "optimizer / raw layers": (lambda p: raw_load_layers(torch.nn.Linear(2, 2), str(p)), TrainError),
    "open_clip weights": (lambda p: Embedder(p), EmbedderError),
}


@pytest.mark.parametrize("loader", sorted(LOADERS))
@pytest.mark.parametrize("case", CASES)
def test_malformed_safetensors_get_the_loaders_clear_error(corpus, case, loader):
    fn, error = LOADERS[loader]
    path = corpus[case]

    def load() -> None:
        with pytest.raises(error) as err:
            fn(path)
        assert path.name in str(err.value), str(err.value)

    _bounded(load)
    assert path.read_bytes() == CORPUS[case]  # the input is never modified


def test_a_valid_file_still_loads(tmp_path):
    path = tmp_path / "ok.safetensors"
    save_file({K: torch.ones(2, 2), "x": torch.zeros(0)}, str(path), metadata={"a": "b"})
    assert check_file(path) == {"a": "b"}
    with Reader(path) as r:
        assert r.tensor(K).sum() == 4 and r.entries["x"].nbytes == 0


def _store(tmp_path: Path) -> Path:
    """A store folder whose database is replaced by the test (the embedder is never reached)."""
    root = tmp_path / "store"
    (root / "images").mkdir(parents=True)
    (root / "vectors.f32").write_bytes(b"")
    return root


@pytest.mark.parametrize("damage", ["not sqlite", "zero-byte db", "config not json", "config missing",
                                    "config wrong shape"])
def test_corrupt_store_database_is_a_store_error(tmp_path, damage):
    root = _store(tmp_path)
    db = root / "meta.sqlite"
    if damage == "not sqlite":
        db.write_bytes(b"garbage" * 100)
    elif damage == "zero-byte db":
        db.write_bytes(b"")
    else:
        con = sqlite3.connect(db)
        con.execute("CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL)")
        if damage == "config not json":
            con.execute("INSERT INTO meta VALUES ('config', '{not json')")
        elif damage == "config wrong shape":
            con.execute("INSERT INTO meta VALUES ('config', '[1, 2]')")
        con.commit()
        con.close()
    before = db.read_bytes()
    with pytest.raises(StoreError) as err:
        ImageStore(root)
    assert "store" in str(err.value) and err.value.fix
    assert db.read_bytes() == before


VLM_CONFIG = {"model_type": "llava", "vision_config": {"model_type": "clip_vision_model"},
              "text_config": {"model_type": "llama"}}
VLM_CASES: dict[str, dict[str, bytes]] = {
    "empty folder": {},
    "config not json": {"config.json": b"{nope"},
    "config a list": {"config.json": b"[1, 2]"},
    "config binary": {"config.json": b"\xff\xfe\x00"},
    "text-only model": {"config.json": json.dumps({"model_type": "llama"}).encode()},
    "unsupported family": {"config.json": json.dumps({"model_type": "blip", "vision_config": {}}).encode()},
    "pickle weights only": {"config.json": json.dumps(VLM_CONFIG).encode(), "pytorch_model.bin": b"\x80\x04"},
    "lying safetensors": {"config.json": json.dumps(VLM_CONFIG).encode(),
                          "model.safetensors": CORPUS["lying 3 GiB tensor (147-byte file)"]},
    "weights of another model": {"config.json": json.dumps(VLM_CONFIG).encode(),
                                 "model.safetensors": b""},
}


@pytest.mark.parametrize("case", sorted(VLM_CASES))
def test_malformed_vlm_folders_get_a_clear_error(tmp_path, case):
    from compartments.vlm.models import VLMFolderError, load_vlm

    folder = tmp_path / "vlm"
    folder.mkdir()
    for name, data in VLM_CASES[case].items():
        (folder / name).write_bytes(data)
    if case == "weights of another model":
        save_file({"unrelated.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))

    def load() -> None:
        with pytest.raises(VLMFolderError) as err:
            load_vlm(folder)
        assert "vlm" in str(err.value), str(err.value)

    _bounded(load, limit=256 * 1024 * 1024)
