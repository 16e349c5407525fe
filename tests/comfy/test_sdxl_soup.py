"""Tier 2: an SDXL-family soup through ComfyUI's own loaders, text encoders and sampler.

The base is the tiny SDXL-family checkpoint (``tiny/sdxl.py``: Segmind Vega's UNet signature,
SDXL's real CLIP-L and OpenCLIP bigG text encoders, SD's VAE); the two fine-tunes are shipped as
diffusion-model-only files (``models/diffusion_models``), as SDXL fine-tunes often are. The soup
mixes the two layouts and keeps the base's: a checkpoint that feeds CLIP Text Encode, KSampler
and VAE Decode directly. Remove == rebuild on SDXL's layout is proven at tier 1.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture
def sdxl_files(comfy):
    from compartments.tiny import link_into, sdxl

    link_into(sdxl.checkpoint(0), comfy.models_dir / "checkpoints" / "tiny-sdxl.safetensors")
    names = ["tiny-sdxl.safetensors"]
    for i in (1, 2):
        link_into(sdxl.member(i), comfy.models_dir / "diffusion_models" / f"tiny-sdxl-unet-{i}.safetensors")
        names.append(f"tiny-sdxl-unet-{i}.safetensors")
    yield names
    import comfy.model_management as mm

    gc.collect()
    mm.unload_all_models()
    mm.soft_empty_cache()


def _sdxl_family(model) -> bool:
    import comfy.supported_models as sm

    return isinstance(model.model.model_config, sm.SDXL)


def test_sdxl_checkpoint_and_unet_files_load_as_sdxl_and_their_soup_samples(comfy, sdxl_files):
    ckpt, unet1, _ = sdxl_files
    model, clip, vae = comfy.run("CheckpointLoaderSimple", ckpt_name=ckpt)
    assert _sdxl_family(model), type(model.model.model_config).__name__
    assert type(model.model.model_config).__name__ == "Segmind_Vega"
    (unet,) = comfy.run("UNETLoader", unet_name=unet1, weight_dtype="default")
    assert _sdxl_family(unet)
    del model, unet
    gc.collect()

    soup, model, clip, vae, text = comfy.run("CompartmentsSoupBuild", members="\n".join(sdxl_files),
                                             base="first member", components="unet", dtype="same", keep_sum=True)
    assert _sdxl_family(model) and clip is not None and vae is not None
    man = soup.manifest
    assert man.n == 3 and man.exact and man.base["name"] == ckpt
    (pos,) = comfy.run("CLIPTextEncode", clip=clip, text="a lighthouse at dusk")
    (neg,) = comfy.run("CLIPTextEncode", clip=clip, text="blurry")
    assert pos[0][0].shape[-1] == 2048 and pos[0][1]["pooled_output"].shape[-1] == 1280  # both SDXL encoders ran
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=1)
    (out,) = comfy.run("KSampler", model=model, seed=0, steps=2, cfg=4.0, sampler_name="euler", scheduler="normal",
                       positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    (image,) = comfy.run("VAEDecode", samples=out, vae=vae)
    assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()
