"""Temporal layers: alpha=1 is the image model, frame mixing happens only through the temporal path."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compartments.temporal import (
    TINY_SD15,
    AlphaBlender,
    MotionModule,
    TemporalAttentionBlock,
    TemporalConvBlock,
    TemporalLayer,
    make_apply,
    parse_alpha_overrides,
    sinusoidal_positions,
)


def _randomise(module: nn.Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if not name.endswith("mix_factor"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05 + (1.0 if name.endswith("norm.weight") else 0.0))


class ToyImageUNet(nn.Module):
    """A per-frame image network with blocks named like ComfyUI's (input/middle/output)."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Conv2d(4, 320, 3, padding=1)
        self.down1 = nn.Conv2d(320, 320, 3, padding=1)
        self.down2 = nn.Conv2d(320, 640, 3, padding=1)
        self.mid = nn.Conv2d(640, 640, 3, padding=1)
        self.out = nn.Conv2d(640, 4, 3, padding=1)

    def forward(self, x: torch.Tensor, apply=None, frames: int = 1) -> torch.Tensor:
        def hook(block, h):
            return h if apply is None else apply(block, h, frames, None)

        h = hook(("input", 1), torch.tanh(self.down1(self.inp(x))))
        h = hook(("input", 3), torch.tanh(self.down2(h)))
        h = hook(("middle", 0), torch.tanh(self.mid(h)))
        return self.out(h)


def test_alpha_one_reproduces_image_model_per_frame() -> None:
    torch.manual_seed(0)
    unet = ToyImageUNet()
    mm = MotionModule(TINY_SD15, kinds=("attention", "conv"))
    _randomise(mm)
    frames = torch.randn(6, 4, 8, 8)
    apply = make_apply(mm, alphas=1.0)
    with torch.no_grad():
        video = unet(frames, apply, frames=6)
        # bit for bit the image model on the same batch of frames...
        assert torch.equal(video, unet(frames))
        # ...and each frame is the image model's output for that frame alone (batched-conv rounding aside)
        for i in range(6):
            assert torch.allclose(video[i:i + 1], unet(frames[i:i + 1]), atol=1e-6, rtol=0)
        # and the temporal path really changes things when alpha < 1
        mixed = unet(frames, make_apply(mm, alphas=0.3), frames=6)
    assert (mixed - video).abs().max() > 1e-3


def test_learned_alpha_is_sigmoid_and_blends() -> None:
    blender = AlphaBlender(alpha=0.25)
    assert abs(float(blender.alpha().detach()) - 0.25) < 1e-6
    a, b = torch.ones(2, 3), torch.zeros(2, 3)
    assert torch.allclose(blender(a, b), torch.full((2, 3), 0.25))
    assert torch.equal(blender(a, b, alpha=1.0), a)
    assert torch.equal(blender(a, b, alpha=0.0), b)
    blender.mix_factor.data.fill_(2.0)
    assert abs(float(blender.alpha().detach()) - torch.sigmoid(torch.tensor(2.0)).item()) < 1e-6


def test_fresh_blocks_are_identity_and_mix_only_frames_of_one_video() -> None:
    torch.manual_seed(1)
    x = torch.randn(2 * 4, 64, 3, 3)
    attn, conv = TemporalAttentionBlock(64, heads=4), TemporalConvBlock(64)
    assert torch.equal(attn(x, 4), x)  # zero-initialised proj_out
    assert torch.equal(conv(x, 4), x)  # zero-initialised last conv
    _randomise(attn)
    _randomise(conv)
    for block in (attn, conv):
        y = block(x, 4)
        x2 = x.clone()
        x2[4:] += 1.0  # change the second video only
        y2 = block(x2, 4)
        assert torch.allclose(y[:4], y2[:4], atol=1e-6), "videos in a batch must not see each other"
        assert not torch.allclose(y[4:], y2[4:])


def test_attention_sees_frame_order() -> None:
    torch.manual_seed(2)
    layer = TemporalLayer(32, heads=4, norm_groups=8)
    _randomise(layer)
    x = torch.randn(5, 32, 2, 2)
    y = layer(x, 5, alpha=0.0)
    perm = torch.tensor([4, 3, 2, 1, 0])
    y_perm = layer(x[perm], 5, alpha=0.0)
    assert not torch.allclose(y_perm, y[perm], atol=1e-4), "positions must make attention order-aware"


def test_positions_match_animatediff_table() -> None:
    pe = sinusoidal_positions(32, 320)
    assert pe.shape == (1, 32, 320)
    assert torch.allclose(pe[0, 0, 0::2], torch.zeros(160)) and torch.allclose(pe[0, 0, 1::2], torch.ones(160))


def test_layout_slots_follow_comfy_block_indices() -> None:
    blocks = [s.block for s in TINY_SD15.slots]
    assert blocks == [("input", 1), ("input", 3), ("middle", 0), ("output", 0), ("output", 1), ("output", 2),
                      ("output", 3)]
    from compartments.temporal import SD15, SDXL
    assert len([s for s in SD15.slots if s.key.startswith("up_blocks")]) == 12
    assert [s.block for s in SDXL.slots][:3] == [("input", 1), ("input", 2), ("input", 4)]
    assert not SDXL.mid


def test_bad_inputs_raise_named_errors() -> None:
    layer = TemporalLayer(32, heads=4, norm_groups=8)
    with pytest.raises(ValueError, match="not a whole number"):
        layer(torch.randn(5, 32, 2, 2), 2)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(4, 16, 2, 2), 2)
    big = TemporalAttentionBlock(32, heads=4, max_frames=8, norm_groups=8)
    _randomise(big)
    with pytest.raises(ValueError, match="context windows"):
        big(torch.randn(12, 32, 2, 2), 12)
    mm = MotionModule(TINY_SD15)
    keys = list(mm.layers())
    assert parse_alpha_overrides("down_blocks=0.2, up_blocks.1=1", keys)["up_blocks.1.motion_modules.1"] == 1.0
    with pytest.raises(ValueError, match="0..1"):
        parse_alpha_overrides("mid_block=2", keys)
    with pytest.raises(ValueError, match="matches no temporal layer"):
        parse_alpha_overrides("side_block=0.5", keys)
    with pytest.raises(ValueError, match="0..1"):
        mm.set_alpha_override(1.5)
