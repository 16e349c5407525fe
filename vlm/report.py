"""Drawing and serialising the per-token Prompt Dependency Measure (PDM) of M3ID captions.

The PDM curve shows where a caption stops looking at the image (values near 0) — the
tokens M3ID is meant to pull back towards the image. Drawn with PIL only, so a node can
return it as an IMAGE without matplotlib.
"""

from __future__ import annotations

import json

import numpy as np
from PIL import Image, ImageDraw

from ..samplers.m3id import CaptionResult


def pdm_json(results: list[CaptionResult], tokenizer=None, settings: dict | None = None) -> str:
    """One JSON document with, per caption: text, error, tokens, PDM per token and gate flags."""
    items = []
    for i, r in enumerate(results):
        tokens = tokenizer.convert_ids_to_tokens(r.token_ids) if tokenizer is not None else r.token_ids
        items.append({
            "index": i,
            "caption": r.text,
            "error": r.error,
            "tokens": tokens,
            "pdm": [round(p, 6) for p in r.pdm],
            "gate_open": r.gated,
            "mean_pdm": round(float(np.mean(r.pdm)), 6) if r.pdm else None,
        })
    return json.dumps({"settings": settings or {}, "captions": items}, ensure_ascii=False)


def pdm_plot(result: CaptionResult, width: int = 384, height: int = 192) -> np.ndarray:
    """An RGB float image (H, W, 3) in [0, 1]: PDM per token as a line; tokens where the gate was open in orange."""
    img = Image.new("RGB", (width, height), (250, 250, 250))
    draw = ImageDraw.Draw(img)
    left, right, top, bottom = 36, width - 8, 18, height - 22
    draw.rectangle([left, top, right, bottom], outline=(60, 60, 60))
    # the y axis follows the data (PDM of real captions is often well below 1), at least 0..0.05
    ymax = max(0.05, min(1.0, max(result.pdm, default=0.0) * 1.1))
    for frac in (0.0, 0.5, 1.0):
        y = bottom - frac * (bottom - top)
        draw.line([left - 3, y, left, y], fill=(60, 60, 60))
        draw.text((2, y - 6), f"{frac * ymax:.3f}", fill=(60, 60, 60))
    title = "PDM per token" if not result.error else f"error: {result.error[:48]}"
    draw.text((left, 3), title, fill=(20, 20, 20))
    n = len(result.pdm)
    draw.text((left, bottom + 5), f"tokens: {n}", fill=(60, 60, 60))
    if n:
        xs = [left + (i + 0.5) * (right - left) / n for i in range(n)]
        ys = [bottom - min(max(p, 0.0), ymax) / ymax * (bottom - top) for p in result.pdm]
        if n > 1:
            draw.line(list(zip(xs, ys, strict=True)), fill=(30, 90, 200), width=2)
        for x, y, g in zip(xs, ys, result.gated or [False] * n, strict=True):
            r = 2
            draw.ellipse([x - r, y - r, x + r, y + r], fill=(220, 80, 40) if g else (30, 90, 200))
    return np.asarray(img, dtype=np.float32) / 255.0
