"""Tier 2: CPR-KL and CPR-Choose unchanged on an SDXL-family model, with retrieved images as "revision".

The identities are bitwise: lambda = 1 samples exactly what core ``CFGGuider`` samples with the
public conditioning and lambda = 0 with the private one. ``cond_rows`` (tests/comfy/conftest.py)
records which cond each batch chunk belongs to, which proves the public chunks never carry the images.

Revision is unCLIP entries whose ``clip_vision_g`` image embeddings (1280 wide) replace the pooled
CLIP-G in SDXL's ADM vector. ComfyUI builds clip_vision_g from a fixed config with 1.8 B
parameters, far too large here, so the test builds ComfyUI's own ``ClipVisionModel`` from a narrow
config with bigG's projection width: the embeddings have clip_vision_g's shape and take core's
revision path (``sdxl_pooled`` -> ``unclip_adm``) unchanged.
"""

from __future__ import annotations

import json

import pytest
import torch

pytestmark = pytest.mark.comfy

IDS = json.dumps([{"id": 3, "sha256": "33" * 32}])


REVISION_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_hidden_layers": 2,
                   "patch_size": 14, "image_size": 224, "projection_dim": 1280, "hidden_act": "gelu",
                   "model_type": "clip_vision_model", "num_channels": 3}


def _revision_vision(tmp_path):
    """ComfyUI's ClipVisionModel from a narrow config whose projection is clip_vision_g's (1280)."""
    import comfy.clip_vision

    from compartments.tiny.sd15 import random_tensor

    cfg = tmp_path / "clip_vision_narrow_g_projection.json"
    cfg.write_text(json.dumps(REVISION_VISION))
    vision = comfy.clip_vision.ClipVisionModel(str(cfg))
    gen = torch.Generator().manual_seed(11)
    missing, _ = vision.load_sd({k: random_tensor(k, tuple(v.shape), gen) for k, v in vision.get_sd().items()})
    assert not missing
    return vision


@pytest.fixture(scope="module")
def sdxl_revision(comfy, tmp_path_factory, free_models):
    from compartments.tiny import link_into, sdxl

    torch.set_num_threads(2)
    link_into(sdxl.checkpoint(0), comfy.models_dir / "checkpoints" / "tiny-sdxl.safetensors")
    model, clip, _ = comfy.run("CheckpointLoaderSimple", ckpt_name="tiny-sdxl.safetensors")
    (public,) = comfy.run("CLIPTextEncode", clip=clip, text="a lighthouse at dusk")
    (negative,) = comfy.run("CLIPTextEncode", clip=clip, text="blurry")
    vision = _revision_vision(tmp_path_factory.mktemp("revision"))
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(6))
    private, _ = comfy.run("CompartmentsCPRImageConditioning", conditioning=public, clip_vision=vision, images=images,
                           ids=IDS, strength=1.0, noise_augmentation=0.0, crop="center")
    yield model, public, private, negative
    del model, clip, vision
    free_models()


def _sdxl_sample(comfy, model, guider):
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=1)
    return comfy.sample(model, guider, latent, steps=2, seed=4, scheduler="karras")


def test_cpr_on_sdxl_extremes_are_cfg_guider_bitwise_and_revision_reaches_private_only(comfy, sdxl_revision, cond_rows):
    model, public, private, negative = sdxl_revision
    assert type(model.model.model_config).__name__ == "Segmind_Vega"
    entries = private[0][1]["unclip_conditioning"]
    assert len(entries) == 2 and entries[0]["clip_vision_output"].image_embeds.shape == (1, 1280)
    refs = {}
    for lam, branch in ((1.0, public), (0.0, private)):
        (cfg,) = comfy.run("CFGGuider", model=model, positive=branch, negative=negative, cfg=5.0)
        refs[lam] = _sdxl_sample(comfy, model, cfg)
    assert (refs[1.0] - refs[0.0]).abs().max() > 1e-4  # revision changes the output
    for node in ("CompartmentsCPRKLGuider", "CompartmentsCPRChooseGuider"):
        extra = {"laplacian_probe": False} if "Choose" in node else {}
        for lam in (1.0, 0.0):
            (g,) = comfy.run(node, model=model, public=public, private=private, negative=negative, cfg=5.0,
                             lambda_=lam, **extra)
            assert torch.equal(_sdxl_sample(comfy, model, g), refs[lam]), (node, lam)
    # the ADM vector (pooled CLIP-G, or the revision embeddings) per row: public rows get the prompt's
    m_ref, ref_rows = cond_rows(model)
    (cfg,) = comfy.run("CFGGuider", model=m_ref, positive=public, negative=negative, cfg=5.0)
    _sdxl_sample(comfy, m_ref, cfg)
    plain_adm = next(r["y"] for j, r in ref_rows if j == 0)
    m, seen = cond_rows(model)
    (g,) = comfy.run("CompartmentsCPRChooseGuider", model=m, public=public, private=private, negative=negative,
                     cfg=5.0, lambda_=0.5, laplacian_probe=True)
    _sdxl_sample(comfy, m, g)
    assert {j for j, _ in seen} == {0, 1, 2}
    # (the Laplacian probe doubles each cond's rows: every row of a public chunk is the prompt's ADM)
    assert all(torch.equal(r["y"], plain_adm.expand_as(r["y"])) for j, r in seen if j == 0)
    assert all(not torch.equal(row[:1280], plain_adm[0, :1280]) for j, r in seen if j == 2 for row in r["y"])


def test_conditioning_of_another_family_is_refused_naming_it(comfy, sd15, sdxl_revision):
    sd15_model = sd15[0]
    _, public, private, negative = sdxl_revision
    with pytest.raises(ValueError, match=r"CPR-KL Guider: input 'public': the conditioning is 2048 wide, as SDXL "
                                         r"family \(CLIP-L \+ bigG\) text encoders give, but this SD15 model reads "
                                         r"768-wide"):
        comfy.run("CompartmentsCPRKLGuider", model=sd15_model, public=public, private=private, negative=negative,
                  cfg=5.0, lambda_=0.5)
