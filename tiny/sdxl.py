"""A tiny SDXL-family checkpoint: an SDXL UNet, SDXL's two text encoders and its VAE, in the original single-file layout.

ComfyUI matches SDXL variants on ``model_channels``, ``use_linear_in_transformer``, the input
blocks' ``transformer_depth``, ``context_dim`` and ``adm_in_channels``; the channel widths of the
deeper levels are free. This UNet has Segmind Vega's signature (320 channels, transformer depths
0,0,1,1,2,2, context 2048, ADM 2816: pooled CLIP-G plus six size embeddings) at 320 channels on
every level, so ``CheckpointLoaderSimple`` reports ``Segmind_Vega`` (a subclass of ``SDXL``) and it
samples on a CPU in seconds. The text encoders are SDXL's, in their real shapes because ComfyUI
builds them from fixed configs: CLIP-L (HF layout under ``conditioner.embedders.0.transformer.``)
and OpenCLIP bigG (open_clip layout under ``conditioner.embedders.1.model.``, 32 layers, 1280
wide: 1.4 GB of the 2.0 GB file). The VAE is SD's (``first_stage_model.``), shared with SD1.5.
Weights are seeded random, scaled 1/sqrt(fan_in). Members are fine-tunes of the base's UNet,
shipped as diffusion-model-only files.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import cached, link_into
from .sd15 import Shapes, _linear, _norm, clip_shapes, random_tensor, unet_shapes, vae_shapes

UNET_CONFIG = {"model_channels": 320, "channel_mult": [1, 1, 1], "num_res_blocks": 2, "context_dim": 2048,
               "adm_in_channels": 2816, "time_embed_dim": 1280, "transformer_depth": [0, 0, 1, 1, 2, 2],
               "transformer_depth_output": [0, 0, 0, 1, 1, 1, 2, 2, 2], "transformer_depth_middle": 1}
CLIP_G = {"width": 1280, "layers": 32, "mlp": 5120, "vocab": 49408, "positions": 77}
CONTEXT_SHAPE = (1, 77, 2048)   # CLIP-L (768) and CLIP-G (1280) penultimate tokens, concatenated
POOLED_SHAPE = (1, 1280)        # CLIP-G pooled
UNET = "model.diffusion_model."


def clip_g_shapes(cfg: dict = CLIP_G, prefix: str = "conditioner.embedders.1.model.") -> Shapes:
    """OpenCLIP ViT-bigG text tower, the layout SDXL checkpoints store it in."""
    w = cfg["width"]
    yield f"{prefix}token_embedding.weight", (cfg["vocab"], w)
    yield f"{prefix}positional_embedding", (cfg["positions"], w)
    for i in range(cfg["layers"]):
        p = f"{prefix}transformer.resblocks.{i}"
        yield from _norm(f"{p}.ln_1", w)
        yield f"{p}.attn.in_proj_weight", (3 * w, w)
        yield f"{p}.attn.in_proj_bias", (3 * w,)
        yield from _linear(f"{p}.attn.out_proj", w, w)
        yield from _norm(f"{p}.ln_2", w)
        yield from _linear(f"{p}.mlp.c_fc", w, cfg["mlp"])
        yield from _linear(f"{p}.mlp.c_proj", cfg["mlp"], w)
    yield from _norm(f"{prefix}ln_final", w)
    yield f"{prefix}text_projection", (w, w)
    yield f"{prefix}logit_scale", ()


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(("ln_1.weight", "ln_2.weight", "ln_final.weight")):
        return torch.ones(shape)
    if name.endswith("logit_scale"):
        return torch.tensor(4.6052)
    if name.endswith("positional_embedding"):
        return torch.randn(shape, generator=gen) * 0.01
    return random_tensor(name, shape, gen)


def build_state_dict(seed: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shapes = [*unet_shapes(UNET_CONFIG), *vae_shapes(), *clip_shapes(prefix="conditioner.embedders.0.transformer.text_model."),
              *clip_g_shapes()]
    sd = {name: _tensor(name, shape, gen).to(dtype) for name, shape in shapes}
    sd["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77).unsqueeze(0)
    return sd


def checkpoint(seed: int = 0) -> Path:
    """The cached tiny SDXL-family base checkpoint (fp16, about 2 GB: mostly CLIP-G)."""
    cfg = {"kind": "sdxl", "seed": seed, "unet": UNET_CONFIG, "clip_g": CLIP_G, "v": 2}

    def build(path: Path) -> None:
        save_file(build_state_dict(seed), str(path),
                  metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base", "compartments.tiny": "sdxl"})

    return cached(f"tiny-sdxl-s{seed}.safetensors", cfg, build)


def member(shard: int, scale: float = 0.05) -> Path:
    """Fine-tune ``shard`` of the base as a diffusion-model-only file (the UNet, unprefixed: 0.22 GB).

    SDXL fine-tunes are shared both ways; this one keeps the cache small (the text encoders and
    VAE a soup needs come from the base checkpoint, which is itself the first member).
    """
    cfg = {"kind": "sdxl-member-dmo", "shard": shard, "scale": scale, "unet": UNET_CONFIG, "v": 2}

    def build(path: Path) -> None:
        base = load_file(str(checkpoint(0)))
        gen = torch.Generator().manual_seed(30_000 + shard)
        sd = {}
        for k, v in base.items():
            if k.startswith(UNET):
                x = v.float()
                moved = x + scale * float(x.std()) * torch.randn(x.shape, generator=gen) if v.numel() > 1 else x
                sd[k[len(UNET):]] = moved.to(v.dtype)
        save_file(sd, str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base",
                                           "compartments.tiny": f"sdxl-member-{shard}"})

    return cached(f"tiny-sdxl-unet-{shard}.safetensors", cfg, build)


def conditioning(seed: int = 0) -> list:
    """An SDXL CONDITIONING of CLIPTextEncode's shapes (tokens [1, 77, 2048], pooled [1, 1280])."""
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn(CONTEXT_SHAPE, generator=gen) * 0.1,
             {"pooled_output": torch.randn(POOLED_SHAPE, generator=gen) * 0.1, "width": 64, "height": 64,
              "crop_w": 0, "crop_h": 0, "target_width": 64, "target_height": 64}]]


BASE_NAME = "sdxl-tiny-base.safetensors"
SHARD_NAMES = ("sdxl-tiny-shard-1.safetensors", "sdxl-tiny-shard-2.safetensors")


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place the SDXL workflows' base checkpoint and its two shards (diffusion-model-only fine-tunes)."""
    base = link_into(checkpoint(0), Path(models_dir) / "checkpoints" / BASE_NAME)
    shards = [link_into(member(i + 1), Path(models_dir) / "diffusion_models" / name).name
              for i, name in enumerate(SHARD_NAMES)]
    return {"checkpoints": [base.name], "diffusion_models": shards}
