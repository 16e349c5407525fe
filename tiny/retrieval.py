"""A tiny open_clip model and a folder of small images for the retrieval store.

The model is open_clip's own ``CLIP`` class built from a small config (ViT image tower,
transformer text tower, the real 49408-token BPE vocabulary so open_clip's tokenizer works)
with seeded random weights, saved as safetensors in open_clip's key layout. The config rides
in the safetensors metadata (``open_clip_config``), so ``Embedder(weights, "auto")`` rebuilds
it. The images are 64x64 PNGs of distinct colour patterns plus one corrupt file and one text
file, so a folder build shows the skip report.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import cached, link_into

MODEL_CONFIG = {
    "embed_dim": 64,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
IMAGE_COUNT = 6
WEIGHTS_NAME = "retrieval-tiny-open-clip.safetensors"
INPUT_FOLDER = "retrieval_demo"
QUERY_IMAGE = "retrieval-query.png"


PREBUILT_STORE = "retrieval-prebuilt"


def clip_weights(seed: int = 0) -> Path:
    """Seeded tiny open_clip model as safetensors (config in metadata); cached."""
    config = {"model_cfg": MODEL_CONFIG, "seed": seed, "kind": "open_clip"}

    def build(path: Path) -> None:
        import open_clip

        torch.manual_seed(seed)
        model = open_clip.CLIP(**MODEL_CONFIG)
        sd = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
        meta = {"open_clip_config": json.dumps({"name": "compartments-tiny-open-clip", "model_cfg": MODEL_CONFIG})}
        save_file(sd, str(path), metadata=meta)

    return cached("retrieval-tiny-open-clip.safetensors", config, build)


def image_array(i: int, size: int = 64):
    """Deterministic distinct picture number ``i`` as uint8 [size, size, 3]."""
    import numpy as np

    g = torch.Generator().manual_seed(1000 + i)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    c = torch.rand(3, 3, generator=g)
    freq = 1 + i % 4
    img = torch.stack([
        c[0, k] * xx + c[1, k] * yy + c[2, k] * (0.5 + 0.5 * torch.sin(6.283 * freq * (xx + (k + 1) * yy)))
        for k in range(3)
    ], dim=-1)
    img = img / img.amax().clamp_min(1e-6)
    return (img.clamp(0, 1) * 255).round().to(torch.uint8).numpy().astype(np.uint8)


def images_folder(count: int = IMAGE_COUNT, size: int = 64, junk: bool = True) -> Path:
    """A folder with ``count`` PNGs (img_00.png...), plus ``broken.png`` (truncated) and ``notes.txt``."""
    config = {"count": count, "size": size, "junk": junk, "v": 1}

    def build(path: Path) -> None:
        from PIL import Image

        path.mkdir(parents=True)
        for i in range(count):
            Image.fromarray(image_array(i, size)).save(path / f"img_{i:02d}.png")
        if junk:
            good = (path / "img_00.png").read_bytes()
            (path / "broken.png").write_bytes(good[: len(good) // 3])
            (path / "notes.txt").write_text("not an image\n")

    return cached("retrieval-images", config, build)


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place the tiny open_clip weights in models/clip_vision, the demo folder in input/, a
    query image (a copy of img_03.png) at input/retrieval-query.png for LoadImage, and a store
    built from the demo folder at models/retrieval_stores/retrieval-prebuilt."""
    weights = link_into(clip_weights(), Path(models_dir) / "clip_vision" / WEIGHTS_NAME)
    folder = Path(input_dir) / INPUT_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    src = images_folder()
    for f in sorted(src.iterdir()):
        link_into(f, folder / f.name)
    link_into(src / "img_03.png", Path(input_dir) / QUERY_IMAGE)
    stores = Path(models_dir) / "retrieval_stores"
    stores.mkdir(parents=True, exist_ok=True)
    if not (stores / PREBUILT_STORE).exists():
        # A store the workflows can open with Load Image Store. Built here, not linked from the
        # cache: stores are written to (visibility, forget), and the cache must stay as built.
        from ..retrieval.embed import Embedder
        from ..retrieval.store import build_or_update

        store, _report, _created = build_or_update(stores / PREBUILT_STORE, Embedder(weights), src, owner="demo")
        store.close()
    placed = [f"{INPUT_FOLDER}/{f.name}" for f in sorted(src.iterdir())]
    return {"clip_vision": [weights.name], "retrieval_stores": [PREBUILT_STORE], "input": [*placed, QUERY_IMAGE]}
