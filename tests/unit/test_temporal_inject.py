"""Room-side injection helpers: frames from the UNet batch, layout checks, MotionSlot casting, apply()."""

from __future__ import annotations

import pytest
import torch

from compartments.temporal import (
    SD15,
    SDXL,
    TINY_SD15,
    LayoutMismatch,
    MotionModule,
    MotionSlot,
    check_compatible,
    check_frames,
    frames_per_video,
    layout_of_unet,
    make_apply,
    timestep_embed_handler,
)


def test_frames_per_video_divides_by_stacked_conditionings() -> None:
    assert frames_per_video(32, [0, 1]) == 16
    assert frames_per_video(16, None) == 16
    with pytest.raises(ValueError, match="not a multiple"):
        frames_per_video(15, [0, 1])


def test_layout_checks_name_both_bases() -> None:
    check_compatible(TINY_SD15, layout_of_unet(320, [1, 2], [1, 1]))
    assert layout_of_unet(320, [1, 2, 4, 4], 2).name == "sd15"
    with pytest.raises(LayoutMismatch, match="sdxl.*sd15"):
        check_compatible(SDXL, SD15)
    check_frames(64, 32, 16)
    with pytest.raises(ValueError, match="context_length"):
        check_frames(40, 32, 0)


def test_motion_slot_handler_matches_direct_layer_call_and_keeps_dtype() -> None:
    torch.manual_seed(0)
    mm = MotionModule(TINY_SD15)
    with torch.no_grad():
        for p in mm.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    layer = mm.layer("up_blocks.0.motion_modules.1")
    slot = MotionSlot(layer, "up_blocks.0.motion_modules.1", alpha=0.25)
    x = torch.randn(2 * 3, 640, 2, 2)  # cond + uncond, 3 frames each
    out = timestep_embed_handler(slot, x, None, None, {"cond_or_uncond": [0, 1]})
    assert torch.allclose(out, layer(x, 3, 0.25))
    half = timestep_embed_handler(slot, x.to(torch.bfloat16), None, None, {"cond_or_uncond": [0, 1]})
    assert half.dtype == torch.bfloat16
    apply = make_apply(mm, {"up_blocks.0.motion_modules.1": 0.25})
    assert torch.allclose(apply(("output", 1), x[:3], 3, None), layer(x[:3], 3, 0.25))
    assert apply(("output", 9), x, 3, None) is x  # no layer there
    with pytest.raises(ValueError, match="unknown layers"):
        make_apply(mm, {"nope": 0.5})


def test_injection_checker_names_the_input_and_the_fix() -> None:
    """Apply Temporal Layers' checks, pure: each refusal carries the input and a fix; a good
    setting returns every layer's alpha (None = the layer's own)."""
    from compartments.errors import CompartmentsError
    from compartments.temporal.inject import check_injection

    with torch.device("meta"):
        module = MotionModule(TINY_SD15, max_frames=32)
    unet = layout_of_unet(320, [1, 2], [1, 1])
    keys = [s.key for s in module.layout.slots]
    assert check_injection(module, unet, 16) == dict.fromkeys(keys)
    assert set(check_injection(module, unet, 16, alpha=0.5).values()) == {0.5}
    per = check_injection(module, unet, 16, alpha_overrides=f"{keys[0]}=1")
    assert per[keys[0]] == 1.0 and per[keys[1]] is None
    cases = [
        ({"frame_count": 0}, "frame_count", "at least 1"),
        ({"frame_count": 40}, "frame_count", "native 32"),
        ({"frame_count": 4, "context_length": 8, "context_overlap": 2}, "frame_count", "fewer than context_length"),
        ({"frame_count": 64, "context_length": 40, "context_overlap": 2}, "context_length", "native 32"),
        ({"frame_count": 20, "context_length": 8, "context_overlap": 8}, "context_overlap", "smaller than"),
        ({"frame_count": 20, "context_length": -1}, "context_length", r"0 \(off\)"),
        ({"frame_count": 16, "context_blend": "sideways"}, "context_blend", "unknown"),
        ({"frame_count": 16, "alpha": 1.5}, "alpha", "outside 0..1"),
        ({"frame_count": 16, "alpha_overrides": "sideways=0.3"}, "alpha_overrides", "matches no temporal layer"),
    ]
    for kwargs, field, text in cases:
        with pytest.raises(CompartmentsError, match=text) as err:
            check_injection(module, unet, **kwargs)
        assert err.value.field == field, (kwargs, err.value.field)
    with pytest.raises(CompartmentsError, match="sd15") as err:
        check_injection(module, SDXL, 16)
    assert err.value.field == "temporal_layers" and "SDXL" in err.value.fix


def test_one_table_of_layer_kinds() -> None:
    from compartments.temporal.layers import LAYER_KINDS, layer_kinds

    assert layer_kinds("attention + conv") == layer_kinds("attention+conv") == ("attention", "conv")
    assert all(layer_kinds(name) == kinds for name, kinds in LAYER_KINDS.items())
    with pytest.raises(ValueError, match="unknown layer kinds"):
        layer_kinds("lstm")
