"""Tier 2: temporal layers inside a real ComfyUI: load, inject through ModelPatcher hooks, sample, unload."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

FRAMES = 4


@pytest.fixture(scope="module")
def temporal_env(comfy, sd15):
    from compartments.tiny import temporal as tiny_temporal

    tiny_temporal.prepare(comfy.models_dir, comfy.input_dir)
    model, clip, vae = sd15
    (cond,) = comfy.run("CLIPTextEncode", text="a red square moving", clip=clip)
    (neg,) = comfy.run("CLIPTextEncode", text="", clip=clip)
    base = _sample(comfy, model, cond, neg)
    return model, base, vae, cond, neg


def _sample(comfy, model, cond, neg, frames=FRAMES, seed=3, cfg=1.0):
    """One euler step; cfg 1 skips the uncond pass (CPU budget), cfg 2 stacks cond+uncond."""
    (latent,) = comfy.run("EmptyLatentImage", width=64, height=64, batch_size=frames)
    (out,) = comfy.run("KSampler", model=model, seed=seed, steps=1, cfg=cfg, sampler_name="euler",
                       scheduler="normal", positive=cond, negative=neg, latent_image=latent, denoise=1.0)
    return out["samples"]


def _apply(comfy, model, layers, frames=FRAMES, length=0, overlap=4, blend="pyramid", alpha=-1.0, overrides=""):
    (patched,) = comfy.run("CompartmentsApplyTemporalLayers", model=model, temporal_layers=layers,
                           frame_count=frames, context_length=length, context_overlap=overlap,
                           context_blend=blend, alpha=alpha, alpha_overrides=overrides)
    return patched


def _motion_slots(model) -> int:
    from compartments.temporal.inject import MotionSlot

    return sum(isinstance(m, MotionSlot) for m in model.model.diffusion_model.modules())


def test_motion_module_changes_video_and_is_removed_on_unload(comfy, temporal_env):
    model, base, _, cond, neg = temporal_env
    (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-original.safetensors")
    (layers_diff,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-diffusers.safetensors")
    video = _sample(comfy, _apply(comfy, model, layers), cond, neg)
    assert video.shape == (FRAMES, 4, 8, 8) and torch.isfinite(video).all()
    assert (video - base).abs().max() > 1e-3, "the motion module must change the frames"
    # same weights in diffusers' MotionAdapter layout give the same video
    video_diff = _sample(comfy, _apply(comfy, model, layers_diff), cond, neg)
    assert torch.allclose(video, video_diff, atol=1e-5)
    # object patches are undone when ComfyUI swaps the patched clone out: the shared UNet has no
    # temporal slot left and samples as before
    assert torch.equal(_sample(comfy, model, cond, neg), base)
    assert _motion_slots(model) == 0


def test_alpha_one_is_the_image_model_exactly(comfy, temporal_env):
    model, base, _, cond, neg = temporal_env
    (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-original.safetensors")
    assert torch.equal(_sample(comfy, _apply(comfy, model, layers, alpha=1.0), cond, neg), base)
    every_layer = "down_blocks=1, mid_block=1, up_blocks=1"
    assert torch.equal(_sample(comfy, _apply(comfy, model, layers, overrides=every_layer), cond, neg), base)
    half = _sample(comfy, _apply(comfy, model, layers, overrides="up_blocks=1"), cond, neg)
    assert (half - base).abs().max() > 1e-4  # only some layers at 1: still temporal


def _tiny_lora(path) -> None:
    gen = torch.Generator().manual_seed(7)
    sd = {}
    for key, (cout, cin) in {"input_blocks_1_1_transformer_blocks_0_attn1_to_q": (320, 320),
                             "output_blocks_3_1_proj_in": (320, 320)}.items():
        sd[f"lora_unet_{key}.lora_down.weight"] = torch.randn(4, cin, generator=gen) * 0.2
        sd[f"lora_unet_{key}.lora_up.weight"] = torch.randn(cout, 4, generator=gen) * 0.2
        sd[f"lora_unet_{key}.alpha"] = torch.tensor(4.0)
    sd["lora_unet_output_blocks_3_1_proj_in.lora_down.weight"] = sd.pop(
        "lora_unet_output_blocks_3_1_proj_in.lora_down.weight").view(4, 320, 1, 1)
    sd["lora_unet_output_blocks_3_1_proj_in.lora_up.weight"] = sd.pop(
        "lora_unet_output_blocks_3_1_proj_in.lora_up.weight").view(320, 4, 1, 1)
    save_file(sd, str(path))


def test_composes_with_a_lora(comfy, temporal_env):
    model, base, _, cond, neg = temporal_env
    (comfy.models_dir / "loras").mkdir(exist_ok=True)
    _tiny_lora(comfy.models_dir / "loras" / "temporal-test-lora.safetensors")
    (lora_model,) = comfy.run("LoraLoaderModelOnly", model=model, lora_name="temporal-test-lora.safetensors",
                              strength_model=1.0)
    (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-original.safetensors")
    lora_only = _sample(comfy, lora_model, cond, neg)
    assert (lora_only - base).abs().max() > 1e-4
    # LoRA first, then temporal layers; with alpha=1 the result is the LoRA model exactly (keys still patch)
    assert torch.equal(_sample(comfy, _apply(comfy, lora_model, layers, alpha=1.0), cond, neg), lora_only)
    # temporal layers first, then the LoRA on top: same video as the other order
    both_a = _sample(comfy, _apply(comfy, lora_model, layers), cond, neg)
    (both_b,) = comfy.run("LoraLoaderModelOnly", model=_apply(comfy, model, layers),
                          lora_name="temporal-test-lora.safetensors", strength_model=1.0)
    assert torch.allclose(both_a, _sample(comfy, both_b, cond, neg), atol=1e-5)
    assert (both_a - lora_only).abs().max() > 1e-3


def test_context_windows_cap_frames_per_pass(comfy, temporal_env):
    model, _, _, cond, neg = temporal_env
    (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-original.safetensors")
    patched = _apply(comfy, model, layers, frames=7, length=4, overlap=1).clone()
    seen: list[int] = []

    def record(apply_model, args):
        seen.append(args["input"].shape[0] // len(args["cond_or_uncond"]))
        return apply_model(args["input"], args["timestep"], **args["c"])

    patched.set_model_unet_function_wrapper(record)
    video = _sample(comfy, patched, cond, neg, frames=7, cfg=2.0)  # cond and uncond stacked per window
    assert video.shape[0] == 7 and torch.isfinite(video).all()
    assert seen == [4, 4], seen


def test_bad_inputs_fail_before_sampling_with_named_input(comfy, temporal_env):
    from compartments.nodes._host import InputError
    from compartments.nodes.temporal import LoadedTemporal
    from compartments.temporal import SDXL, MotionModule, detect
    from compartments.tiny import temporal as tiny_temporal

    model, _, _, cond, neg = temporal_env
    (layers,) = comfy.run("CompartmentsLoadMotionModule", motion_module="temporal-tiny-mm-original.safetensors")
    with torch.device("meta"):
        sdxl = MotionModule(SDXL)
    sdxl_layers = LoadedTemporal(sdxl, detect(tiny_temporal.shapes_only(SDXL)), "mm_sdxl.safetensors")
    with pytest.raises(InputError, match="'temporal_layers'.*sdxl.*sd15|'temporal_layers'.*sdxl"):
        _apply(comfy, model, sdxl_layers)
    with pytest.raises(InputError, match="'frame_count'"):
        _apply(comfy, model, layers, frames=0)
    with pytest.raises(InputError, match="'context_overlap'"):
        _apply(comfy, model, layers, frames=20, length=8, overlap=8)
    with pytest.raises(InputError, match="'frame_count'.*fewer than context_length"):
        _apply(comfy, model, layers, frames=4, length=8, overlap=2)
    with pytest.raises(InputError, match="'frame_count'.*native 32"):
        _apply(comfy, model, layers, frames=40)
    with pytest.raises(InputError, match="'alpha_overrides'"):
        _apply(comfy, model, layers, overrides="sideways=0.3")
    # frame count disagreeing with the latent batch: refused in outer_sample, before any UNet call
    patched = _apply(comfy, model, layers, frames=8).clone()
    calls: list[int] = []
    patched.set_model_unet_function_wrapper(lambda f, a: calls.append(1) or f(a["input"], a["timestep"], **a["c"]))
    with pytest.raises(InputError, match="'frame_count'.*latent batch holds 4"):
        _sample(comfy, patched, cond, neg, frames=4)
    assert calls == []
    # an unknown key layout in the motion-module folder
    save_file({"lora_unet_x.lora_up.weight": torch.zeros(2, 2)},
              str(comfy.models_dir / "animatediff_models" / "not-a-motion-module.safetensors"))
    with pytest.raises(InputError, match="'motion_module'.*unknown key layout"):
        comfy.run("CompartmentsLoadMotionModule", motion_module="not-a-motion-module.safetensors")


def test_own_video_ldm_layers_load_and_sample(comfy, temporal_env):
    """Compartments layers (attention + 3D conv, learned alpha) saved with a header, loaded by the node."""
    from compartments.temporal import TINY_SD15, MotionModule, save_layers

    model, base, _, cond, neg = temporal_env
    torch.manual_seed(5)
    stack = MotionModule(TINY_SD15, kinds=("attention", "conv"), alpha=0.4)
    with torch.no_grad():
        for name, p in stack.named_parameters():
            if "proj_out" in name or "out_layers.3" in name:
                p.copy_(torch.randn_like(p) * 0.05)
    save_layers(stack, comfy.models_dir / "temporal_layers" / "temporal-test-vldm.safetensors", frames=FRAMES)
    (layers,) = comfy.run("CompartmentsLoadTemporalLayers", temporal_layers="temporal-test-vldm.safetensors")
    assert layers.frames == FRAMES and layers.info.kinds == ("attention", "conv")
    assert layers.module.alphas() == pytest.approx(stack.alphas())
    video = _sample(comfy, _apply(comfy, model, layers), cond, neg)
    assert torch.isfinite(video).all() and (video - base).abs().max() > 1e-4


def _svd_like_vae():
    """A VAE with SVD's temporal decoder (ComfyUI detects it from ``decoder.mid.block_1.mix_factor``), seeded."""
    import comfy.sd

    from compartments.tiny.sd15 import random_tensor

    probe = comfy.sd.VAE(sd={"decoder.mid.block_1.mix_factor": torch.zeros(1)})
    gen = torch.Generator().manual_seed(11)
    sd = {}
    for k, v in probe.first_stage_model.state_dict().items():
        sd[k] = torch.zeros(v.shape) if k.endswith("mix_factor") else random_tensor(k, tuple(v.shape), gen)
    return comfy.sd.VAE(sd=sd)


