"""The downsampling baseline's size rule (``DownsamplePress.grid_for``) and interpolation
(``resize``): budgets, aspect ratio, units, frames, bad input; the interpolation against PIL's
bicubic, which VTC-Bench (arXiv 2510.07143) resizes with."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

import mmpress
from mmpress.presses.downsample import DownsamplePress
from mmpress.presses.spec import parse_press, press_spec


def test_registered_as_an_in_vision_resize_press():
    press = mmpress.get_press("downsample", keep=64)
    assert isinstance(press, DownsamplePress)
    assert (press.stage, press.mode) == ("in_vision", "resize")
    assert press_spec(parse_press("downsample:64")) == "downsample:64"


@pytest.mark.parametrize("keep, want", [(576, (24, 24)), (144, (12, 12)), (64, (8, 8)), (16, (4, 4)), (1, (1, 1))])
def test_llava_grid_at_square_budgets(keep, want):
    """LLaVA-1.5's 24 x 24 patches: a square budget is met exactly."""
    assert DownsamplePress(keep=keep).grid_for(24, 24) == want


@pytest.mark.parametrize("r", [2, 3, 4, 5, 10])
def test_vtc_bench_factors(r):
    """VTC-Bench's factor r on each side is keep_ratio = 1/r^2 (a 60 x 60 grid divides by each r)."""
    assert DownsamplePress(keep_ratio=1 / r**2).grid_for(60, 60) == (60 // r, 60 // r)


def test_qwen_units_and_frames():
    """Qwen-VL: a grid of whole 2 x 2 merge units; the budget counts merged tokens, over the frames."""
    press = DownsamplePress(keep=96)
    h2, w2 = press.grid_for(32, 48, unit=2)  # 16 x 24 = 384 tokens -> 96: 8 x 12
    assert (h2, w2) == (16, 24)
    assert press.grid_for(32, 48, unit=2, frames=4) == (8, 12)  # 4 frames x 4 x 6 = 96
    assert DownsamplePress(keep_ratio=0.25).grid_for(32, 48, unit=2, frames=4) == (16, 24)


def test_never_above_the_budget_nor_the_original_size():
    # 13 x 17 = 221 -> keep 50: s = 0.4756, sides 6.18 x 8.09: 6 x 8 = 48 (7 x 8 = 56 is over)
    assert DownsamplePress(keep=50).grid_for(13, 17) == (6, 8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert DownsamplePress(keep=1000).grid_for(13, 17) == (13, 17)
    assert DownsamplePress(keep_ratio=1.0).grid_for(14, 20, unit=2) == (14, 20)


def test_a_very_long_item_keeps_one_unit_across():
    assert DownsamplePress(keep=10).grid_for(1, 100) == (1, 10)
    assert DownsamplePress(keep=10).grid_for(200, 2, unit=2) == (20, 2)


@settings(max_examples=300, deadline=None)
@given(h=st.integers(1, 60), w=st.integers(1, 60), unit=st.sampled_from([1, 2]), frames=st.integers(1, 4),
       keep=st.integers(1, 4000))
def test_budget_aspect_and_units_hold(h, w, unit, frames, keep):
    h, w = h * unit, w * unit
    hu, wu = h // unit, w // unit
    n = frames * hu * wu
    if keep < frames:  # below one token per frame: refused
        with pytest.raises(ValueError, match="per frame"):
            DownsamplePress(keep=keep).grid_for(h, w, unit, frames)
        return
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        h2, w2 = DownsamplePress(keep=keep).grid_for(h, w, unit, frames)
    a, b = h2 // unit, w2 // unit
    assert h2 % unit == 0 and w2 % unit == 0 and 1 <= a <= hu and 1 <= b <= wu
    tokens = frames * a * b
    if keep >= n:
        assert (h2, w2) == (h, w)
        return
    assert tokens <= keep
    per = keep // frames
    s = math.sqrt(per / (hu * wu))
    if hu * s >= 1 and wu * s >= 1:
        # each side rounded from its exact scaled size: the aspect ratio is kept to within a unit
        assert abs(a - hu * s) < 1 and abs(b - wu * s) < 1
        # and no larger grid of those roundings fits
        assert all(x * y <= a * b or x * y > per
                   for x in (math.floor(hu * s), math.ceil(hu * s)) for y in (math.floor(wu * s), math.ceil(wu * s))
                   if 1 <= x <= hu and 1 <= y <= wu)


@pytest.mark.parametrize("args, match", [
    ((24.0, 24), "positive int"), ((0, 24), "positive int"), ((24, 24, 0), "positive int"),
    ((24, True), "positive int"), ((25, 24, 2), "whole number of 2 x 2 units"), ((24, 24, 1, 0), "positive int"),
])
def test_bad_grids_raise(args, match):
    with pytest.raises(ValueError, match=match):
        DownsamplePress(keep=16).grid_for(*args)


def test_bad_press_arguments_raise():
    with pytest.raises(ValueError, match="needs a budget"):
        DownsamplePress()
    with pytest.raises(ValueError, match="interpolation"):
        DownsamplePress(keep=4, interpolation="lanczos")
    with pytest.raises(ValueError, match="per frame"):
        DownsamplePress(keep=3).grid_for(8, 8, frames=4)
    with pytest.raises(ValueError, match=r"\(..., C, H, W\)"):
        DownsamplePress(keep=4).resize(torch.zeros(8, 8), (4, 4))
    with pytest.raises(ValueError, match="positive int"):
        DownsamplePress(keep=4).resize(torch.zeros(3, 8, 8), (0, 4))


def test_resize_matches_pil_bicubic():
    """VTC-Bench resizes with PIL's BICUBIC: the same filter (antialiased for a downscale) on
    float pixels, per channel, for the factors it uses and an uneven one."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(2, 3, 60, 84, generator=g, dtype=torch.float64) * 4 - 2  # normalised pixels
    press = DownsamplePress(keep=4)
    for size in [(30, 42), (20, 28), (12, 17), (7, 9)]:
        got = press.resize(pixels, size)
        assert got.shape == (2, 3, *size) and got.dtype == torch.float64
        want = torch.stack([torch.stack([
            torch.from_numpy(np.array(Image.fromarray(c.float().numpy(), mode="F").resize(size[::-1], Image.BICUBIC)))
            for c in img]) for img in pixels]).double()
        torch.testing.assert_close(got, want, atol=2e-3, rtol=0)
    assert press.resize(pixels, (60, 84)) is pixels
