"""Static patches: merge units whose pixels repeat what the model has already seen are removed
before the vision tower (``in_vision``, mode "drop"), so the tower, the merger and the language
model all run on fewer tokens.

Prior work:

- PixelPrune (arXiv 2604.00886, github.com/OPPO-Mente-Lab/PixelPrune; vLLM PR #45106 for
  Qwen3-VL): removes, before the ViT, the merge units (the 2x2 patches a Qwen-VL merger turns into
  one token) that exactly repeat a neighbour: ``pixel_prune_threshold=0`` is a bit-exact match, a
  positive threshold an L-infinity tolerance on the pixel values. On screen2words (Qwen3-VL-2B) the
  exact match kept 51.7% of the input tokens and took vLLM from 7.92 to 12.67 requests/s.
  Its default selector (``methods/pred_2d.py``, LOCO-I predictive coding from JPEG-LS) predicts
  each unit of an image from its causal neighbours A (left), B (above), C (above-left): the
  prediction is B where C matches A but not B (a vertical edge), else A; unit (0, 0) is always
  kept, the first row predicts from the left, the first column from above; a unit equal to its
  prediction (max |difference| <= threshold) is dropped.
- RLT, run-length tokenization (Choudhury et al., NeurIPS 2024, github.com/rccchoudhury/rlt,
  ``src/models/static_token_utils.py: batched_find_idxs_to_keep``): a video tubelet is static when
  the mean (over the patch's pixels and channels) absolute difference between its last frame and
  the first frame of the tubelet one step earlier is at most ``threshold`` (2 on 0-255 pixels); the
  first step is always kept. RLT then encodes each run's length in the token; Qwen-VL has no such
  input, so only the removal is taken here.

This press, per item (``drop_plan``), on the pixel values of each merge unit (its
``spatial_merge_size**2`` patches, each ``temporal_patch_size`` frames, as the processor flattens
them):

- video (``t > 1`` temporal steps): a unit is dropped when it repeats the same unit one temporal
  step earlier: max |difference| over all of its pixel values (both frames of Qwen's temporal
  patch) <= ``tolerance``. The first temporal step is always kept. PixelPrune's L-infinity test,
  along time as RLT: RLT's mean over a patch would let one changed pixel pass; with the default
  ``tolerance=0`` both are the exact-copy test. A unit is compared with its predecessor's pixels,
  not with the last kept unit of its run (PixelPrune's "sliding" mode), so with a positive
  tolerance a slow drift can drop a run whose ends differ by more than the tolerance.
- image (``t == 1``): PixelPrune's LOCO-I rule above (``images="pred_2d"``, the default: flat
  backgrounds and screenshots repeat their neighbours), in its vectorised sliding form (the
  official code's path for an exact match; for a positive threshold its default "anchored" mode
  compares with reconstructed values in a Python loop over units: not offered). ``images="none"``
  keeps images whole.

``tolerance=-1`` keeps every unit (the unpressed model, bit for bit). The language model gets the
kept tokens with their original M-RoPE ids (the stage core). The family runs the tower on the kept
units only (``models/qwen_vl.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.presses.base import VisionPress, register

IMAGE_RULES = ("pred_2d", "none")


def _same(x: Tensor, y: Tensor, tolerance: float) -> Tensor:
    """PixelPrune's similarity: max |x - y| over the last dimension <= tolerance."""
    return (x - y).abs().amax(dim=-1) <= tolerance


def temporal_keep(units: Tensor, tolerance: float) -> Tensor:
    """(t, h, w, D) units of a video -> (t, h, w) kept: step 0, and every unit that differs from
    the same unit one step earlier by more than ``tolerance`` (max |difference|)."""
    keep = torch.ones(units.shape[:-1], dtype=torch.bool, device=units.device)
    if units.shape[0] > 1:
        keep[1:] = ~_same(units[1:], units[:-1], tolerance)
    return keep


def loco_keep(units: Tensor, tolerance: float) -> Tensor:
    """(h, w, D) units of an image -> (h, w) kept by PixelPrune's LOCO-I prediction (left A,
    above B, above-left C: predict B where C ~ A and not C ~ B, else A)."""
    h, w = units.shape[:2]
    keep = torch.ones(h, w, dtype=torch.bool, device=units.device)
    if w > 1:
        keep[0, 1:] = ~_same(units[0, 1:], units[0, :-1], tolerance)
    if h > 1:
        keep[1:, 0] = ~_same(units[1:, 0], units[:-1, 0], tolerance)
    if h > 1 and w > 1:
        a, b, c = units[1:, :-1], units[:-1, 1:], units[:-1, :-1]
        use_b = _same(c, a, tolerance) & ~_same(c, b, tolerance)
        keep[1:, 1:] = ~_same(units[1:, 1:], torch.where(use_b[..., None], b, a), tolerance)
    return keep


@register
@dataclass
class StaticPatchesPress(VisionPress):
    """Drops the merge units that repeat the previous temporal step (videos) or their causal
    neighbours (images, PixelPrune's LOCO-I), before the vision tower; see the module docstring.

    tolerance: max |pixel difference| for a repeat (0: exact copies, the default, PixelPrune's
               ``threshold=0``; -1: keep every unit). In the processor's normalised pixel units.
    images:    "pred_2d" (PixelPrune's image rule, default) or "none" (images kept whole).
    """

    tolerance: float = 0.0
    images: str = "pred_2d"

    name = "static_patches"
    paper = "PixelPrune (arXiv 2604.00886, vLLM PR #45106); RLT (Choudhury et al., NeurIPS 2024)"
    mode = "drop"
    needs_budget = False
    video = True

    def __post_init__(self):
        super().__post_init__()
        t = self.tolerance
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t >= 0 or t == -1):
            raise ValueError(f"tolerance must be a number >= 0 (max |pixel difference|; 0: exact copies) or -1 (keep "
                             f"every patch), got {t!r}")
        if self.images not in IMAGE_RULES:
            raise ValueError(f"images must be one of {IMAGE_RULES} (PixelPrune's rule, or images kept whole), "
                             f"got {self.images!r}")

    def drop_plan(self, units: Tensor, kind: str) -> Tensor:
        """(t, h, w, D) pixel values of one item's merge units (raster order) -> (t, h, w) bool,
        True where the unit is kept. ``kind``: "image" or "video"."""
        if units.ndim != 4:
            raise ValueError(f"drop_plan takes one item's (t, h, w, D) units, got shape {tuple(units.shape)}")
        if self.tolerance == -1:
            return torch.ones(units.shape[:-1], dtype=torch.bool, device=units.device)
        if units.shape[0] > 1:
            return temporal_keep(units, self.tolerance)
        if kind == "image" and self.images == "pred_2d":
            return loco_keep(units[0], self.tolerance)[None]
        return torch.ones(units.shape[:-1], dtype=torch.bool, device=units.device)
