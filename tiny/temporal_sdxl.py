"""SDXL motion modules at their real shapes, and an SDXL-family UNet wide enough to carry them.

A motion module's widths are those of the UNet levels it follows, so an SDXL module needs
SDXL's 320/640/1280 channels (``tiny/sdxl.py``'s UNet is 320 wide at every level and cannot
take one). :func:`video_unet` is a diffusion-model-only SDXL-family UNet with SDXL's channel
widths and Segmind Vega's signature (input transformer depths 0,0,1,1,2,2, context 2048, ADM
2816), so ``UNETLoader`` reports ``Segmind_Vega``. ComfyUI reads the output path's and the
middle block's transformer depths from the keys and does not match on them: here the 640
up level keeps one transformer per block and the 1280 up level none (596 M parameters; Vega's
own would be 814 M). It is stored in ``float8_e4m3fn``, as many shared SDXL files are, so it
takes 0.6 GB of the tiny-model cache's 10 GB; ComfyUI upcasts it on load. Text encoders and
VAE come from ``tiny/sdxl.py``'s checkpoint.

The motion modules are full size, in the original layouts users download: AnimateDiff-SDXL
beta (``mm_sdxl_v10_beta``: three levels, two modules down and three up per level, no mid
block, 32-frame table) and Hotshot-XL (``hsxl_temporal_layers``: the same transformer under
``temporal_attentions``, 24-frame table). Both carry the same seeded weights, so a video
from one equals a video from the other, which proves the Hotshot-XL renaming end to end.
Weights are seeded random (fp16, the position tables float32) with a non-zero ``proj_out``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..temporal.formats import original_to_hotshot
from ..temporal.layers import SDXL
from . import cached, link_into
from .sd15 import random_tensor, unet_shapes
from .sdxl import UNET_CONFIG as NARROW_CONFIG
from .temporal import motion_state_dict

VIDEO_UNET_CONFIG = {**NARROW_CONFIG, "channel_mult": [1, 2, 4], "transformer_depth_output": [0, 0, 0, 1, 1, 1, 0, 0, 0]}
VIDEO_UNET_NAME = "sdxl-tiny-video-unet.safetensors"
ANIMATEDIFF_NAME = "temporal-sdxl-mm-beta.safetensors"
HOTSHOT_NAME = "temporal-sdxl-hotshotxl.safetensors"
MOTION_SEED = 5
UNET_DTYPE = torch.float8_e4m3fn


def _unet_state_dict(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {name: random_tensor(name, shape, gen).to(UNET_DTYPE) for name, shape in unet_shapes(VIDEO_UNET_CONFIG, "")}


def video_unet(seed: int = 0) -> Path:
    """The cached SDXL-family UNet at 320/640/1280 channels, unprefixed keys (fp8, 0.6 GB)."""
    cfg = {"kind": "sdxl-video-unet", "seed": seed, "unet": VIDEO_UNET_CONFIG, "dtype": str(UNET_DTYPE), "v": 1}

    def build(path: Path) -> None:
        save_file(_unet_state_dict(seed), str(path), metadata={"modelspec.architecture": "stable-diffusion-xl-v1-base",
                                                              "compartments.tiny": "sdxl-video-unet"})

    return cached(f"tiny-sdxl-video-unet-s{seed}.safetensors", cfg, build)


def _save(sd: dict[str, torch.Tensor], path: Path) -> None:
    save_file({k: (v if k.endswith((".pe", ".positional_encoding")) else v.to(torch.float16)).contiguous()
               for k, v in sd.items()}, str(path))


def animatediff_file(seed: int = MOTION_SEED) -> Path:
    """A full-size AnimateDiff-SDXL beta motion module in the original layout (0.47 GB)."""
    cfg = {"kind": "sdxl-mm-beta", "seed": seed, "v": 1}
    return cached(f"tiny-sdxl-mm-beta-s{seed}.safetensors", cfg,
                  lambda p: _save(motion_state_dict(SDXL, seed=seed), p))


def write_hotshot(path: Path, seed: int = MOTION_SEED) -> Path:
    """:func:`animatediff_file`'s weights in Hotshot-XL's layout (24-frame table) at ``path``.

    Not cached (the cache budget): it renames the cached AnimateDiff file's tensors, bit for bit.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp")
        save_file(original_to_hotshot(load_file(str(animatediff_file(seed))), max_frames=24), str(tmp))
        tmp.replace(path)
    return path


def prepare(models_dir: Path, input_dir: Path) -> dict:
    """Place the SDXL video workflow's UNet and motion module (CLIP and VAE: ``tiny/sdxl.py``'s base)."""
    unet = link_into(video_unet(0), Path(models_dir) / "diffusion_models" / VIDEO_UNET_NAME)
    mm = link_into(animatediff_file(), Path(models_dir) / "animatediff_models" / ANIMATEDIFF_NAME)
    return {"diffusion_models": [unet.name], "animatediff_models": [mm.name]}
