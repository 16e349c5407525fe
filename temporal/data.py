"""Frames for temporal training: a folder of images, an animated GIF/WEBP/PNG, or a video file.

Everything returns ComfyUI's IMAGE layout, a float32 tensor ``[T, H, W, 3]`` in 0..1, so the
node (which receives IMAGE batches) and the command line (which reads files) feed the same
code. Frames are never modified in place; resizing makes new images.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageSequence

from ..atomic import replacing
from ..errors import CompartmentsError

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
VIDEO_EXTS = {".mp4", ".mov", ".webm", ".mkv", ".avi", ".m4v"}


class FramesError(CompartmentsError):
    """Bad frame input, with the input named and the fix spelled out."""


def _natural_key(name: str) -> list:
    """Sort ``frame2.png`` before ``frame10.png``: exported sequences are rarely zero-padded."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", name)]


def _video_frames(path: Path) -> list[Image.Image]:
    try:
        import av  # ComfyUI ships PyAV for its own video nodes; optional for the plain library.
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise FramesError(
            f"frames: reading '{path.name}' needs PyAV (pip install av). "
            "Fix: install it, or export the video as a folder of PNG frames."
        ) from exc
    with av.open(str(path)) as container:
        return [frame.to_image().convert("RGB") for frame in container.decode(video=0)]


def read_images(path: str | Path) -> list[Image.Image]:
    """All frames at ``path`` as RGB PIL images, in order."""
    path = Path(path)
    if path.is_dir():
        files = sorted((p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTS),
                       key=lambda p: _natural_key(p.name))
        if not files:
            raise FramesError(f"frames: folder '{path}' holds no image files ({sorted(IMAGE_EXTS)}). "
                              "Fix: point at a folder of frames or at a video / animated image.")
        out = []
        for f in files:
            with Image.open(f) as im:
                out.append(im.convert("RGB"))
        return out
    if not path.exists():
        raise FramesError(f"frames: '{path}' does not exist. Fix: give a folder of frames or a video file.")
    if path.suffix.lower() in VIDEO_EXTS:
        return _video_frames(path)
    with Image.open(path) as im:
        return [frame.convert("RGB") for frame in ImageSequence.Iterator(im)]


def images_to_tensor(images: Sequence[Image.Image], size: tuple[int, int] | None = None) -> torch.Tensor:
    """Stack PIL frames into ``[T, H, W, 3]`` float32; resize to ``size`` = (width, height) if given."""
    if not images:
        raise FramesError("frames: no frames given. Fix: give at least as many frames as one clip.")
    if size is None:
        size = images[0].size
        odd = [i for i, im in enumerate(images) if im.size != size]
        if odd:
            raise FramesError(f"frames: frame {odd[0]} is {images[odd[0]].size}, frame 0 is {size}. "
                              "Fix: pass a width and height so that every frame is resized.")
    arrays = [np.asarray(im.convert("RGB").resize(size, Image.LANCZOS) if im.size != size else im.convert("RGB"),
                         dtype=np.float32) / 255.0 for im in images]
    return torch.from_numpy(np.stack(arrays))


def load_frames(path: str | Path, size: tuple[int, int] | None = None, max_frames: int | None = None,
                stride: int = 1) -> torch.Tensor:
    """Read frames from a folder / animated image / video, keep every ``stride``-th, at most ``max_frames``."""
    if stride < 1:
        raise FramesError(f"frames: stride must be >= 1, got {stride}.")
    images = read_images(path)[::stride]
    if max_frames:
        images = images[:max_frames]
    return images_to_tensor(images, size)


def crop_to_multiple(frames: torch.Tensor, multiple: int = 8) -> torch.Tensor:
    """Centre-crop ``[T, H, W, C]`` frames to sides divisible by the VAE's downscale factor."""
    h, w = frames.shape[1], frames.shape[2]
    nh, nw = (h // multiple) * multiple, (w // multiple) * multiple
    if nh == 0 or nw == 0:
        raise FramesError(f"frames: {w}x{h} px is smaller than one latent pixel ({multiple} px).")
    top, left = (h - nh) // 2, (w - nw) // 2
    return frames[:, top:top + nh, left:left + nw]


def moving_square(frames: int = 8, size: int = 64, square: int = 16) -> list[Image.Image]:
    """A synthetic clip: a bright square moving diagonally across a fixed gradient background.

    The motion is the only thing that changes between frames, so the temporal layers have a
    clear signal to fit; it is deterministic (no seed) so tests and workflows agree.
    """
    if frames < 1:
        raise FramesError(f"frames must be >= 1, got {frames}.")
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / max(size - 1, 1)
    bg = np.stack([40 + 60 * xx, 50 + 40 * yy, 110 + 50 * (1 - xx)], axis=-1).astype(np.uint8)
    travel = size - square
    out = []
    for i in range(frames):
        t = i / max(frames - 1, 1)
        x0 = round(t * travel)
        y0 = round((0.25 + 0.5 * t) * travel)
        im = Image.fromarray(bg.copy())
        ImageDraw.Draw(im).rectangle([x0, y0, x0 + square - 1, y0 + square - 1], fill=(240, 210, 60))
        out.append(im)
    return out


def save_frames(images: Sequence[Image.Image], folder: str | Path, prefix: str = "frame") -> list[Path]:
    """Write frames as ``<prefix>_00000.png`` ...; returns the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(images):
        p = folder / f"{prefix}_{i:05d}.png"
        with replacing(p, fsync=False) as tmp:
            im.save(tmp, format="PNG")
        paths.append(p)
    return paths
