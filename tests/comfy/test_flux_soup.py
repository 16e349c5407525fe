"""Tier 2: a soup of Flux-class diffusion-model-only files, through ComfyUI's own loader and sampler.

The members are the tiny Flux.1-dev-class fixture (``tiny/flux.py``: Flux's real key layout and
width, one double and one single block, fp8 ``float8_e4m3fn`` as shared Flux fine-tunes are) in
``models/diffusion_models``. Core ``UNETLoader`` must detect each as Flux; the Soup node reads them
from that folder and its MODEL must be a Flux model that core nodes sample (guidance embedding,
``BasicGuider``: no negative). Flux's text encoders are far too large to build here (T5-XXL alone
is 4.7 B parameters), so the conditioning is a tensor of CLIPTextEncodeFlux's shapes. Remove ==
rebuild on this layout and dtype is proven at tier 1 (``tests/unit/test_soup_architectures.py``),
where it costs megabytes instead of gigabytes.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = pytest.mark.comfy


@pytest.fixture
def flux_members(comfy):
    from compartments.tiny import flux, link_into

    names = []
    for i in (1, 2):
        name = f"tiny-flux-ft{i}.safetensors"
        link_into(flux.member(i), comfy.models_dir / "diffusion_models" / name)
        names.append(name)
    yield names
    import comfy.model_management as mm

    gc.collect()
    mm.cleanup_models()
    mm.soft_empty_cache()


def _arch(model) -> str:
    return type(model.model.model_config).__name__


def test_flux_members_load_as_flux_and_their_soup_samples_with_core_nodes(comfy, flux_members):
    from safetensors import safe_open

    from compartments.tiny import flux

    (member,) = comfy.run("UNETLoader", unet_name=flux_members[0], weight_dtype="default")
    assert _arch(member) == "Flux" and member.model.model_config.unet_config["guidance_embed"] is True
    del member
    gc.collect()

    soup, model, clip, vae, text = comfy.run("CompartmentsSoupBuild", members="\n".join(flux_members),
                                             base="first member", components="unet", dtype="same", keep_sum=True)
    assert _arch(model) == "Flux" and clip is None and vae is None  # a diffusion model only, as UNETLoader gives
    man = soup.manifest
    assert man.n == 2 and man.exact and man.member_dtypes == ["F8_E4M3"]
    with safe_open(soup.path, "pt") as f:
        keys = [k for k in f.keys() if not k.startswith("compartments.")]
        assert "double_blocks.0.img_attn.qkv.weight" in keys and not any(k.startswith("model.") for k in keys)
        assert f.get_tensor("img_in.weight").dtype == torch.float8_e4m3fn

    (guider,) = comfy.run("BasicGuider", model=model, conditioning=flux.conditioning(guidance=3.5))
    (latent,) = comfy.run("EmptySD3LatentImage", width=64, height=64, batch_size=1)
    samples = comfy.sample(model, guider, latent, steps=2, scheduler="simple")
    assert samples.shape == (1, 16, 8, 8) and torch.isfinite(samples).all() and samples.abs().sum() > 0

    # save -> load (workflows/soup_flux_build_save.json, then Load Soup): the same Flux model, the same samples
    (saved,) = comfy.run("CompartmentsSoupSave", soup=soup, filename="flux-t2-soup", overwrite=True)
    del model, guider
    gc.collect()
    loaded, model2, clip2, vae2, _ = comfy.run("CompartmentsSoupLoad", soup_name=saved)
    assert _arch(model2) == "Flux" and clip2 is None and vae2 is None and loaded.manifest.n == 2
    (guider2,) = comfy.run("BasicGuider", model=model2, conditioning=flux.conditioning(guidance=3.5))
    assert torch.equal(comfy.sample(model2, guider2, latent, steps=2, scheduler="simple"), samples)
    (comfy.models_dir / "soups" / saved).unlink()


def test_a_temporal_node_refuses_flux_clearly(comfy, flux_members):
    from compartments.nodes._host import InputError
    from compartments.tiny import temporal as tiny_temporal
    from compartments.tiny import temporal_sdxl

    tiny_temporal.prepare(comfy.models_dir, comfy.input_dir)
    mm_dir = comfy.models_dir / "animatediff_models"
    temporal_sdxl.write_hotshot(mm_dir / temporal_sdxl.HOTSHOT_NAME)
    (model,) = comfy.run("UNETLoader", unet_name=flux_members[0], weight_dtype="default")
    untouched = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items() if "double_blocks.0" in k}
    for name in (tiny_temporal.ORIGINAL_NAME, temporal_sdxl.HOTSHOT_NAME):  # an SD1.5-layout and an SDXL module
        (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module=name)
        with pytest.raises(InputError, match=r"Apply Temporal Layers: input 'model': the model is Flux, a diffusion "
                                             r"transformer without UNet blocks"):
            comfy.run("CompartmentsApplyTemporalLayers", model=model, temporal_layers=layers, frame_count=8,
                      context_length=0, context_overlap=4, context_blend="pyramid", alpha=-1.0, alpha_overrides="")
        del layers
    after = model.model.diffusion_model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in untouched.items())
    (mm_dir / temporal_sdxl.HOTSHOT_NAME).unlink()
