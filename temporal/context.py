"""Sliding context windows over the frame axis, as pure functions.

Temporal layers see at most their native frame count (the length of their position table,
32 for AnimateDiff). Longer videos are denoised window by window: each step runs the model
on overlapping windows of ``length`` frames and averages the overlapping predictions with
blending weights that fade towards a window's edges, so neighbouring windows agree and the
video stays coherent (the FreeNoise / AnimateDiff "uniform" scheme).

The same functions drive ComfyUI's ``IndexListContextHandler`` in ``nodes/temporal.py``
(schedule + fuse method) and :func:`run_windowed` for plain-torch callers.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from ..errors import CompartmentsError

BLENDS = ("pyramid", "linear", "flat")


class WindowError(CompartmentsError):
    """A bad window request; the message names the input (``context_length``...)."""


def check_windows(num_frames: int, length: int, overlap: int) -> None:
    """Raise :class:`WindowError` naming the input when a window request cannot work."""
    if num_frames < 1:
        raise WindowError(f"frame count must be at least 1, got {num_frames}")
    if length < 1:
        raise WindowError(f"context_length must be at least 1, got {length}")
    if overlap < 0:
        raise WindowError(f"context_overlap must be 0 or more, got {overlap}")
    if overlap >= length:
        raise WindowError(f"context_overlap ({overlap}) must be smaller than context_length ({length})")
    if num_frames < length:
        raise WindowError(
            f"the video has {num_frames} frames, fewer than context_length ({length}); "
            "use a shorter context_length or more frames")


def windows(num_frames: int, length: int, overlap: int) -> list[list[int]]:
    """Frame indices of each window: stride ``length - overlap``, the last window flush with the end.

    Every frame is covered; a video exactly ``length`` long is one window.
    """
    check_windows(num_frames, length, overlap)
    stride = length - overlap
    starts = list(range(0, max(num_frames - length, 0) + 1, stride))
    if starts[-1] + length < num_frames:
        starts.append(num_frames - length)
    return [list(range(s, s + length)) for s in starts]


def blend_weights(length: int, method: str = "pyramid", overlap: int = 0, first: bool = False,
                  last: bool = False) -> list[float]:
    """Per-frame weights of one window.

    ``pyramid``: rises linearly from the edges to the centre (FreeNoise); ``linear``: 1 in the
    middle, linear ramps over the ``overlap`` frames (none at the video's own start/end);
    ``flat``: all ones (a plain mean).
    """
    if method == "flat":
        return [1.0] * length
    if method == "pyramid":
        return [float(min(i + 1, length - i)) for i in range(length)]
    if method == "linear":
        w = [1.0] * length
        if overlap > 0:
            ramp = [(i + 1) / (overlap + 1) for i in range(overlap)]
            if not first:
                w[:overlap] = ramp
            if not last:
                w[length - overlap:] = ramp[::-1]
        return w
    raise WindowError(f"context blend must be one of {BLENDS}, got {method!r}")


def fuse(outputs: list[torch.Tensor], index_lists: list[list[int]], num_frames: int, method: str = "pyramid",
         overlap: int = 0, dim: int = 0) -> torch.Tensor:
    """Weighted average of per-window outputs back onto ``num_frames`` frames along ``dim``."""
    first = outputs[0]
    shape = list(first.shape)
    shape[dim] = num_frames
    total = torch.zeros(shape, dtype=first.dtype, device=first.device)
    count_shape = [1] * first.ndim
    count_shape[dim] = num_frames
    count = torch.zeros(count_shape, dtype=first.dtype, device=first.device)
    for k, (out, idx) in enumerate(zip(outputs, index_lists, strict=True)):
        w = torch.tensor(blend_weights(len(idx), method, overlap, first=k == 0, last=k == len(index_lists) - 1),
                         dtype=first.dtype, device=first.device)
        view = [1] * first.ndim
        view[dim] = len(idx)
        w = w.view(view)
        total.index_add_(dim, torch.tensor(idx, device=first.device), out * w)
        count.index_add_(dim, torch.tensor(idx, device=first.device), w)
    return total / count


def run_windowed(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, length: int, overlap: int,
                 method: str = "pyramid", dim: int = 0) -> torch.Tensor:
    """Apply ``fn`` to each window of ``x`` along ``dim`` and fuse; identical to ``fn(x)`` when one window."""
    n = x.shape[dim]
    idx = windows(n, length, overlap)
    if len(idx) == 1:
        return fn(x)
    outs = [fn(x.index_select(dim, torch.tensor(i, device=x.device))) for i in idx]
    return fuse(outs, idx, n, method, overlap, dim)