def test_decode_video_is_temporal_with_a_temporal_vae_and_core_otherwise(comfy, temporal_env):
    from compartments.nodes._host import InputError

    _, _, vae, _, _ = temporal_env
    latent = {"samples": torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    images, mode = comfy.run("CompartmentsVAEDecodeVideo", samples=latent, vae=vae, frames_per_pass=0, overlap=2)
    (core,) = comfy.run("VAEDecode", samples=latent, vae=vae)
    assert mode == "per-frame" and torch.equal(images, core)

    svd_vae = _svd_like_vae()
    whole, mode = comfy.run("CompartmentsVAEDecodeVideo", samples=latent, vae=svd_vae, frames_per_pass=0, overlap=2)
    assert mode == "temporal" and whole.shape == (4, 64, 64, 3) and torch.isfinite(whole).all()
    single, _ = comfy.run("CompartmentsVAEDecodeVideo", samples=latent, vae=svd_vae, frames_per_pass=1, overlap=0)
    assert (single - whole).abs().max() > 1e-4, "a temporal decoder must mix frames"
    windowed, _ = comfy.run("CompartmentsVAEDecodeVideo", samples=latent, vae=svd_vae, frames_per_pass=3, overlap=2)
    assert windowed.shape == whole.shape and torch.isfinite(windowed).all()
    with pytest.raises(InputError, match="'frames_per_pass'"):
        comfy.run("CompartmentsVAEDecodeVideo", samples=latent, vae=svd_vae, frames_per_pass=8, overlap=2)
