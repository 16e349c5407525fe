"""A tiny Flux.1-dev-class diffusion model: a diffusion-model-only file in Black Forest Labs' key layout.

ComfyUI's detector (``model_detection.detect_unet_config``) finds Flux by
``double_blocks.0.img_attn.norm.key_norm.scale`` plus ``img_in.weight``, counts the double and
single blocks from the keys, and reads ``guidance_in`` for the guidance embedding (Flux dev;
without it, schnell). Both shipped releases fix the head count (24) and the rotary axes
(16+56+56 = 128 per head), and 0.3.64 also the width, so the width stays Flux's 3072; what makes
it tiny is one double block and one single block instead of 19 and 38 (about 0.55 B parameters,
0.55 GB in fp8). Members are fine-tunes of one seeded base (a small per-member delta), stored
in fp8 (``float8_e4m3fn``) as most shared Flux fine-tunes are. Flux's text encoders (CLIP-L
and T5-XXL, 4.7 B parameters) are not built: tests hand the model conditioning tensors of the
right shapes (T5 tokens [1, 256, 4096], CLIP pooled [1, 768]).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import cached, link_into

CONFIG = {"hidden": 3072, "heads": 24, "mlp_ratio": 4, "context_in": 4096, "vec_in": 768, "in_channels": 64,
          "time_dim": 256, "depth": 1, "depth_single": 1, "guidance": True}
CONTEXT_SHAPE = (1, 256, 4096)  # T5-XXL tokens
POOLED_SHAPE = (1, 768)         # CLIP-L pooled output

Shapes = Iterator[tuple[str, tuple[int, ...]]]


def _linear(p: str, cin: int, cout: int) -> Shapes:
    yield f"{p}.weight", (cout, cin)
    yield f"{p}.bias", (cout,)


def shapes(cfg: dict = CONFIG) -> Shapes:
    h, mlp, head = cfg["hidden"], cfg["hidden"] * cfg["mlp_ratio"], cfg["hidden"] // cfg["heads"]
    yield from _linear("img_in", cfg["in_channels"], h)
    yield from _linear("txt_in", cfg["context_in"], h)
    for name, cin in (("time_in", cfg["time_dim"]), ("vector_in", cfg["vec_in"]),
                      *((("guidance_in", cfg["time_dim"]),) if cfg["guidance"] else ())):
        yield from _linear(f"{name}.in_layer", cin, h)
        yield from _linear(f"{name}.out_layer", h, h)
    for i in range(cfg["depth"]):
        for stream in ("img", "txt"):
            p = f"double_blocks.{i}.{stream}"
            yield from _linear(f"{p}_mod.lin", h, 6 * h)
            yield from _linear(f"{p}_attn.qkv", h, 3 * h)
            yield f"{p}_attn.norm.query_norm.scale", (head,)
            yield f"{p}_attn.norm.key_norm.scale", (head,)
            yield from _linear(f"{p}_attn.proj", h, h)
            yield from _linear(f"{p}_mlp.0", h, mlp)
            yield from _linear(f"{p}_mlp.2", mlp, h)
    for i in range(cfg["depth_single"]):
        p = f"single_blocks.{i}"
        yield from _linear(f"{p}.linear1", h, 3 * h + mlp)
        yield from _linear(f"{p}.linear2", h + mlp, h)
        yield f"{p}.norm.query_norm.scale", (head,)
        yield f"{p}.norm.key_norm.scale", (head,)
        yield from _linear(f"{p}.modulation.lin", h, 3 * h)
    yield from _linear("final_layer.adaLN_modulation.1", h, 2 * h)
    yield from _linear("final_layer.linear", h, cfg["in_channels"])


def _tensor(name: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    if name.endswith(".scale"):
        return torch.ones(shape)
    if name.endswith(".bias"):
        return torch.randn(shape, generator=gen) * 0.01
    return torch.randn(shape, generator=gen) / math.sqrt(shape[1])


def member(shard: int, dtype: str = "float8_e4m3fn", scale: float = 0.05) -> Path:
    """Cached fine-tune ``shard`` of the seeded base (shard 0 is the base itself), stored in ``dtype``."""
    cfg = {"kind": "flux-dmo", "shard": shard, "dtype": dtype, "scale": scale, "config": CONFIG, "v": 1}

    def build(path: Path) -> None:
        base, delta = torch.Generator().manual_seed(0), torch.Generator().manual_seed(20_000 + shard)
        sd = {}
        for name, shape in shapes():
            w = _tensor(name, shape, base)
            if shard and not name.endswith(".scale"):
                w = w + scale * float(w.std() if w.numel() > 1 else 0.01) * torch.randn(shape, generator=delta)
            sd[name] = w.to(getattr(torch, dtype))
        save_file(sd, str(path), metadata={"modelspec.architecture": "Flux.1-dev", "compartments.tiny": "flux"})

    return cached(f"tiny-flux-{shard}-{dtype}.safetensors", cfg, build)


def conditioning(guidance: float = 3.5, seed: int = 0, tokens: int = CONTEXT_SHAPE[1]) -> list:
    """A Flux CONDITIONING of the right shapes, as CLIPTextEncodeFlux would give (no T5 built here).

    ``tokens``: T5 tokens (256 when padded as Flux.1-dev is, fewer keep CPU tests fast; Flux takes any count).
    """
    gen = torch.Generator().manual_seed(seed)
    return [[torch.randn((1, tokens, CONTEXT_SHAPE[2]), generator=gen) * 0.1,
             {"pooled_output": torch.randn(POOLED_SHAPE, generator=gen) * 0.1, "guidance": guidance}]]


SHARD_NAMES = ("flux-tiny-ft-1.safetensors", "flux-tiny-ft-2.safetensors")


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place the Flux workflows' two fine-tunes (fp8 diffusion-model-only files) in models/diffusion_models."""
    return {"diffusion_models": [link_into(member(i + 1), Path(models_dir) / "diffusion_models" / name).name
                                 for i, name in enumerate(SHARD_NAMES)]}
