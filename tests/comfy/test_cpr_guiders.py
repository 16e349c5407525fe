"""Tier 2: CPR-KL / CPR-Choose guiders on the tiny SD1.5 model through core SamplerCustomAdvanced."""

from __future__ import annotations

import json

import pytest
import torch


def _encode(comfy, clip, text: str):
    (cond,) = comfy.run("CLIPTextEncode", clip=clip, text=text)
    return cond


@pytest.fixture(scope="module")
def setup(comfy, sd15):
    torch.set_num_threads(1)
    model, clip, _ = sd15
    public = _encode(comfy, clip, "a red house")
    prompt_private = _encode(comfy, clip, "a blue boat on a lake")
    (private, ids) = comfy.run("CompartmentsCPRPromptConditioning", conditioning=prompt_private,
                               ids=json.dumps([{"id": 7, "sha256": "ab" * 32}]))
    negative = _encode(comfy, clip, "")
    return model, public, private, prompt_private, negative


def _sample(comfy, model, guider, sampler="euler", steps=3, seed=1):
    (noise,) = comfy.run("RandomNoise", noise_seed=seed)
    (samp,) = comfy.run("KSamplerSelect", sampler_name=sampler)
    (sigmas,) = comfy.run("BasicScheduler", model=model, scheduler="karras", steps=steps, denoise=1.0)
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=2)
    out, _ = comfy.run("SamplerCustomAdvanced", noise=noise, guider=guider, sampler=samp, sigmas=sigmas,
                       latent_image=latent)
    return out


def _cfg(comfy, model, pos, neg, cfg=5.0):
    (g,) = comfy.run("CFGGuider", model=model, positive=pos, negative=neg, cfg=cfg)
    return g


def test_kl_extremes_equal_plain_cfg_on_each_branch(comfy, setup):
    model, public, private, prompt_private, negative = setup
    for lam, branch in ((1.0, public), (0.0, prompt_private)):
        (g,) = comfy.run("CompartmentsCPRKLGuider", model=model, public=public, private=private, negative=negative,
                         cfg=5.0, lambda_=lam)
        ours = _sample(comfy, model, g)["samples"]
        ref = _sample(comfy, model, _cfg(comfy, model, branch, negative))["samples"]
        torch.testing.assert_close(ours, ref, atol=2e-3, rtol=2e-3)


def test_one_batched_model_call_per_step_and_hooks_run(comfy, setup):
    model, public, private, _, negative = setup
    m = model.clone()
    calls: list[int] = []
    post: list[set] = []

    def unet_wrapper(apply, args):
        calls.append(args["input"].shape[0])
        return apply(args["input"], args["timestep"], **args["c"])

    def post_cfg(args):
        post.append(set(args))
        return args["denoised"]

    m.set_model_unet_function_wrapper(unet_wrapper)
    m.set_model_sampler_post_cfg_function(post_cfg)
    for node in ("CompartmentsCPRKLGuider", "CompartmentsCPRChooseGuider"):
        calls.clear()
        post.clear()
        kw = {"laplacian_probe": False} if "Choose" in node else {}
        (g,) = comfy.run(node, model=m, public=public, private=private, negative=negative, cfg=5.0, lambda_=0.5, **kw)
        _sample(comfy, m, g, steps=3)
        assert calls == [6, 6, 6]  # 3 conds x batch 2, one UNet call per step
        assert len(post) == 3 and {"private_denoised", "public_denoised", "cond_denoised"} <= post[0]


def test_choose_audit_and_every_sampler_family(comfy, setup):
    model, public, private, _, negative = setup
    (g,) = comfy.run("CompartmentsCPRChooseGuider", model=model, public=public, private=private, negative=negative,
                     cfg=5.0, lambda_=0.5, laplacian_probe=True)
    for sampler in ("euler", "euler_ancestral", "dpmpp_2m", "heun"):
        out = _sample(comfy, model, g, sampler=sampler, steps=2)
        assert torch.isfinite(out["samples"]).all()
    (audit,) = comfy.run("CompartmentsCPRAudit", guider=g, latent=out)
    rec = json.loads(audit)
    assert rec["method"] == "CPR-Choose" and rec["credits"] == [[{"id": 7, "sha256": "ab" * 32}]]
    # heun with 2 steps evaluates 3 times; every evaluation has one choice and one log-ratio per sample
    assert len(rec["choose"]["choices"]) == rec["model_evaluations"] == 3
    assert all(len(row) == 2 for row in rec["choose"]["log_ratio"])


def test_bad_inputs_are_clear_errors_before_sampling(comfy, setup):
    model, public, _, prompt_private, negative = setup
    with pytest.raises(ValueError, match="private.*no retrieved-image information"):
        comfy.run("CompartmentsCPRKLGuider", model=model, public=public, private=prompt_private, negative=negative,
                  cfg=5.0, lambda_=0.5)
    for lam in (-0.1, 1.5):
        with pytest.raises(ValueError, match="lambda"):
            comfy.run("CompartmentsCPRKLGuider", model=model, public=public, private=setup[2], negative=negative,
                      cfg=5.0, lambda_=lam)
    # the private (retrieved) conditioning wired into 'public' or 'negative' would switch the protection off
    for node in ("CompartmentsCPRKLGuider", "CompartmentsCPRChooseGuider"):
        extra = {"laplacian_probe": False} if "Choose" in node else {}
        with pytest.raises(ValueError, match="input 'public': this conditioning is marked private"):
            comfy.run(node, model=model, public=setup[2], private=setup[2], negative=negative, cfg=5.0,
                      lambda_=0.5, **extra)
        with pytest.raises(ValueError, match="input 'negative': this conditioning is marked private"):
            comfy.run(node, model=model, public=public, private=setup[2], negative=setup[2], cfg=5.0,
                      lambda_=0.5, **extra)


def test_save_image_writes_credits_into_png(comfy, setup):
    from PIL import Image

    model, public, private, _, negative = setup
    (g,) = comfy.run("CompartmentsCPRKLGuider", model=model, public=public, private=private, negative=negative,
                     cfg=5.0, lambda_=0.5)
    out = _sample(comfy, model, g, steps=2)
    (audit,) = comfy.run("CompartmentsCPRAudit", guider=g, latent=out)
    images = torch.rand(2, 64, 64, 3)
    comfy.run("CompartmentsCPRSaveImage", images=images, audit=audit, filename_prefix="cprtest/img")
    files = sorted((comfy.output_dir / "cprtest").glob("img_*.png"))
    assert len(files) == 2
    rec = json.loads(Image.open(files[0]).text["compartments_cpr"])
    assert rec["lambda"] == 0.5 and rec["credits"][0][0]["sha256"] == "ab" * 32 and rec["batch_index"] == 0
