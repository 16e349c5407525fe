"""Tier 2: the tiny unCLIP-L fixture, image conditioning reaching the private branch only."""

from __future__ import annotations

import json

import pytest
import torch


@pytest.fixture(scope="module")
def unclip(comfy):
    from compartments.tiny import unclip as tiny

    torch.set_num_threads(1)
    placed = tiny.prepare(comfy.models_dir, comfy.input_dir)
    model, clip, vae, clip_vision = comfy.run("unCLIPCheckpointLoader", ckpt_name=placed["checkpoints"][0])
    (prompt,) = comfy.run("CLIPTextEncode", clip=clip, text="a house by the sea")
    (negative,) = comfy.run("CLIPTextEncode", clip=clip, text="")
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(0))
    ids = json.dumps([{"id": 1, "sha256": "11" * 32}, {"id": 2, "sha256": "22" * 32}])
    private, ids_out = comfy.run("CompartmentsCPRImageConditioning", conditioning=prompt, clip_vision=clip_vision,
                                 images=images, ids=ids, strength=1.0, noise_augmentation=0.0, crop="center")
    assert ids_out == ids
    return model, prompt, private, negative


def _sample(comfy, model, guider):
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=1)
    return comfy.sample(model, guider, latent, steps=2, seed=3)


def test_fixture_is_detected_as_unclip(unclip):
    model = unclip[0]
    assert type(model.model).__name__ == "SD21UNCLIP"
    assert model.model.model_config.__class__.__name__ == "SD21UnclipL"


def test_image_embeddings_reach_private_only(comfy, unclip):
    model, prompt, private, negative = unclip
    assert len(private[0][1]["unclip_conditioning"]) == 2
    assert "unclip_conditioning" not in prompt[0][1]  # the input was not modified
    (plain,) = comfy.run("CFGGuider", model=model, positive=prompt, negative=negative, cfg=4.0)
    (with_images,) = comfy.run("CFGGuider", model=model, positive=private, negative=negative, cfg=4.0)
    ref_plain, ref_images = _sample(comfy, model, plain), _sample(comfy, model, with_images)
    assert (ref_plain - ref_images).abs().max() > 1e-3  # the embeddings do change the model's output
    # public given WITH image embeddings from outside the pack (the entries core unCLIPConditioning writes,
    # not marked private): stripped, lambda=1 equals the plain prompt
    from compartments.nodes.cpr import CREDIT_KEY, PRIVATE_KEY

    unmarked = [[t, {k: v for k, v in d.items() if k not in (PRIVATE_KEY, CREDIT_KEY)}] for t, d in private]
    (g,) = comfy.run("CompartmentsCPRKLGuider", model=model, public=unmarked, private=private, negative=negative,
                     cfg=4.0, lambda_=1.0)
    torch.testing.assert_close(_sample(comfy, model, g), ref_plain, atol=2e-3, rtol=2e-3)
    (g0,) = comfy.run("CompartmentsCPRKLGuider", model=model, public=prompt, private=private, negative=negative,
                      cfg=4.0, lambda_=0.0)
    torch.testing.assert_close(_sample(comfy, model, g0), ref_images, atol=2e-3, rtol=2e-3)
    (audit,) = comfy.run("CompartmentsCPRAudit", guider=g, latent={"samples": ref_plain})
    rec = json.loads(audit)
    assert rec["stripped_from_public"] == ["unclip_conditioning"]
    assert [c["id"] for c in rec["credits"][0]] == [1, 2]
    # the private conditioning itself on 'public' (a wiring mistake that would switch protection off): refused
    with pytest.raises(ValueError, match="input 'public': this conditioning is marked private"):
        comfy.run("CompartmentsCPRKLGuider", model=model, public=private, private=private, negative=negative,
                  cfg=4.0, lambda_=1.0)
