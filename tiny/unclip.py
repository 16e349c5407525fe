"""A tiny SD2.1 unCLIP-L checkpoint (single file, LDM/open_clip key layout) and its CLIP vision tower.

ComfyUI's ``unCLIPCheckpointLoader`` detects it as ``SD21UnclipL`` (UNet with model_channels 320,
context_dim 1024, linear transformer projections, ``adm_in_channels`` 1536) and returns MODEL,
CLIP, VAE and CLIP_VISION. The UNet reuses tiny/sd15.py's two-level shape helpers; the sizes of
the other parts are fixed by ComfyUI's configs and cannot shrink: the OpenCLIP-H text encoder
(24 layers, width 1024: ComfyUI builds it from ``sd2_clip_config.json``), the ViT-L/14 vision
tower (``clip_vision_config_vitl.json`` is chosen by the presence of layer 22) and the SD VAE.
So the file is ~1.3 GB in float16; it is built once (seeded) and cached.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import cached, link_into
from .sd15 import UNET_CONFIG, Shapes, unet_shapes, vae_shapes

UNCLIP_UNET = {**UNET_CONFIG, "context_dim": 1024, "adm_in_channels": 1536}
TEXT = {"width": 1024, "layers": 24, "mlp": 4096, "vocab": 49408, "positions": 77}
VISION = {"width": 1024, "layers": 24, "mlp": 4096, "patch": 14, "image": 224, "proj": 768}


def _block(p: str, w: int, mlp: int) -> Shapes:
    yield f"{p}.ln_1.weight", (w,)
    yield f"{p}.ln_1.bias", (w,)
    yield f"{p}.attn.in_proj_weight", (3 * w, w)
    yield f"{p}.attn.in_proj_bias", (3 * w,)
    yield f"{p}.attn.out_proj.weight", (w, w)
    yield f"{p}.attn.out_proj.bias", (w,)
    yield f"{p}.ln_2.weight", (w,)
    yield f"{p}.ln_2.bias", (w,)
    yield f"{p}.mlp.c_fc.weight", (mlp, w)
    yield f"{p}.mlp.c_fc.bias", (mlp,)
    yield f"{p}.mlp.c_proj.weight", (w, mlp)
    yield f"{p}.mlp.c_proj.bias", (w,)


def unclip_unet_shapes(prefix: str = "model.diffusion_model.") -> Shapes:
    """SD1.5 tiny shapes, with SD2's linear proj_in/proj_out, context 1024 and the ADM label embedding."""
    for name, shape in unet_shapes(UNCLIP_UNET, prefix):
        if (name.endswith("proj_in.weight") or name.endswith("proj_out.weight")) and len(shape) == 4:
            shape = shape[:2]
        yield name, shape
    emb = UNCLIP_UNET["time_embed_dim"]
    yield f"{prefix}label_emb.0.0.weight", (emb, UNCLIP_UNET["adm_in_channels"])
    yield f"{prefix}label_emb.0.0.bias", (emb,)
    yield f"{prefix}label_emb.0.2.weight", (emb, emb)
    yield f"{prefix}label_emb.0.2.bias", (emb,)


def text_shapes(prefix: str = "cond_stage_model.model.") -> Shapes:
    w = TEXT["width"]
    yield f"{prefix}token_embedding.weight", (TEXT["vocab"], w)
    yield f"{prefix}positional_embedding", (TEXT["positions"], w)
    for i in range(TEXT["layers"]):
        yield from _block(f"{prefix}transformer.resblocks.{i}", w, TEXT["mlp"])
    yield f"{prefix}ln_final.weight", (w,)
    yield f"{prefix}ln_final.bias", (w,)
    yield f"{prefix}text_projection", (w, w)


def vision_shapes(prefix: str = "embedder.model.visual.") -> Shapes:
    w, p = VISION["width"], VISION["patch"]
    yield f"{prefix}conv1.weight", (w, 3, p, p)
    yield f"{prefix}class_embedding", (w,)
    yield f"{prefix}positional_embedding", ((VISION["image"] // p) ** 2 + 1, w)
    yield f"{prefix}ln_pre.weight", (w,)
    yield f"{prefix}ln_pre.bias", (w,)
    for i in range(VISION["layers"]):
        yield from _block(f"{prefix}transformer.resblocks.{i}", w, VISION["mlp"])
    yield f"{prefix}ln_post.weight", (w,)
    yield f"{prefix}ln_post.bias", (w,)
    yield f"{prefix}proj", (w, VISION["proj"])


def _init(name: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """Seeded init that keeps activations finite (norms 1, biases 0, 1/sqrt(fan_in) weights)."""
    leaf = name.rsplit(".", 1)[-1]
    if leaf in ("bias", "in_proj_bias"):
        return torch.zeros(shape, dtype=dtype)
    if len(shape) == 1 and any(s in name for s in ("norm", "ln_", "in_layers.0", "out_layers.0", "out.0")):
        return torch.ones(shape, dtype=dtype)
    if "embedding" in name:
        return (torch.randn(shape, generator=gen) * 0.02).to(dtype)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    if name.endswith("text_projection") or name.endswith(".proj"):
        fan_in = shape[0]
    return (torch.randn(shape, generator=gen) / math.sqrt(fan_in)).to(dtype)


def build_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for shapes in (unclip_unet_shapes(), vae_shapes(), text_shapes(), vision_shapes()):
        for name, shape in shapes:
            sd[name] = _init(name, shape, gen, dtype)
    sd["cond_stage_model.model.logit_scale"] = torch.tensor(math.log(100.0), dtype=dtype)
    return sd


def checkpoint(seed: int = 0) -> Path:
    """Path of the cached tiny unCLIP-L checkpoint (built on first use, ~1.3 GB float16)."""
    cfg = {"kind": "sd21-unclip-l", "seed": seed, "unet": UNCLIP_UNET, "text": TEXT, "vision": VISION, "v": 1}

    def build(path: Path) -> None:
        save_file(build_state_dict(seed), str(path),
                  metadata={"modelspec.architecture": "stable-diffusion-v2-1-unclip-l", "compartments.tiny": "unclip"})

    return cached(f"tiny-unclip-l-s{seed}.safetensors", cfg, build)


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place checkpoints/cpr-tiny-unclip-l.safetensors (the CPR workflows' model and CLIP vision)."""
    ckpt = link_into(checkpoint(0), models_dir / "checkpoints" / "cpr-tiny-unclip-l.safetensors")
    return {"checkpoints": [ckpt.name]}
