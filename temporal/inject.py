"""Placing temporal layers in an image UNet's forward pass (plain torch, no ComfyUI import).

The host (``nodes/temporal.py``) inserts one :class:`MotionSlot` into each UNet block that has
a temporal layer, after the block's spatial layers and before any upsampler; ComfyUI calls
:func:`timestep_embed_handler` for it (``forward_timestep_embed_patch``). Any other host can
call the function from :func:`make_apply` after spatial block ``block_index``.

Frames are the batch: a UNet call sees ``n_conds * frames`` samples (cond and uncond
stacked), so frames per video = batch / len(``cond_or_uncond``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from ..errors import CompartmentsError
from .context import BLENDS
from .layers import Layout, MotionModule, TemporalLayer

Block = tuple[str, int]
ApplyFn = Callable[[Block, torch.Tensor, int, Any], torch.Tensor]


class LayoutMismatch(CompartmentsError):
    """Temporal layers built for another UNet (e.g. an SDXL motion module on an SD1.5 model)."""


class InjectionError(CompartmentsError):
    """A setting of Apply Temporal Layers that cannot work; ``field`` names the input."""


def check_compatible(module_layout: Layout, model_layout: Layout) -> None:
    """Raise :class:`LayoutMismatch` saying both layouts when the layers cannot fit the UNet."""
    same = (module_layout.block_channels == model_layout.block_channels
            and module_layout.num_res_blocks == model_layout.num_res_blocks)
    if not same:
        def show(lay: Layout) -> str:
            return f"{lay.name} (channels {'/'.join(map(str, lay.block_channels))}, {lay.num_res_blocks} res blocks)"
        raise LayoutMismatch(f"the temporal layers are for {show(module_layout)} but the model is {show(model_layout)}")


def check_frames(num_frames: int, max_frames: int, context_length: int) -> None:
    """Frames one UNet call will see must fit the position table (``max_frames``)."""
    if num_frames < 1:
        raise InjectionError(f"must be at least 1, got {num_frames}.",
                             "set it to the number of frames (the latent batch size).", "frame_count")
    if context_length > 0:
        if num_frames < context_length:
            raise InjectionError(f"the video has {num_frames} frames, fewer than context_length ({context_length}).",
                                 "make context_length at most the frame count, or 0 to switch windows off.",
                                 "frame_count")
        if context_length > max_frames:
            raise InjectionError(f"{context_length} exceeds the layers' native {max_frames} frames.",
                                 f"use {max_frames} or less.", "context_length")
    elif num_frames > max_frames:
        raise InjectionError(f"{num_frames} frames exceed the layers' native {max_frames} frames.",
                             f"set context_length to {min(16, max_frames)} (sliding windows) for long videos.",
                             "frame_count")


def check_injection(module: MotionModule, model_layout: Layout, frame_count: int, context_length: int = 0,
                    context_overlap: int = 4, context_blend: str = "pyramid", alpha: float = -1.0,
                    alpha_overrides: str = "") -> dict[str, float | None]:
    """Every check of Apply Temporal Layers, before anything is patched; returns each layer's alpha.

    ``alpha`` -1 keeps the layers' own (learned) alphas; ``alpha_overrides`` names layers or
    prefixes (see :func:`parse_alpha_overrides`) and wins over ``alpha``. Raises
    :class:`InjectionError` naming the input and the fix.
    """
    if frame_count < 1:
        check_frames(frame_count, module.max_frames, context_length)
    try:
        check_compatible(module.layout, model_layout)
    except LayoutMismatch as exc:
        raise InjectionError(str(exc) + ".", f"load a motion module made for {model_layout.name} (an SD1.5 v1/v2/v3 "
                             "module for SD1.5 checkpoints, AnimateDiff-SDXL beta or Hotshot-XL for SDXL-family "
                             "ones).", "temporal_layers") from exc
    if context_length < 0:
        raise InjectionError(f"must be 0 (off) or more, got {context_length}.", "", "context_length")
    if context_length > 0:
        if context_overlap >= context_length:
            raise InjectionError(f"{context_overlap} must be smaller than context_length ({context_length}).",
                                 f"use at most {context_length - 1}, e.g. {context_length // 4}.", "context_overlap")
        if context_overlap < 0:
            raise InjectionError(f"must be 0 or more, got {context_overlap}.", "", "context_overlap")
    check_frames(frame_count, module.max_frames, context_length)
    if context_blend not in BLENDS:
        raise InjectionError(f"unknown '{context_blend}'.", f"use one of {list(BLENDS)}.", "context_blend")
    if alpha > 1.0 or (alpha < 0.0 and alpha != -1.0):
        raise InjectionError(f"{alpha} is outside 0..1.", "use 0..1, or -1 for the layers' own alphas.", "alpha")
    keys = [s.key for s in module.layout.slots]
    try:
        per_layer = parse_alpha_overrides(alpha_overrides, keys)
    except ValueError as exc:
        raise InjectionError(str(exc) + ".", "write NAME=VALUE pairs, e.g. 'down_blocks=0.5, "
                             "up_blocks.1.motion_modules.0=1'.", "alpha_overrides") from exc
    return {k: per_layer.get(k, None if alpha < 0 else alpha) for k in keys}


def frames_per_video(batch: int, cond_or_uncond: list[int] | None) -> int:
    """Frames in each video of a UNet batch that stacks ``len(cond_or_uncond)`` videos."""
    n = max(len(cond_or_uncond or [0]), 1)
    if batch % n:
        raise ValueError(f"UNet batch {batch} is not a multiple of the {n} stacked conditionings")
    return batch // n


class MotionSlot(nn.Module):
    """A temporal layer as a child of a UNet block, with the user's alpha override for it.

    Holds the shared layer (weights are not copied; two patched models share them) so that
    moving the UNet moves the layer.
    """

    def __init__(self, layer: TemporalLayer, key: str, alpha: float | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.layer = layer
        self.key = key
        self.alpha = alpha
        self.compute_dtype = dtype

    def forward(self, x: torch.Tensor, num_frames: int) -> torch.Tensor:
        p = next(self.layer.parameters())
        if p.device != x.device:
            self.layer.to(x.device)
        dtype = p.dtype
        y = self.layer(x.to(dtype), num_frames, self.alpha)
        return y.to(x.dtype)


def timestep_embed_handler(layer: MotionSlot, x: torch.Tensor, emb: Any, context: Any, transformer_options: dict,
                           *rest: Any, **kwargs: Any) -> torch.Tensor:
    """``forward_timestep_embed_patch`` handler: frames from the batch and ``cond_or_uncond``."""
    num_frames = frames_per_video(x.shape[0], transformer_options.get("cond_or_uncond"))
    return layer(x, num_frames)


def make_apply(module: MotionModule, alphas: dict[str, float] | float | None = None) -> ApplyFn:
    """``apply(block_index, h, num_frames, context) -> h`` for a host's own UNet loop.

    ``block_index`` is ComfyUI's ``("input"|"middle"|"output", i)``; blocks without a
    temporal layer return ``h`` unchanged. ``alphas`` overrides per layer key or for all.
    """
    layers = module.layers()
    if isinstance(alphas, dict):
        unknown = sorted(set(alphas) - set(layers))
        if unknown:
            raise ValueError(f"alpha override names unknown layers {unknown}")

    def alpha_for(key: str) -> float | None:
        if alphas is None:
            return None
        if isinstance(alphas, dict):
            return alphas.get(key)
        return float(alphas)

    def apply(block_index: Block, h: torch.Tensor, num_frames: int, context: Any = None) -> torch.Tensor:
        for slot in module.layout.slots:
            if slot.block == (block_index[0], int(block_index[1])):
                return layers[slot.key](h, num_frames, alpha_for(slot.key))
        return h

    return apply


def parse_alpha_overrides(text: str, keys: list[str]) -> dict[str, float]:
    """Parse ``"down_blocks.0=0.2, up_blocks=1"`` into per-layer alphas.

    Each name is a layer key or a prefix of keys (``down_blocks``, ``mid_block``,
    ``up_blocks.1``); later entries win. Empty text gives ``{}``.
    """
    out: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.replace(";", ",").replace("\n", ",").split(","))):
        if "=" not in part:
            raise ValueError(f"'{part}' is not NAME=VALUE")
        name, value = (s.strip() for s in part.split("=", 1))
        try:
            a = float(value)
        except ValueError as exc:
            raise ValueError(f"'{value}' for {name} is not a number") from exc
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"alpha for {name} must be within 0..1, got {a}")
        hit = [k for k in keys if k == name or k.startswith(name + ".")]
        if not hit:
            raise ValueError(f"'{name}' matches no temporal layer; layers are {keys[0]} ... {keys[-1]}")
        for k in hit:
            out[k] = a
    return out
