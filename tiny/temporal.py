"""Tiny AnimateDiff motion modules for the tiny SD1.5 UNet, in the real key layouts.

The tiny UNet (``tiny/sd15.py``: channels 320/640, one res block per level) gets a motion
module with AnimateDiff's exact parameter names and shapes per slot (8 heads, GEGLU
feed-forward, 32-frame position table), once in the original layout (``...temporal_transformer
...attention_blocks.0...pos_encoder.pe``) and once in diffusers' MotionAdapter layout
(``...attn1...norm1``). Weights are seeded random with a non-zero ``proj_out`` (a real
trained module is not the identity), scaled so activations stay tame.

``shapes_only`` gives full-size SD1.5 / SDXL key sets on the meta device (for detection and
wrong-base tests) without allocating a gigabyte.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..temporal.formats import original_to_diffusers
from ..temporal.layers import SD15, SDXL, TINY_SD15, Layout, MotionModule
from . import cached, link_into

ORIGINAL_NAME = "temporal-tiny-mm-original.safetensors"
DIFFUSERS_NAME = "temporal-tiny-mm-diffusers.safetensors"
LAYERS_NAME = "temporal-tiny-layers.safetensors"


def motion_state_dict(layout: Layout = TINY_SD15, seed: int = 0, max_frames: int = 32, mid: bool | None = None,
                      proj_out_scale: float = 0.5) -> dict[str, torch.Tensor]:
    """Original-layout AnimateDiff state dict for ``layout`` with seeded weights."""
    if mid is not None and mid != layout.mid:
        from ..temporal.layers import make_layout

        layout = make_layout(layout.name, layout.model_channels, layout.channel_mult, layout.num_res_blocks, mid)
    torch.manual_seed(seed)
    module = MotionModule(layout, ("attention",), max_frames=max_frames)
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in module.state_dict().items():
        if k.endswith("blender.mix_factor"):
            continue  # AnimateDiff files have no blender
        if k.endswith("pos_encoder.pe"):
            sd[k] = v.clone()
        elif v.ndim == 1:
            base = torch.ones_like(v) if ("norm" in k.rsplit(".", 2)[-2] and k.endswith("weight")) else torch.zeros_like(v)
            sd[k] = base + 0.02 * torch.randn(v.shape, generator=gen)
        else:
            scale = proj_out_scale if ".proj_out." in k else 1.0
            sd[k] = torch.randn(v.shape, generator=gen) * scale / math.sqrt(v.shape[1])
    return sd


def _save(sd: dict[str, torch.Tensor], path: Path, dtype: torch.dtype = torch.float16) -> None:
    # the position table stays float32 so that both layouts (diffusers drops it) give identical layers
    save_file({k: (v if k.endswith(".pe") else v.to(dtype)).contiguous() for k, v in sd.items()}, str(path))


def original_file(seed: int = 0) -> Path:
    """Tiny motion module in the original AnimateDiff layout (v2-style: with a mid block)."""
    cfg = {"kind": "tiny-mm-original", "seed": seed, "v": 2}
    return cached(f"tiny-mm-original-s{seed}.safetensors", cfg, lambda p: _save(motion_state_dict(seed=seed), p))


def diffusers_file(seed: int = 0) -> Path:
    """The same weights in diffusers' MotionAdapter layout (no ``pe``, as diffusers converts)."""
    cfg = {"kind": "tiny-mm-diffusers", "seed": seed, "v": 2}
    return cached(f"tiny-mm-diffusers-s{seed}.safetensors", cfg,
                  lambda p: _save(original_to_diffusers(motion_state_dict(seed=seed)), p))


def layers_file(seed: int = 0, frames: int = 16) -> Path:
    """Compartments' own (Video LDM style) layers for the tiny UNet: attention + 3D conv, alpha 0.5."""
    cfg = {"kind": "tiny-layers", "seed": seed, "frames": frames, "v": 1}

    def build(path: Path) -> None:
        from ..temporal.formats import save_layers

        torch.manual_seed(seed)
        save_layers(MotionModule(TINY_SD15, ("attention", "conv"), max_frames=32), path, frames, base="sd15")

    return cached(f"tiny-layers-s{seed}.safetensors", cfg, build)


def shapes_only(layout: Layout, max_frames: int = 32) -> dict[str, torch.Tensor]:
    """Original-layout key set of a full-size module (SD1.5, SDXL) on the meta device: shapes, no memory.

    Detection and wrong-base checks read only keys and shapes, so tests need no 1 GB file.
    """
    with torch.device("meta"):
        module = MotionModule(layout, ("attention",), max_frames=max_frames)
    return {k: v for k, v in module.state_dict().items() if not k.endswith("blender.mix_factor")}


__all__ = ["SD15", "SDXL", "original_file", "diffusers_file", "shapes_only", "motion_state_dict", "prepare"]


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place the tiny motion modules into ``models/animatediff_models``."""
    a = link_into(original_file(0), models_dir / "animatediff_models" / ORIGINAL_NAME)
    b = link_into(diffusers_file(0), models_dir / "animatediff_models" / DIFFUSERS_NAME)
    c = link_into(layers_file(0), models_dir / "temporal_layers" / LAYERS_NAME)
    return {"animatediff_models": [a.name, b.name], "temporal_layers": [c.name]}
