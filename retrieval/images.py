"""Image bytes for the store: validate, decode, hash, and write the content-addressed copies.

Backend-neutral (no SQLite, no index): what any store does with the files it is given.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_bytes


def unreadable(exc: Exception) -> str:
    """The skip reason for image bytes PIL cannot decode."""
    why = "unrecognised format" if type(exc).__name__ == "UnidentifiedImageError" else str(exc)
    return f"not a readable image: {why}"


def probe_image(data: bytes) -> tuple[str, int, int]:
    """(PIL format, width, height) of image bytes, without decoding the pixels. Raises on
    corrupt/truncated/non-image data (``verify()`` catches truncation even when another part of
    the process, ComfyUI's loader, has set ``ImageFile.LOAD_TRUNCATED_IMAGES``)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as probe:
        fmt, (w, h) = probe.format or "PNG", probe.size
        probe.verify()
    return fmt, w, h


def decode_image(data: bytes, max_side: int | None = None) -> tuple[torch.Tensor, str]:
    """Bytes -> ([H, W, 3] float 0..1, PIL format); with ``max_side``, downscaled (aspect kept)
    so no side exceeds it. Raises on corrupt/truncated/non-image data."""
    from PIL import Image, ImageOps

    fmt = probe_image(data)[0]
    with Image.open(io.BytesIO(data)) as img:
        if max_side:
            img.draft("RGB", (max_side, max_side))  # JPEG: decode at a reduced scale directly
        img.load()
        img = ImageOps.exif_transpose(img).convert("RGB")
        if max_side and max(img.size) > max_side:
            img.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        arr = np.asarray(img, dtype=np.uint8).copy()
    return torch.from_numpy(arr).float().div_(255.0), fmt


def fit(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Cover-resize and centre-crop [H, W, 3] to [h, w, 3] (batches need one size)."""
    import torch.nn.functional as F

    if img.shape[0] == h and img.shape[1] == w:
        return img
    ih, iw = img.shape[:2]
    scale = max(h / ih, w / iw)
    nh, nw = max(h, round(ih * scale)), max(w, round(iw * scale))
    x = F.interpolate(img.permute(2, 0, 1)[None], size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
    top, left = (nh - h) // 2, (nw - w) // 2
    return x[0, :, top:top + h, left:left + w].permute(1, 2, 0).clamp(0, 1)


def sha256_hex(data: bytes) -> str:
    """The content hash that names a copy and identifies an image across adds and forgets."""
    return hashlib.sha256(data).hexdigest()


def copy_name(sha: str, fmt: str) -> str:
    """The file name of a copy: its hash and the extension of its PIL format (JPEG -> jpg)."""
    return f"{sha}.{({'JPEG': 'jpg'}.get(fmt, fmt.lower()))}"


def write_copies(root: Path, files: Sequence[tuple[str, bytes]]) -> list[Path]:
    """Write each (relative path, bytes) under ``root`` that is not there yet (atomically); the
    files written. If a write fails, the ones written here are deleted (not earlier ones)."""
    written: list[Path] = []
    try:
        for rel, data in files:
            dst = root / rel
            if not dst.exists():
                write_bytes(dst, data)
                written.append(dst)
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
    return written


@contextmanager
def copies_written(root: Path, files: Sequence[tuple[str, bytes]]) -> Iterator[None]:
    """:func:`write_copies`, then run the block; if it raises, delete the copies written here."""
    written = write_copies(root, files)
    try:
        yield
    except BaseException:
        for p in written:
            p.unlink(missing_ok=True)
        raise
