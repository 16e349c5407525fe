"""Tier 2: training temporal layers on the tiny SD1.5 MODEL inside a real ComfyUI.

The loss check is on a fixed evaluation set (fixed seed, fixed noise, four fixed sigmas
spread over the model's table), before and after training, on a synthetic clip: a square
moving across 8 frames. CI-cheap sizes: 32x32 px (4x4 latents), 4-frame windows, 10 steps
at lr 1e-2; the same check at 64x64 is a figure in docs/temporal.md, section "Training temporal layers".
"""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors import safe_open

from compartments.temporal.data import images_to_tensor, moving_square

STEPS = 10


def _digest(model, names: list[str] | None = None) -> tuple[list[str], str]:
    """SHA-256 over the image model's tensors (the names present before training: while the
    trained clone is loaded, its temporal layers also show up in the shared state dict).

    Every model is unloaded first: the session's other tests load patched clones (LoRAs,
    soups) of the same module, and ComfyUI patches weights in place while a clone is loaded.
    """
    import comfy.model_management

    comfy.model_management.unload_all_models()
    sd = model.model.state_dict()
    names = names or sorted(sd)
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode())
        h.update(sd[name].detach().cpu().contiguous().numpy().tobytes())
    return names, h.hexdigest()


@pytest.fixture(scope="module")
def clip_frames():
    return images_to_tensor(moving_square(frames=8, size=32, square=8))


@pytest.fixture(scope="module")
def trained(comfy, sd15, clip_frames):
    model, clip, vae = sd15
    before = _digest(model)
    (positive,) = comfy.run("CLIPTextEncode", clip=clip, text="a yellow square moving")
    out = comfy.run("CompartmentsTemporalTrain", model=model, steps=STEPS, lr=1e-2, frames_per_clip=4, seed=0,
                    save_name="test/square", resume=False, images=clip_frames, vae=vae, positive=positive,
                    layers="attention + conv", eval_draws=2)
    return out, before


def test_loss_goes_down_and_spatial_weights_do_not_change(comfy, sd15, trained):
    (model_out, report, curve), before = trained
    model = sd15[0]
    assert _digest(model, before[0]) == before, "a spatial (image) weight changed"
    print(report)
    lines = report.splitlines()
    assert lines[0] == f"steps: {STEPS}"
    import json

    data = json.loads(lines[-1])
    (s0, first), (s1, last) = data["eval"][0], data["eval"][-1]
    assert (s0, s1) == (0, STEPS)
    assert last < 0.9 * first, data["eval"]
    assert curve.shape[0] == 1 and curve.shape[-1] == 3
    path = comfy.models_dir / "temporal_layers" / "test" / "square.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["compartments.format"] == "temporal-layers" and meta["train_step"] == str(STEPS)
    assert (path.parent / "square.optim.safetensors").exists()
    assert model_out is not model


def test_trained_model_samples_a_video(comfy, trained):
    (model_out, _, _), _ = trained
    (latent,) = comfy.run("EmptyLatentImage", width=32, height=32, batch_size=4)
    cond = [[torch.zeros(1, 77, 768), {}]]
    (samples,) = comfy.run("KSampler", model=model_out, seed=0, steps=2, cfg=1.0, sampler_name="euler",
                           scheduler="normal", positive=cond, negative=cond, latent_image=latent, denoise=1.0)
    assert samples["samples"].shape == (4, 4, 4, 4)
    assert torch.isfinite(samples["samples"]).all()


def test_command_trains_with_weights_loaded_in_inference_mode(comfy, tmp_path, capsys):
    """``python -m compartments train-temporal`` in-process, the checkpoint loaded under inference
    mode as ComfyUI's executor does (autograd cannot save such tensors: the node must cope).
    Resume is proven bitwise at tier 1; here one step checks the command's plumbing."""
    from compartments.cli import main
    from compartments.temporal.data import save_frames
    from compartments.tiny import sd15 as tiny_sd15

    save_frames(moving_square(frames=4, size=32, square=8), tmp_path / "frames")
    out = tmp_path / "layers.safetensors"
    args = ["train-temporal", "--checkpoint", str(tiny_sd15.checkpoint()), "--frames", str(tmp_path / "frames"),
            "--out", str(out), "--comfyui", str(comfy.path), "--frames-per-clip", "2", "--lr", "1e-3",
            "--eval-draws", "0", "--steps", "1", "--cpu"]
    with torch.inference_mode():
        assert main(args) == 0
    assert "steps: 1" in capsys.readouterr().out
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["train_step"] == "1"
    assert (tmp_path / "layers.optim.safetensors").exists()
