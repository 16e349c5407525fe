"""Full-size SD1.5 checkpoint and AnimateDiff SD1.5 v3 motion module, seeded random, for side-by-side runs.

AnimateDiff-Evolved builds its motion model for the real SD1.5 channel layout (320/640/1280/1280,
two res blocks per level), so comparing Compartments with it needs full-size weights. These
builders give exactly that layout with seeded random weights (no download): the UNet of
``tiny.sd15.unet_shapes`` with SD1.5's real config, the full VAE and CLIP-L, and a motion module
in AnimateDiff's original key layout, v3 style (no mid block, 32-frame position table), which both
loaders detect as "SD1.5 v3". Files are about 1.7 GB and 0.8 GB (float16) and are cached under
``tiny.cache_dir()``; nothing here is placed by ``prepare_all`` (the benchmark asks for them).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from ..temporal.layers import SD15
from . import cached
from .sd15 import build_state_dict
from .temporal import _save, motion_state_dict

SD15_UNET_CONFIG = {
    "in_channels": 4,
    "out_channels": 4,
    "model_channels": 320,
    "channel_mult": [1, 2, 4, 4],
    "num_res_blocks": 2,
    "context_dim": 768,
    "time_embed_dim": 1280,
    "attention": [True, True, True, False],
}


def sd15_checkpoint(seed: int = 0, dtype: str = "float16") -> Path:
    """Path of a cached full-size SD1.5 single-file checkpoint (random weights, real key layout)."""
    cfg = {"kind": "sd15-full", "seed": seed, "dtype": dtype, "unet": SD15_UNET_CONFIG, "v": 1}

    def build(path: Path) -> None:
        sd = build_state_dict(seed, unet=SD15_UNET_CONFIG, dtype=getattr(torch, dtype))
        save_file(sd, str(path), metadata={"modelspec.architecture": "stable-diffusion-v1",
                                            "compartments.tiny": "sd15-full"})

    return cached(f"full-sd15-s{seed}.safetensors", cfg, build)


def motion_module_v3(seed: int = 0) -> Path:
    """Path of a cached full-size AnimateDiff SD1.5 v3 motion module in the original key layout."""
    cfg = {"kind": "mm-sd15-v3-original", "seed": seed, "v": 1}
    return cached(f"full-mm-sd15-v3-s{seed}.safetensors", cfg,
                  lambda p: _save(motion_state_dict(SD15, seed=seed, max_frames=32, mid=False), p))


__all__ = ["SD15_UNET_CONFIG", "sd15_checkpoint", "motion_module_v3"]
