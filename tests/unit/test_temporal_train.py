"""Tier 1: the temporal training loop on a small real video denoiser (no ComfyUI).

The denoiser is an eps-prediction conv net with the project's own :class:`TemporalLayer`
between its two spatial convolutions, wrapped exactly as ComfyUI's EPS model sampling does
(``calculate_input``: x / sqrt(sigma^2 + 1); ``calculate_denoised``: x - eps * sigma).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors import safe_open
from torch import nn

from compartments.temporal.layers import TemporalLayer
from compartments.temporal.train import (
    TrainConfig,
    TrainError,
    load_checkpoint,
    loss_curve_image,
    loss_report,
    make_optimizer,
    native_loss,
    optim_path_for,
    train_temporal,
)

FRAMES = 6


class VideoDenoiser(nn.Module):
    """conv -> temporal layer -> conv, as an EPS denoiser over a (frames, 4, 8, 8) batch."""

    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.spatial_in = nn.Conv2d(4, 32, 3, padding=1)
        self.spatial_out = nn.Conv2d(32, 4, 3, padding=1)
        self.temporal = TemporalLayer(32, ("attention", "conv"), heads=4, max_frames=16, norm_groups=8)
        self.frames = 4

    def forward(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        s = sigma.view(-1, 1, 1, 1)
        h = torch.nn.functional.silu(self.spatial_in(x / torch.sqrt(s**2 + 1)))
        eps = self.spatial_out(self.temporal(h, self.frames))
        return x - eps * s

    def spatial(self) -> list[nn.Parameter]:
        return list(self.spatial_in.parameters()) + list(self.spatial_out.parameters())


def clip_latents() -> torch.Tensor:
    """A 4-channel 'latent' blob moving one pixel per frame across an 8x8 grid."""
    lat = torch.full((FRAMES, 4, 8, 8), -0.5)
    for t in range(FRAMES):
        lat[t, :, 2:5, t:t + 3] = 1.0
    return lat


SIGMAS = torch.linspace(0.03, 14.6, 50)


def run(steps: int, tmp=None, resume: bool = False, progress=None, seed: int = 3, **kw):
    model = VideoDenoiser()
    cfg = TrainConfig(steps=steps, lr=3e-3, frames_per_clip=4, seed=seed, **kw)
    ckpt = None if tmp is None else tmp / "layers.safetensors"
    result = train_temporal(model, model.temporal, clip_latents(), SIGMAS, cfg, spatial=model.spatial(),
                            checkpoint=ckpt, resume=resume, progress=progress)
    return model, result


def test_spatial_weights_frozen_bitwise_and_temporal_trained():
    ref = VideoDenoiser()
    model, result = run(5)
    assert all(not p.requires_grad for p in model.spatial())
    for (name, a), b in zip(model.named_parameters(), ref.parameters(), strict=True):
        if name.startswith("spatial"):
            assert torch.equal(a, b), name
    changed = [n for (n, a), b in zip(model.temporal.named_parameters(), ref.temporal.parameters(), strict=True)
               if not torch.equal(a, b)]
    assert changed, "no temporal parameter moved"
    assert result.step == 5 and len(result.losses) == 5


def test_loss_decreases_on_fixed_eval_set():
    _, result = run(40, eval_draws=8)
    assert result.eval_last < 0.9 * result.eval_first, result.eval_curve


def test_resume_equals_uninterrupted(tmp_path):
    full, full_res = run(6)
    (tmp_path / "a").mkdir()
    run(3, tmp_path / "a")
    resumed, res = run(6, tmp_path / "a", resume=True)
    assert res.resumed_from == 3 and res.step == 6
    assert res.losses == full_res.losses
    for (n, a), b in zip(resumed.state_dict().items(), full.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_interrupt_writes_last_completed_step_and_resume_matches(tmp_path):
    full, full_res = run(6)

    def stop_at_4(done: int, total: int) -> None:
        if done == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(6, tmp_path, progress=stop_at_4)
    ckpt = tmp_path / "layers.safetensors"
    with safe_open(str(optim_path_for(ckpt)), "pt") as f:
        assert f.metadata()["step"] == "4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["layers.optim.safetensors", "layers.safetensors"]
    resumed, res = run(6, tmp_path, resume=True)
    assert res.losses == full_res.losses
    for a, b in zip(resumed.temporal.parameters(), full.temporal.parameters(), strict=True):
        assert torch.equal(a, b)


def test_error_in_forward_keeps_last_completed_step(tmp_path):
    model = VideoDenoiser()
    calls = {"n": 0}

    def flaky(x, sigma):
        calls["n"] += 1
        if calls["n"] == 1 + 4 + 3:  # eval draws (4), then 3 good steps, then a failing forward
            raise RuntimeError("device lost")
        return model(x, sigma)

    cfg = TrainConfig(steps=6, lr=1e-3, frames_per_clip=4, seed=0)
    with pytest.raises(RuntimeError, match="device lost"):
        train_temporal(flaky, model.temporal, clip_latents(), SIGMAS, cfg, spatial=model.spatial(),
                       checkpoint=tmp_path / "l.safetensors")
    opt = make_optimizer(list(VideoDenoiser().temporal.parameters()), cfg)
    assert load_checkpoint(tmp_path / "l.safetensors", VideoDenoiser().temporal, opt).step == 3


def test_optimizer_state_is_safetensors_with_metadata(tmp_path):
    run(2, tmp_path)
    path = optim_path_for(tmp_path / "layers.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["format"] == "compartments.temporal.optim/1"
    assert json.loads(meta["config"])["frames_per_clip"] == 4
    assert any(k.endswith("exp_avg_sq") for k in keys)
    assert len(json.loads(meta["losses"])) == 2


def test_resume_refuses_mismatched_pair(tmp_path):
    run(2, tmp_path)
    layers = tmp_path / "layers.safetensors"
    layers.write_bytes(layers.read_bytes()[:-1] + b" ")
    with pytest.raises(TrainError, match="another version"):
        run(4, tmp_path, resume=True)


def test_too_few_frames_is_a_clear_error():
    model = VideoDenoiser()
    cfg = TrainConfig(steps=1, frames_per_clip=8)
    with pytest.raises(TrainError, match="fewer than frames_per_clip"):
        train_temporal(model, model.temporal, clip_latents(), SIGMAS, cfg, spatial=model.spatial())


def test_layers_outside_forward_path_are_reported():
    model = VideoDenoiser()
    detached = TemporalLayer(32, ("conv",), norm_groups=8)
    cfg = TrainConfig(steps=1, frames_per_clip=4)
    model.requires_grad_(False)
    with pytest.raises(TrainError, match="forward path"):
        train_temporal(model, detached, clip_latents(), SIGMAS, cfg, spatial=model.spatial())


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_native_loss_is_the_parameterisation_error(prediction):
    torch.manual_seed(0)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    sigma = torch.tensor([0.1, 1.0, 7.0])
    s = sigma.view(-1, 1, 1, 1)
    x = x0 + noise * s
    out = torch.randn(3, 4, 2, 2)  # what the network predicted
    if prediction == "eps":
        denoised, target = x - out * s, noise
    else:  # ComfyUI V_PREDICTION with sigma_data = 1
        denoised = x / (s**2 + 1) - out * s / torch.sqrt(s**2 + 1)
        # v target: the output that would give denoised == x0
        target = (x / (s**2 + 1) - x0) * torch.sqrt(s**2 + 1) / s
    expected = ((out - target) ** 2).mean()
    assert math.isclose(float(native_loss(denoised, x0, sigma, prediction)), float(expected), rel_tol=1e-4)


def test_report_and_curve_image():
    _, result = run(3)
    text = loss_report(result)
    assert "steps: 3" in text and json.loads(text.splitlines()[-1])["losses"]
    img = loss_curve_image(result.losses, result.eval_curve)
    assert img.shape == (1, 256, 512, 3) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0


def test_a_layers_name_that_is_another_runs_optimizer_state_is_refused(tmp_path):
    """Training 'x.optim' after 'x' would overwrite x's optimizer state (x.optim.safetensors)."""
    from compartments.temporal.train import TrainError, check_layers_path, optim_path_for

    assert optim_path_for(tmp_path / "x.safetensors").name == "x.optim.safetensors"
    for bad in ("x.optim.safetensors", "x.optim", "sub/y.optim.safetensors"):
        with pytest.raises(TrainError, match="optimizer-state name of the run"):
            check_layers_path(tmp_path / bad)
    check_layers_path(tmp_path / "x.safetensors")
    check_layers_path(tmp_path / "optimal.safetensors")
