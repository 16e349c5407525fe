"""The full-size builders used by the AnimateDiff-Evolved side-by-side benchmark have real SD1.5 layouts.

Checked on shapes only (no 2.5 GB build): ADE rejects anything but the real channel layout.
"""

from __future__ import annotations

import math

from compartments.temporal.formats import detect
from compartments.temporal.layers import SD15_NO_MID
from compartments.tiny.sd15 import unet_shapes
from compartments.tiny.temporal import shapes_only
from compartments.tiny.temporal_full import SD15_UNET_CONFIG


def test_full_unet_config_is_sd15_sized() -> None:
    shapes = dict(unet_shapes(SD15_UNET_CONFIG))
    assert len(shapes) == 686  # tensors under model.diffusion_model in the released SD1.5 checkpoint
    assert sum(math.prod(s) for s in shapes.values()) == 859_520_964  # SD1.5 UNet parameter count
    assert shapes["model.diffusion_model.input_blocks.7.1.proj_in.weight"] == (1280, 1280, 1, 1)
    assert shapes["model.diffusion_model.output_blocks.11.1.proj_out.weight"] == (320, 320, 1, 1)
    assert "model.diffusion_model.input_blocks.10.1.norm.weight" not in shapes  # no attention on level 4


def test_full_motion_module_layout_is_v3() -> None:
    sd = shapes_only(SD15_NO_MID)
    info = detect(sd)
    assert (info.base, info.version) == ("sd15", "v3")
    assert not any(k.startswith("mid_block.") for k in sd)
    pe = [v.shape for k, v in sd.items() if k.endswith("pos_encoder.pe")]
    assert pe and all(s[1] == 32 for s in pe)
    assert {s[2] for s in pe} == {320, 640, 1280}
