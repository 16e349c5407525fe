"""Tier 1: frame reading for temporal training, and the command's argument checks (no ComfyUI)."""

from __future__ import annotations

import sys

import pytest
import torch

from compartments.cli import main
from compartments.temporal.data import (
    FramesError,
    crop_to_multiple,
    images_to_tensor,
    load_frames,
    moving_square,
    save_frames,
)


def test_moving_square_moves_and_is_deterministic():
    a, b = moving_square(8, 64), moving_square(8, 64)
    ta, tb = images_to_tensor(a), images_to_tensor(b)
    assert ta.shape == (8, 64, 64, 3) and torch.equal(ta, tb)
    assert not torch.equal(ta[0], ta[-1])
    # the yellow square's column centre moves right frame by frame
    cols = [float((t[..., 2] < 0.3).float().nonzero()[:, 1].float().mean()) for t in ta]
    assert all(x < y for x, y in zip(cols, cols[1:], strict=False))


def test_folder_is_read_in_natural_order(tmp_path):
    frames = moving_square(11, 32, 8)
    for i, im in enumerate(frames):  # unpadded names: frame10 must come after frame9
        im.save(tmp_path / f"frame{i}.png")
    loaded = load_frames(tmp_path)
    assert torch.equal(loaded, images_to_tensor(frames))
    assert load_frames(tmp_path, max_frames=4, stride=2).shape[0] == 4


def test_animated_webp_and_gif(tmp_path):
    frames = moving_square(6, 32, 8)
    webp = tmp_path / "clip.webp"
    frames[0].save(webp, save_all=True, append_images=frames[1:], lossless=True, duration=100)
    assert torch.equal(load_frames(webp), images_to_tensor(frames))
    gif = tmp_path / "clip.gif"
    frames[0].save(gif, save_all=True, append_images=frames[1:], duration=100)
    assert load_frames(gif).shape == (6, 32, 32, 3)


def test_bad_inputs_are_named(tmp_path):
    with pytest.raises(FramesError, match="no image files"):
        load_frames(tmp_path)
    frames = moving_square(2, 32, 8)
    save_frames([frames[0], frames[1].resize((40, 32))], tmp_path)
    with pytest.raises(FramesError, match="width and height"):
        load_frames(tmp_path)
    assert load_frames(tmp_path, size=(24, 16)).shape == (2, 16, 24, 3)
    assert crop_to_multiple(torch.zeros(1, 30, 21, 3)).shape == (1, 24, 16, 3)


def test_command_checks_arguments_before_importing_comfyui(tmp_path, capsys):
    host = ("comfy", "folder_paths")
    before = {m for m in sys.modules if m.split(".")[0] in host}  # other tiers may share this process
    save_frames(moving_square(3, 32, 8), tmp_path / "f")
    ckpt = tmp_path / "model.safetensors"
    ckpt.write_bytes(b"")
    code = main(["train-temporal", "--checkpoint", str(ckpt), "--frames", str(tmp_path / "f"),
                 "--out", str(tmp_path / "o.safetensors"), "--frames-per-clip", "8"])
    assert code == 2 and "fewer than --frames-per-clip" in capsys.readouterr().err
    code = main(["train-temporal", "--checkpoint", str(ckpt), "--frames", str(tmp_path / "f"),
                 "--out", str(tmp_path / "o.ckpt")])
    assert code == 2 and "must end in .safetensors" in capsys.readouterr().err
    assert {m for m in sys.modules if m.split(".")[0] in host} == before
