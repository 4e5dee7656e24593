"""SCOPE: "Saliency-Coverage Oriented Token Pruning for Efficient Multimodel LLMs"
(Deng et al., NeurIPS 2025, arXiv 2510.24214; official code kinredon/SCOPE)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.similarity import at_least_float32, cosine_similarity
from mmpress.presses.base import SelectorPress, VisualContext, register
from mmpress.presses.globalcom2 import anyres_layout, split_evenly


def scope_greedy(features: Tensor, saliency: Tensor, q: int, alpha: float = 1.0, combine: str = "multi") -> Tensor:
    """SCOPE's greedy selection on one sub-image: (M, n, d) features, (M, n) saliency -> (M, q)
    local indices in selection order.

    Coverage of a set S: sum_i max(0, max_{s in S} cos(i, s)) (facility location; official
    ``cur_max`` starts at 0, so negative similarities never count). Each step picks the unselected
    token j of highest SCOPE score ``gain_j * saliency_j ** alpha`` ("multi"; "add": ``gain_j +
    saliency_j ** alpha``), gain_j = sum_i max(0, cos(i, j) - cur_max_i) its coverage gain; the
    first maximum wins (official ``argmax``)."""
    m, n, _ = features.shape
    sim = cosine_similarity(features)  # (M, n, n), float32 at least
    power = at_least_float32(saliency).to(sim.dtype) ** alpha
    rows = torch.arange(m, device=features.device)
    cur = sim.new_zeros(m, n)
    taken = torch.zeros(m, n, dtype=torch.bool, device=features.device)
    picks = torch.empty(m, q, dtype=torch.long, device=features.device)
    for step in range(q):  # q argmax steps, each O(n^2) per image, all images at once
        gain = (sim - cur.unsqueeze(2)).clamp_min(0).sum(dim=1)
        gain = gain * power if combine == "multi" else gain + power
        best = gain.masked_fill(taken, -torch.inf).argmax(dim=1)
        taken.scatter_(1, best.unsqueeze(1), True)
        picks[:, step] = best
        cur = torch.maximum(cur, sim[rows, best])
    return picks


@register
@dataclass
class ScopePress(SelectorPress):
    """Saliency and coverage: greedy facility-location selection weighted by [CLS] attention.

    Official ``scope/clip_encoder.py`` (``CLIPVisionTower_SCOPE.forward`` and ``SCOPE``), per image
    the tower encodes (LLaVA-1.5: the image; LLaVA-NeXT: the base and each crop, each with budget
    int(R / B)): cosine similarities of the feature layer's patch features
    (``hidden_states[-2][:, 1:]``: ``ctx.vision_features``), saliency the [CLS] row of that layer's
    attention summed over heads (``attentions[-2]``; here ``ctx.cls_attn``, its head mean: the same
    argmax under "multi", a constant factor), then :func:`scope_greedy` for q steps. Defaults
    official: ``alpha = 1.0`` (env ``ALPHA``), ``combine = "multi"`` (env ``COMBINED``).

    AnyRes (``ctx.parts``, see :func:`~mmpress.presses.globalcom2.anyres_layout`): the base and each
    crop are selected apart, as official; the budget k is split evenly among them
    (:func:`~mmpress.presses.globalcom2.split_evenly`). Tiles without a crop grid (OneVision's
    shrunk raster) are one sub-image, and so is each part of other families (InternVL's,
    Idefics3's tiles and thumbnail): no official code there.

    Deviations, each forced: (1) Budget: exactly k per item (official: int(R / B) per sub-image,
    the remainder dropped): the remainder goes one token each to the first sub-images.
    (2) LLaVA-NeXT layout: official SCOPE restores the crops' kept tokens on the padded canvas
    without unpadding and drops the newline tokens (``restore_image_features_sorted_scope``); here
    the model's layout stays (unpadded tiles, newline tokens kept by the adapter), so a crop is its
    unpadded rectangle and its share is capped at its size (the excess goes to the others).
    (3) ``combine="add"`` adds the head-MEAN saliency (official: the head sum, H times larger), so
    it weighs saliency less than official; "multi" is exact. Similarities in float32 at least
    (official: fp16).
    """

    alpha: float = 1.0
    combine: str = "multi"

    name = "scope"
    paper = "Deng et al., NeurIPS 2025, arXiv 2510.24214"
    needs = ("cls_attn", "vision_features")

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or self.alpha < 0:
            raise ValueError(f"alpha must be a number >= 0 (the saliency exponent; official 1.0), got {self.alpha!r}")
        if self.combine not in ("multi", "add"):
            raise ValueError(f"combine must be 'multi' (official: gain x saliency^alpha) or 'add', "
                             f"got {self.combine!r}")

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        m, n, _ = tokens.shape
        features, saliency = ctx.require("vision_features"), ctx.require("cls_attn")
        layout = anyres_layout(ctx.parts, n, ctx.grid, self.name, features.device)
        quota = split_evenly(k, list(layout.sizes))
        picks = []
        for piece, q in zip(layout.pieces, quota):
            if q == 0:
                continue
            index = piece.index
            local = scope_greedy(features[:, index], saliency[:, index], q, self.alpha, self.combine)
            picks.append(index[local])
        return torch.cat(picks, dim=1)
