"""Tier 2: CPR-KL and CPR-Choose unchanged on a Flux model, with retrieved images as Redux style tokens.

The identities are bitwise: lambda = 1 samples exactly what core ``BasicGuider`` samples with the
public conditioning (cfg 1, no negative: Flux takes its guidance from the conditioning) and lambda
= 0 with the private one. ``cond_rows`` (tests/comfy/conftest.py) records which cond each batch
chunk belongs to, which proves the public chunks never carry the images.

The SigLIP-384 vision tower and the Redux style model are ComfyUI's own, loaded by core
``CLIPVisionLoader`` / ``StyleModelLoader`` from ``tiny/redux.py`` (real layouts and sizes); each
image adds 729 style tokens to the private prompt only. Flux's T5-XXL is too large to build here,
so the prompt is a tensor of CLIPTextEncodeFlux's shapes (16 tokens, to keep a CPU step short).
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.comfy

IDS = json.dumps([{"id": 3, "sha256": "33" * 32}])


@pytest.fixture(scope="module")
def flux_redux(comfy, free_models):
    from compartments.tiny import flux, link_into, redux

    torch.set_num_threads(2)
    link_into(flux.member(1), comfy.models_dir / "diffusion_models" / "tiny-flux-ft.safetensors")
    redux.prepare(comfy.models_dir, comfy.input_dir)
    (model,) = comfy.run("UNETLoader", unet_name="tiny-flux-ft.safetensors", weight_dtype="default")
    (vision,) = comfy.run("CLIPVisionLoader", clip_name=redux.CLIP_VISION_NAME)
    (style,) = comfy.run("StyleModelLoader", style_model_name=redux.STYLE_MODEL_NAME)
    public = flux.conditioning(guidance=3.5, tokens=16)
    image = torch.rand(1, 64, 64, 3, generator=torch.Generator().manual_seed(5))
    private, _ = comfy.run("CompartmentsCPRImageConditioning", conditioning=public, clip_vision=vision, images=image,
                           ids=IDS, strength=1.0, noise_augmentation=0.0, crop="center", style_model=style)
    yield model, public, private, vision, style
    del model, vision, style
    free_models()


def _flux_sample(comfy, model, guider):
    (latent,) = comfy.run("EmptySD3LatentImage", width=32, height=32, batch_size=1)
    return comfy.sample(model, guider, latent, steps=1, seed=2, scheduler="simple")


def test_redux_tokens_go_to_the_private_prompt_only(flux_redux):
    from compartments.tiny import redux

    model, public, private, vision, _ = flux_redux
    assert type(model.model.model_config).__name__ == "Flux"
    assert type(vision.model).__name__ == "CLIPVisionModelProjection" and vision.image_size == 384
    assert private[0][0].shape == (1, 16 + redux.TOKENS_PER_IMAGE, 4096)
    assert torch.equal(private[0][0][:, :16], public[0][0])  # the prompt, then the style tokens
    assert public[0][0].shape[1] == 16 and "compartments_cpr_private" not in public[0][1]  # input untouched
    assert private[0][1]["guidance"] == 3.5


def test_cpr_on_flux_extremes_are_basic_guider_bitwise_and_public_never_sees_images(comfy, flux_redux, cond_rows):
    from compartments.tiny import redux

    model, public, private, _, _ = flux_redux
    (ref_pub,) = comfy.run("BasicGuider", model=model, conditioning=public)
    (ref_priv,) = comfy.run("BasicGuider", model=model, conditioning=private)
    pub, priv = _flux_sample(comfy, model, ref_pub), _flux_sample(comfy, model, ref_priv)
    assert (pub - priv).abs().max() > 1e-4  # the retrieved image changes what the model draws
    for node in ("CompartmentsCPRKLGuider", "CompartmentsCPRChooseGuider"):
        extra = {"laplacian_probe": False} if "Choose" in node else {}
        for lam, ref in ((1.0, pub), (0.0, priv)):
            (g,) = comfy.run(node, model=model, public=public, private=private, cfg=1.0, lambda_=lam, **extra)
            assert torch.equal(_flux_sample(comfy, model, g), ref), (node, lam)
    m, seen = cond_rows(model)
    (g,) = comfy.run("CompartmentsCPRKLGuider", model=m, public=public, private=private, cfg=1.0, lambda_=0.5)
    mixed = _flux_sample(comfy, m, g)
    assert torch.isfinite(mixed).all() and not torch.equal(mixed, pub) and not torch.equal(mixed, priv)
    tokens = {i: {r["c_crossattn"].shape[1] for j, r in seen if j == i} for i in (0, 1, 2)}
    assert tokens == {0: {16}, 1: set(), 2: {16 + redux.TOKENS_PER_IMAGE}}  # no negative at cfg 1
    assert all(torch.equal(r["c_crossattn"], public[0][0]) for j, r in seen if j == 0)


def test_flux_without_negative_needs_cfg_1(comfy, flux_redux):
    model, public, private, _, _ = flux_redux
    with pytest.raises(ValueError, match=r"CPR-KL Guider: input 'negative': cfg is 3.5 but no negative"):
        comfy.run("CompartmentsCPRKLGuider", model=model, public=public, private=private, cfg=3.5, lambda_=0.5)
