"""Flux Redux for CPR's private branch: the SigLIP 384 vision tower and the Redux style model, in their real layouts.

ComfyUI's ``CLIPVisionLoader`` picks its SigLIP-384 config when layer 22 exists, the width is 1152
and there are 729 position embeddings, and builds the tower from that fixed config (27 layers,
1152 wide, MLP 4304), so nothing about it can shrink: 0.41 B parameters. It is stored in
``float8_e4m3fn`` to keep the tiny-model cache under its 10 GB budget (ComfyUI casts weights to its
compute dtype on load, as it does for fp8 checkpoints); the key layout is the HF SigLIP one under
``vision_model.`` that Comfy-Org's ``sigclip_vision_patch14_384.safetensors`` uses. ``StyleModelLoader``
detects Redux by ``redux_down.weight``; ``ReduxImageEncoder`` is fixed at 1152 -> 12288 -> 4096
(Flux's T5 width), 65 M parameters in fp16. Each image becomes 729 style tokens.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import cached, link_into
from .sd15 import Shapes, _linear, _norm, encoder_layer_shapes

SIGLIP = {"width": 1152, "layers": 27, "mlp": 4304, "patch": 14, "image": 384}
REDUX = {"vision": 1152, "text": 4096}
CLIP_VISION_NAME = "cpr-tiny-sigclip-vision-384.safetensors"
STYLE_MODEL_NAME = "cpr-tiny-flux1-redux.safetensors"
TOKENS_PER_IMAGE = (SIGLIP["image"] // SIGLIP["patch"]) ** 2  # 729


def siglip_shapes(cfg: dict = SIGLIP, prefix: str = "vision_model.") -> Shapes:
    w, p = cfg["width"], cfg["patch"]
    yield f"{prefix}embeddings.patch_embedding.weight", (w, 3, p, p)
    yield f"{prefix}embeddings.patch_embedding.bias", (w,)
    yield f"{prefix}embeddings.position_embedding.weight", ((cfg["image"] // p) ** 2, w)
    for i in range(cfg["layers"]):
        yield from encoder_layer_shapes(f"{prefix}encoder.layers.{i}", w, cfg["mlp"])
    yield from _norm(f"{prefix}post_layernorm", w)


def redux_shapes(cfg: dict = REDUX) -> Shapes:
    yield from _linear("redux_up", cfg["vision"], 3 * cfg["text"])
    yield from _linear("redux_down", 3 * cfg["text"], cfg["text"])


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if len(shape) == 1:
        return torch.ones(shape) if "norm" in name else torch.zeros(shape)
    if "position_embedding" in name:
        return torch.randn(shape, generator=gen) * 0.02
    return torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))


def _build(shapes: Shapes, dtype: torch.dtype, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: _tensor(name, shape, gen).to(dtype) for name, shape in shapes}


def clip_vision(seed: int = 0) -> Path:
    """The cached SigLIP-384 vision tower (0.41 GB in fp8)."""
    cfg = {"kind": "siglip-384", "seed": seed, "config": SIGLIP, "dtype": "float8_e4m3fn", "v": 2}

    def build(path: Path) -> None:
        save_file(_build(siglip_shapes(), torch.float8_e4m3fn, seed), str(path),
                  metadata={"compartments.tiny": "siglip-384"})

    return cached(f"tiny-siglip-384-s{seed}.safetensors", cfg, build)


def style_model(seed: int = 0) -> Path:
    """The cached Redux style model (0.13 GB in fp16)."""
    cfg = {"kind": "flux-redux", "seed": seed, "config": REDUX, "v": 1}

    def build(path: Path) -> None:
        save_file(_build(redux_shapes(), torch.float16, 40_000 + seed), str(path),
                  metadata={"compartments.tiny": "flux-redux"})

    return cached(f"tiny-flux-redux-s{seed}.safetensors", cfg, build)


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place clip_vision/ and style_models/ files for the CPR-on-Flux workflow."""
    vision = link_into(clip_vision(), models_dir / "clip_vision" / CLIP_VISION_NAME)
    style = link_into(style_model(), models_dir / "style_models" / STYLE_MODEL_NAME)
    return {"clip_vision": [vision.name], "style_models": [style.name]}
