"""Inputs for the temporal-training workflow: a synthetic moving-square clip as an animated WEBP.

Core ``LoadImage`` reads every frame of an animated WEBP into one IMAGE batch, so the shipped
workflow needs no video loader. The clip is deterministic (no seed), 8 frames at 64x64.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..temporal.data import moving_square
from . import cached, link_into

CLIP = {"frames": 8, "size": 64, "square": 16}
INPUT_NAME = "temporal_train_square.webp"


def clip_file() -> Path:
    """The cached animated WEBP (lossless, so frames decode exactly as drawn)."""

    def build(tmp: Path) -> None:
        frames = moving_square(**CLIP)
        part = tmp.with_name(tmp.name + ".part.webp")
        frames[0].save(part, format="WEBP", save_all=True, append_images=frames[1:], lossless=True,
                       duration=125, loop=0)
        os.replace(part, tmp)

    return cached("temporal-train-square.webp", CLIP, build)


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place ``input/temporal_train_square.webp`` (the tiny SD1.5 checkpoint comes from tiny.sd15)."""
    link_into(clip_file(), Path(input_dir) / INPUT_NAME)
    return {"input": [INPUT_NAME]}
