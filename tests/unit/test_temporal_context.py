"""Sliding context windows: coverage, blending, exactness for one window, named errors."""

from __future__ import annotations

import pytest
import torch

from compartments.temporal import WindowError, blend_weights, fuse, run_windowed, windows


def test_windows_cover_every_frame_with_overlap() -> None:
    w = windows(40, 16, 4)
    assert w[0][0] == 0 and w[-1][-1] == 39
    assert all(len(x) == 16 for x in w)
    assert set(i for x in w for i in x) == set(range(40))
    assert w[1][0] - w[0][0] == 12
    assert windows(16, 16, 4) == [list(range(16))]


def test_fuse_is_a_weighted_mean_and_single_window_is_exact() -> None:
    x = torch.randn(30, 3)
    for method in ("pyramid", "linear", "flat"):
        assert torch.allclose(run_windowed(lambda t: t * 2, x, 8, 3, method), x * 2, atol=1e-6)
    y = torch.randn(8, 3)
    assert torch.equal(run_windowed(lambda t: t + 1, y, 8, 2), y + 1)
    # different per-window values blend inside the overlap only
    idx = windows(12, 8, 4)
    out = fuse([torch.zeros(8, 1), torch.ones(8, 1)], idx, 12, "linear", 4)
    assert out[0].item() == 0.0 and out[-1].item() == 1.0
    assert 0.0 < out[5].item() < 1.0


def test_blend_weights_shapes() -> None:
    assert blend_weights(5, "pyramid") == [1, 2, 3, 2, 1]
    lin = blend_weights(8, "linear", overlap=2)
    assert lin[0] < lin[1] < 1.0 and lin[3] == 1.0 and lin[-1] < 1.0
    assert blend_weights(8, "linear", overlap=2, first=True)[0] == 1.0


@pytest.mark.parametrize(("frames", "length", "overlap", "word"), [
    (0, 16, 4, "frame count"), (16, 8, 8, "context_overlap"), (16, 8, 10, "context_overlap"),
    (6, 16, 4, "fewer than context_length"), (16, 0, 0, "context_length"),
])
def test_bad_windows_name_the_input(frames: int, length: int, overlap: int, word: str) -> None:
    with pytest.raises(WindowError, match=word):
        windows(frames, length, overlap)
