"""Downsampling: the baseline every visual-token compression method must beat.

VTC-Bench (Liao et al., "Are We Using the Right Benchmark: An Evaluation Framework for Visual Token
Compression Methods", arXiv 2510.07143; github.com/Chenfei-Liao/VTC-Bench, ``qwen2_vl.py``) found
that simply shrinking the image before the model beats many compression methods on the usual
benchmarks. Their code resizes each image by one integer factor r on both sides,
``image.resize((w // r, h // r), Image.BICUBIC)``, and lets the processor round the result to
its patch grid (Qwen2-VL's ``smart_resize``: each side to the nearest multiple of 28 pixels, one
2 x 2 merge unit); they pair r = 2, 3, 4, 5, 10 with the token ratios 1/r^2 = 0.25, 0.111,
0.0625, 0.04, 0.01 of the methods they compare.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mmpress.presses.base import VisionPress, register

INTERPOLATIONS = ("bicubic", "bilinear", "area", "nearest")


def _positive_int(name: str, value) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


@register
@dataclass
class DownsamplePress(VisionPress):
    """Resizes every image (and every frame of a video) so that the vision tower emits about the
    budget: ``keep`` tokens per item as the language model sees them, or ``keep_ratio`` of them.
    The tower, the projector and the language model all run on the smaller input. Qwen-VL
    towers get fewer pixels (fewer patches); fixed-resolution towers (CLIP, SigLIP, DINOv2) get a
    smaller image with their position embeddings interpolated (the family's ``vision_hooks``).

    The size (``grid_for``), following VTC-Bench (arXiv 2510.07143): one scale factor s for both
    sides, so the aspect ratio is kept, s = sqrt(budget / tokens) (VTC-Bench's factor r = 1/s:
    ``keep_ratio=1/r**2`` is their r). Each side is then rounded to whole units (a unit: the
    tokens one language-model token stands for along a side, Qwen-VL's 2 x 2 merge window: 2),
    as the processor rounds VTC-Bench's pixels to the patch grid; of the floor / ceil roundings of
    the two sides, the largest grid not above the budget is taken (ties: the one nearest the
    aspect ratio), so the press never gives the language model more tokens than the budget (the
    processor's nearest rounding may: the one deviation from VTC-Bench's sizes, kept so that
    every comparison runs at most at its budget). A side never goes below one unit nor above its
    original size; an item whose short side would fall below one unit keeps one unit there and
    the budget along the other side. A video keeps its frames: the budget is spread over them.

    ``interpolation``: VTC-Bench's PIL ``Image.BICUBIC`` by default, which for a downscale widens
    its kernel over the source pixels (antialiasing): ``resize`` runs torch's bicubic with
    ``antialias=True``, the same filter, on the processor's normalised pixels (interpolation is
    linear, so resizing before or after the per-channel normalisation is the same, except for
    PIL's clipping and 8-bit rounding of the resized image)."""

    interpolation: str = "bicubic"

    name = "downsample"
    mode = "resize"
    paper = "downsampling baseline (VTC-Bench, arXiv 2510.07143)"

    def __post_init__(self):
        super().__post_init__()
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {self.interpolation!r}")

    def grid_for(self, h: int, w: int, unit: int = 1, frames: int = 1) -> tuple[int, int]:
        """The patch grid (h2, w2), multiples of ``unit``, to resize an item of ``frames`` frames of
        h x w patches to, so that the tower emits at most the budget of language-model tokens
        (``frames * h2 * w2 / unit**2``), as near it as the aspect ratio allows (see the class
        docstring). (h, w) itself when the budget keeps every token."""
        h, w, unit, frames = (_positive_int(n, v) for n, v in (("h", h), ("w", w), ("unit", unit), ("frames", frames)))
        if h % unit or w % unit:
            raise ValueError(f"a {h} x {w} patch grid is not a whole number of {unit} x {unit} units: pass the grid "
                             "the tower's patches form (e.g. Qwen-VL's grid_thw rows) and its merge size as unit")
        hu, wu = h // unit, w // unit
        n = frames * hu * wu
        k = self.budget(n)
        if k >= n:
            return h, w
        per = k // frames  # units per frame: no frame may exceed its share
        if per < 1:
            raise ValueError(f"a budget of {k} tokens is below one token per frame for a video of {frames} frames: "
                             f"pass keep >= {frames} (downsampling keeps every frame)")
        s = math.sqrt(per / (hu * wu))
        if hu * s < 1 or wu * s < 1:  # a very long item: one unit across, the rest of the budget along
            a, b = (1, min(wu, per)) if hu * s < 1 else (min(hu, per), 1)
            return a * unit, b * unit
        best = None
        for x in {math.floor(hu * s), math.ceil(hu * s)}:
            for y in {math.floor(wu * s), math.ceil(wu * s)}:
                a, b = min(max(x, 1), hu), min(max(y, 1), wu)
                if a * b <= per:
                    key = (-a * b, abs(math.log(a / b) - math.log(hu / wu)), -a)
                    best = min(best, (key, a, b)) if best is not None else (key, a, b)
        _, a, b = best  # floor x floor always fits: floor(hu s) floor(wu s) <= hu wu s^2 = per
        return a * unit, b * unit

    def resize(self, pixels: Tensor, size: tuple[int, int]) -> Tensor:
        """``pixels`` (..., C, H, W) resized to ``size`` (H2, W2) pixels with the press's
        interpolation (float math; the input's dtype comes back)."""
        if pixels.ndim < 3:
            raise ValueError(f"resize takes (..., C, H, W) pixels, got shape {tuple(pixels.shape)}")
        if len(size) != 2:
            raise ValueError(f"size is (height, width) in pixels, got {size!r}")
        h2, w2 = (_positive_int("size", v) for v in size)
        lead, (c, h, w) = pixels.shape[:-3], pixels.shape[-3:]
        if (h2, w2) == (h, w):
            return pixels
        x = pixels.reshape(-1, c, h, w).float()
        options = {"align_corners": False, "antialias": True} if self.interpolation in ("bicubic", "bilinear") else {}
        out = F.interpolate(x, size=(h2, w2), mode=self.interpolation, **options)
        return out.to(pixels.dtype).reshape(*lead, c, h2, w2)

