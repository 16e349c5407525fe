"""Motion-module formats: detection from keys, both AnimateDiff layouts, own format, parity with diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from compartments.temporal import (
    SD15,
    SDXL,
    TINY_SD15,
    FormatError,
    MotionModule,
    detect,
    diffusers_to_original,
    load_layers,
    load_motion_module,
    original_to_diffusers,
    save_layers,
)
from compartments.temporal.layers import SD15_NO_MID
from compartments.tiny import temporal as tiny_temporal


def test_detects_versions_and_bases_from_keys() -> None:
    v2 = detect(tiny_temporal.shapes_only(SD15))
    v3 = detect(tiny_temporal.shapes_only(SD15_NO_MID))
    v1 = detect(tiny_temporal.shapes_only(SD15_NO_MID, max_frames=24))
    xl = detect(tiny_temporal.shapes_only(SDXL))
    assert (v2.version, v2.base, v2.mid) == ("v2", "sd15", True)
    assert (v3.version, v3.base, v3.max_frames) == ("v3", "sd15", 32)
    assert v1.version == "v1" and v1.max_frames == 24
    assert (xl.version, xl.base, xl.block_channels) == ("sdxl-beta", "sdxl", (320, 640, 1280))
    diff = detect(original_to_diffusers(tiny_temporal.shapes_only(SDXL)))
    assert (diff.format, diff.base) == ("animatediff-diffusers", "sdxl")


def test_original_and_diffusers_files_load_to_identical_layers() -> None:
    a, info_a = load_motion_module(tiny_temporal.original_file())
    b, info_b = load_motion_module(tiny_temporal.diffusers_file())
    assert (info_a.format, info_b.format) == ("animatediff", "animatediff-diffusers")
    assert info_a.base == info_b.base == "tiny-sd15"
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert set(a.alphas().values()) == {0.0}  # AnimateDiff adds its full temporal residual
    assert diffusers_to_original(original_to_diffusers(sa)).keys() <= sa.keys()


def test_unknown_layout_is_refused_with_reason(tmp_path) -> None:
    with pytest.raises(FormatError, match="unknown key layout"):
        detect({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
    path = tmp_path / "lora.safetensors"
    save_file({"lora_unet_down.lora_up.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(FormatError, match="unknown key layout"):
        load_motion_module(path)
    sd = tiny_temporal.motion_state_dict()
    sd.pop(next(k for k in sd if k.endswith("proj_in.weight") and k.startswith("up_blocks")))
    bad = tmp_path / "broken.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(FormatError, match="missing"):
        load_motion_module(bad)
    with pytest.raises(FormatError, match="safetensors"):
        load_motion_module(tmp_path / "mm.ckpt")


def test_own_format_round_trips_with_metadata(tmp_path) -> None:
    torch.manual_seed(0)
    mm = MotionModule(TINY_SD15, kinds=("attention", "conv"), alpha=0.3)
    with torch.no_grad():
        mm.layer("mid_block.motion_modules.0").blender.mix_factor.fill_(1.5)
        for p in mm.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    path = save_layers(mm, tmp_path / "layers" / "clip.safetensors", frames=12)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["compartments.format"] == "temporal-layers" and meta["base"] == "tiny-sd15" and meta["frames"] == "12"
    alphas = json.loads(meta["alphas"])
    assert alphas == pytest.approx(mm.alphas())
    assert abs(alphas["down_blocks.0.motion_modules.0"] - 0.3) < 0.01
    assert abs(alphas["mid_block.motion_modules.0"] - torch.sigmoid(torch.tensor(1.5)).item()) < 0.01
    back, info, _ = load_layers(path)
    assert info.kinds == ("attention", "conv") and info.format == "compartments"
    x = torch.randn(2 * 4, 320, 2, 2)
    key = "down_blocks.0.motion_modules.0"
    assert torch.equal(back.layer(key)(x, 4), mm.layer(key)(x, 4))
    assert back.alphas() == pytest.approx(mm.alphas())
    loaded, info2 = load_motion_module(path)  # the generic loader recognises the header too
    assert info2.format == "compartments"
    assert not list(tmp_path.glob("layers/.*tmp"))


def test_parity_with_diffusers_animatediff_transformer() -> None:
    """Same random weights -> same output as diffusers' AnimateDiffTransformer3D (float32, 1e-4).

    diffusers pools the block's GroupNorm statistics over all frames of a video; original
    AnimateDiff normalises each frame. ``norm="video"`` reproduces diffusers; ``norm="frame"``
    differs by exactly that normalisation.
    """
    from diffusers.models.unets.unet_motion_model import MotionAdapter

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(320, 640), motion_layers_per_block=1, use_motion_mid_block=True,
                            motion_max_seq_length=32).eval()
    diff_sd = original_to_diffusers(tiny_temporal.motion_state_dict(seed=3))
    missing, unexpected = adapter.load_state_dict(diff_sd, strict=False)
    assert not unexpected and all(k.endswith("pos_embed.pe") for k in missing)
    ours, _ = load_motion_module(tiny_temporal.original_file())  # seed 0 file; rebuild from seed 3 below
    from compartments.temporal.formats import build_animatediff
    ours, _ = build_animatediff(tiny_temporal.motion_state_dict(seed=3), norm="video")
    cases = [("down_blocks.0.motion_modules.0", adapter.down_blocks[0].motion_modules[0], 320),
             ("mid_block.motion_modules.0", adapter.mid_block.motion_modules[0], 640),
             ("up_blocks.1.motion_modules.1", adapter.up_blocks[1].motion_modules[1], 320)]
    frames = 8
    x = torch.randn(2 * frames, 320, 4, 4)
    with torch.no_grad():
        for key, ref_block, ch in cases:
            xi = x if ch == 320 else torch.randn(2 * frames, ch, 2, 2)
            ref = ref_block(xi, num_frames=frames)
            got = ours.layer(key)(xi, frames)
            assert (got - ref).abs().max().item() <= 1e-4, key
        ours.set_norm_mode("frame")
        per_frame = ours.layer(cases[0][0])(x, frames)
        ref = cases[0][1](x, num_frames=frames)
    assert (per_frame - ref).abs().max().item() > 1e-4  # the documented normalisation difference is real


# --- SDXL: AnimateDiff-SDXL beta and Hotshot-XL, at their real shapes ------------------------------------


@pytest.fixture(scope="module")
def sdxl_mm() -> dict[str, torch.Tensor]:
    """A full-size AnimateDiff-SDXL beta state dict (236 M parameters, seeded), original layout."""
    return tiny_temporal.motion_state_dict(SDXL, seed=5)


def test_hotshot_layout_is_detected_as_sdxl_and_renames_losslessly(sdxl_mm) -> None:
    from compartments.temporal import hotshot_to_original, original_to_hotshot

    hs = original_to_hotshot(sdxl_mm, max_frames=24)
    assert "down_blocks.2.temporal_attentions.1.transformer_blocks.0.attention_blocks.1.to_q.weight" in hs
    assert hs["up_blocks.0.temporal_attentions.2.transformer_blocks.0.attention_blocks.0.pos_encoder."
              "positional_encoding"].shape == (1, 24, 1280)
    assert not any(".motion_modules." in k or k.startswith("mid_block") for k in hs)
    info = detect(hs)
    assert (info.format, info.version, info.base) == ("hotshotxl", "hotshotxl", "sdxl")
    assert (info.block_channels, info.num_res_blocks, info.mid, info.max_frames) == ((320, 640, 1280), 2, False, 24)
    back = hotshot_to_original(hs)
    assert back.keys() == sdxl_mm.keys()
    for k, v in back.items():
        want = sdxl_mm[k][:, :24] if k.endswith(".pe") else sdxl_mm[k]
        assert torch.equal(v, want), k
    xl = detect(sdxl_mm)
    assert (xl.format, xl.version, xl.base, xl.max_frames) == ("animatediff", "sdxl-beta", "sdxl", 32)


def test_hotshot_file_with_unet_keys_is_refused(tmp_path) -> None:
    from compartments.temporal import original_to_hotshot

    hs = original_to_hotshot(tiny_temporal.shapes_only(SDXL))
    hs = {k: torch.zeros(1) for k in list(hs)[:4]}
    hs["down_blocks.0.resnets.0.conv1.weight"] = torch.zeros(1)
    path = tmp_path / "hotshot_xl_unet.safetensors"
    save_file(hs, str(path))
    with pytest.raises(FormatError, match="outside its temporal layers.*hsxl_temporal_layers"):
        load_motion_module(path)


def test_hotshot_and_animatediff_sdxl_with_the_same_weights_compute_the_same(sdxl_mm) -> None:
    from compartments.temporal import build_animatediff, original_to_hotshot

    ad, ad_info = build_animatediff(sdxl_mm)
    hs, hs_info = build_animatediff(original_to_hotshot(sdxl_mm, max_frames=24))
    assert (ad_info.max_frames, hs_info.max_frames) == (32, 24) and ad.layout == hs.layout
    frames = 8  # Hotshot-XL's clip length
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for key, layer in ad.layers().items():
            x = torch.randn(frames, layer.channels, 2, 2, generator=gen)
            assert torch.equal(layer(x, frames), hs.layer(key)(x, frames)), key
        with pytest.raises(ValueError, match="position table holds 24"):
            hs.layer("down_blocks.0.motion_modules.0")(torch.randn(32, 320, 1, 1), 32)


def test_sdxl_parity_with_diffusers_motion_adapter(sdxl_mm) -> None:
    """Every SDXL motion module equals diffusers' SDXL MotionAdapter on the same weights (float32, 1e-4)."""
    from diffusers.models.unets.unet_motion_model import MotionAdapter

    from compartments.temporal import build_animatediff

    torch.manual_seed(0)
    adapter = MotionAdapter(block_out_channels=(320, 640, 1280), motion_layers_per_block=2,
                            use_motion_mid_block=False, motion_max_seq_length=32).eval()
    missing, unexpected = adapter.load_state_dict(original_to_diffusers(sdxl_mm), strict=False)
    assert not unexpected and missing and all(k.endswith("pos_embed.pe") for k in missing)
    ours, _ = build_animatediff(sdxl_mm, norm="video")
    frames = 8
    gen = torch.Generator().manual_seed(2)
    compared = 0
    with torch.no_grad():
        for key, layer in ours.layers().items():
            side, level, _, j = key.split(".")
            ref_block = getattr(adapter, side)[int(level)].motion_modules[int(j)]
            x = torch.randn(2 * frames, layer.channels, 2, 2, generator=gen)
            assert (layer(x, frames) - ref_block(x, num_frames=frames)).abs().max().item() <= 1e-4, key
            compared += 1
    assert compared == 15  # 3 levels x (2 down + 3 up)
