"""Tier 2: SDXL motion modules (AnimateDiff-SDXL beta, Hotshot-XL) on an SDXL-family UNet in a real ComfyUI.

The UNet is ``tiny/temporal_sdxl.py``'s: SDXL's 320/640/1280 channel widths with Segmind Vega's
signature, a diffusion-model-only fp8 file that core ``UNETLoader`` detects. The motion modules
are full size in the layouts users download; the Hotshot-XL file carries the AnimateDiff file's
weights under Hotshot-XL's names. The conditioning is a tensor of SDXL's CLIPTextEncode shapes
(``tiny/sdxl.conditioning``) so that this module does not load the 1.4 GB bigG text encoder; the
shipped workflow (``workflows/temporal_sdxl_animatediff.json``, tier 3) encodes real prompts.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.comfy

FRAMES = 4


@pytest.fixture(scope="module")
def sdxl_video(comfy, free_models):
    from compartments.tiny import sdxl, temporal_sdxl

    temporal_sdxl.prepare(comfy.models_dir, comfy.input_dir)
    hotshot = temporal_sdxl.write_hotshot(comfy.models_dir / "animatediff_models" / temporal_sdxl.HOTSHOT_NAME)
    (model,) = comfy.run("UNETLoader", unet_name=temporal_sdxl.VIDEO_UNET_NAME, weight_dtype="default")
    cond = sdxl.conditioning(1)
    yield model, cond, _sample(comfy, model, cond)
    hotshot.unlink()
    del model
    free_models()


def _sample(comfy, model, cond, frames=FRAMES, seed=3):
    """One euler step at cfg 1 (the uncond pass is skipped: CPU budget)."""
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=frames)
    (out,) = comfy.run("KSampler", model=model, seed=seed, steps=1, cfg=1.0, sampler_name="euler",
                       scheduler="normal", positive=cond, negative=cond, latent_image=latent, denoise=1.0)
    return out["samples"]


def _apply(comfy, model, layers, frames=FRAMES, alpha=-1.0):
    (patched,) = comfy.run("CompartmentsApplyTemporalLayers", model=model, temporal_layers=layers,
                           frame_count=frames, context_length=0, context_overlap=4, context_blend="pyramid",
                           alpha=alpha, alpha_overrides="")
    return patched


def test_sdxl_motion_modules_load_as_sdxl_and_alpha_one_is_the_image_model(comfy, sdxl_video):
    import comfy.supported_models as sm

    from compartments.tiny import temporal_sdxl

    model, cond, base = sdxl_video
    assert isinstance(model.model.model_config, sm.SDXL)
    assert type(model.model.model_config).__name__ == "Segmind_Vega"
    assert list(model.model.diffusion_model.channel_mult) == [1, 2, 4]
    (ad,) = comfy.run("CompartmentsLoadMotionModule", motion_module=temporal_sdxl.ANIMATEDIFF_NAME)
    (hs,) = comfy.run("CompartmentsLoadMotionModule", motion_module=temporal_sdxl.HOTSHOT_NAME)
    assert (ad.info.format, ad.info.version, ad.info.base) == ("animatediff", "sdxl-beta", "sdxl")
    assert (hs.info.format, hs.info.version, hs.info.base) == ("hotshotxl", "hotshotxl", "sdxl")
    assert len(ad.module.layout.slots) == 15 and (ad.info.max_frames, hs.info.max_frames) == (32, 24)

    assert base.shape == (FRAMES, 4, 8, 8) and torch.isfinite(base).all()
    assert torch.equal(_sample(comfy, _apply(comfy, model, ad, alpha=1.0), cond), base)  # per frame, exactly
    video = _sample(comfy, _apply(comfy, model, ad), cond)
    assert torch.isfinite(video).all() and (video - base).abs().max() > 1e-3, "the motion module must act"
    # Hotshot-XL's names for the same weights give the same video, bit for bit
    assert torch.equal(_sample(comfy, _apply(comfy, model, hs), cond), video)
    # the shared UNet is unpatched afterwards
    assert torch.equal(_sample(comfy, model, cond), base)


def test_a_motion_module_for_another_architecture_is_refused(comfy, sdxl_video, sd15):
    from compartments.nodes._host import InputError
    from compartments.tiny import temporal as tiny_temporal
    from compartments.tiny import temporal_sdxl

    model, _, _ = sdxl_video
    tiny_temporal.prepare(comfy.models_dir, comfy.input_dir)
    (sd15_layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module=tiny_temporal.ORIGINAL_NAME)
    with pytest.raises(InputError, match=r"input 'temporal_layers': the temporal layers are for tiny-sd15 "
                                         r"\(channels 320/640, 1 res blocks\) but the model is sdxl "
                                         r"\(channels 320/640/1280, 2 res blocks\).*Hotshot-XL for SDXL"):
        _apply(comfy, model, sd15_layers)
    (xl_layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module=temporal_sdxl.ANIMATEDIFF_NAME)
    sd15_model = sd15[0]
    with pytest.raises(InputError, match=r"input 'temporal_layers': the temporal layers are for sdxl .* but the "
                                         r"model is tiny-sd15"):
        _apply(comfy, sd15_model, xl_layers)
