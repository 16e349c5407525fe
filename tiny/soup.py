"""Soup members: "fine-tunes" of the tiny SD1.5 base, for tests, workflows and the demo.

Diffusion Soup averages models fine-tuned from ONE base on separate data shards, so the
members here share the base's text encoder and VAE byte for byte and differ only in the
UNet, by a seeded perturbation of a few percent of each tensor's scale (what a short
fine-tune does to the weights). Full single-file checkpoints that ComfyUI detects as SD15.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from . import cached, link_into
from .sd15 import UNET_CONFIG, checkpoint

UNET = "model.diffusion_model."
NAMES = ("a", "b", "c")


def finetune_state_dict(shard: int, base_seed: int = 0, scale: float = 0.05) -> dict[str, torch.Tensor]:
    """Base weights with the UNet moved by ``scale * std(tensor) * N(0, 1)`` (seed = shard)."""
    sd = load_file(str(checkpoint(base_seed)))  # the cached base: members share its CLIP and VAE bytes
    gen = torch.Generator().manual_seed(10_000 + shard)
    for k, v in sd.items():
        if k.startswith(UNET) and v.is_floating_point():
            x = v.float()
            spread = x.std() if x.numel() > 1 else x.abs().mean()
            step = float(spread) if float(spread) > 0 else 0.02
            sd[k] = (x + scale * step * torch.randn(x.shape, generator=gen)).to(v.dtype)
    return sd


def member(shard: int, base_seed: int = 0, scale: float = 0.05) -> Path:
    """Cached path of fine-tune ``shard`` of the tiny SD1.5 base (fp16 single file, ~0.5 GB)."""
    cfg = {"kind": "soup-member", "shard": shard, "base_seed": base_seed, "scale": scale, "unet": UNET_CONFIG, "v": 1}

    def build(path: Path) -> None:
        save_file(finetune_state_dict(shard, base_seed, scale), str(path),
                  metadata={"modelspec.architecture": "stable-diffusion-v1", "compartments.tiny": f"soup-member-{shard}"})

    return cached(f"soup-member-{shard}.safetensors", cfg, build)


SAVED_SOUP = "soup-ab.safetensors"


def saved_soup(path: Path) -> Path:
    """A uniform soup of members 0 and 1 at ``path``, built by the streaming engine (unless there).

    Not cached: it is the engine's output, not a fixture, and at 1.06 GB it would hold the
    tiny-model cache over its 10 GB budget; building it takes a few seconds.
    """
    from ..soup.engine import build_soup

    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        build_soup([member(0), member(1)], path)
    return path


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place checkpoints/soup-member-{a,b,c}.safetensors and a saved soup of a and b
    (soups/soup-ab.safetensors, with its manifest) for the soup workflows."""
    placed = [link_into(member(i), Path(models_dir) / "checkpoints" / f"soup-member-{n}.safetensors").name
              for i, n in enumerate(NAMES)]
    soup = saved_soup(Path(models_dir) / "soups" / SAVED_SOUP)
    return {"checkpoints": placed, "soups": [soup.name]}
