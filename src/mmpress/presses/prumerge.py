"""LLaVA-PruMerge(+): "Adaptive Token Reduction for Efficient Large Multimodal Models"
(Shang et al., arXiv 2024, arXiv 2403.15388; official code 42Shawn/LLaVA-PruMerge)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.pool import spaced_mask
from mmpress.ops.select import gather_tokens, topk_indices
from mmpress.ops.similarity import at_least_float32
from mmpress.presses.base import Press, VisualContext, register


def quartiles(x: Tensor) -> tuple[Tensor, Tensor]:
    """First and third quartiles of each row of x (M, N), (M, 1) each: ``torch.quantile``'s linear
    interpolation from one sort, without its host-side check of the quantile tensor (a sync on
    CUDA)."""
    s, last = x.sort(dim=1).values, x.shape[1] - 1

    def at(q: float) -> Tensor:
        pos = q * last
        lo = math.floor(pos)
        hi = min(lo + 1, last)
        return s[:, lo : lo + 1] + (pos - lo) * (s[:, hi : hi + 1] - s[:, lo : lo + 1])

    return at(0.25), at(0.75)


@register
@dataclass
class PruMergePress(Press):
    """Keeps the [CLS]-attention outliers (+ spatially spread tokens), then lets every kept
    token absorb its nearest neighbours.

    1. Prune (paper: adaptive important-token selection by IQR outlier detection; official
       ``outlier_dectection``): tokens whose [CLS] attention exceeds Q3 + 1.5 IQR of the
       image's attention values are kept first.
    2. Budget: PruMerge is adaptive (it keeps as many tokens as there are outliers); our budget
       is fixed. ``plus=True`` (PruMerge+, official ``token_prune_merge_advanced_plus``) fills
       the remaining slots with tokens evenly spaced in raster order among the non-outliers (the
       official code adds a fixed-stride raster sequence); ``plus=False`` fills them by
       attention. Either way, with more than k outliers the k of highest attention are kept.
    3. Merge (paper: token supplement by clustering on key similarity): each kept token i
       finds its ``neighbours`` most similar tokens among ALL others (cosine of the layer's
       keys) and becomes x_i + sum_j a_j x_j, a_j their [CLS] attention -- the official update
       (an un-normalised attention-weighted sum added to the token; official default 32).

    layers: the vision layer of the [CLS] attention, as a hidden-state index (the
    ``vision_feature_layer`` convention). Official: the last CLIP block, whose input is the
    feature layer -2, i.e. ``(-1,)``; None uses the feature layer's attention (``ctx.cls_attn``).

    Checked against official ``token_prune_merge_advanced_plus`` (tests/test_official_vision.py):
    the IQR outliers (numpy's linear percentiles), and, given the signals, the merge loop (32
    nearest by key cosine among all other tokens, ``topk`` ties as official, weights the [CLS]
    attention, no normalisation).

    Deviations forced by the fixed budget or the stage: the budget (step 2 above; official
    PruMerge+ appends ``arange(0, 575, step // 3)`` with step = 1 / outlier ratio, a budget of
    its own); quartiles per image (official: over the whole batch, one image); the official
    extra token (attention-weighted sum of all pruned tokens, appended with no position in the
    image) is not added: every kept token must take the position of an image token; we merge
    projector outputs (official: the tower's features before the projector).
    Not yet official (issue 16, left open): the attention is the head-averaged softmax [CLS] row
    the adapter computes (official: ONE softmax over the heads-concatenated q/k of the last block,
    scaled by C^-1/2 of the full width C), and the merge keys are the feature layer's, averaged
    over heads (official: the last block's, concatenated). Both need signals the adapters do not
    give yet.
    """

    plus: bool = True
    neighbours: int = 32
    layers: tuple[int, ...] | None = (-1,)

    name = "prumerge"
    paper = "Shang et al., arXiv 2024, arXiv 2403.15388"
    needs = ("cls_attn", "vision_keys")

    @property
    def vision_layers(self) -> tuple[int, ...]:
        return tuple(self.layers or ())

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        attn = ctx.require("cls_attn_layers").mean(dim=1) if self.layers else ctx.require("cls_attn")
        attn = at_least_float32(attn)  # float64 stays float64: ties are decided at full precision
        n = tokens.shape[1]
        q1, q3 = quartiles(attn)
        outlier = attn > q3 + 1.5 * (q3 - q1)
        if self.plus:
            fill = (k - outlier.sum(dim=1)).clamp_min(0)
            outlier = outlier | spaced_mask(~outlier, fill)
        index = topk_indices(attn + 2.0 * outlier, k)  # attention <= 1: kept tokens rank first

        keys = F.normalize(at_least_float32(ctx.require("vision_keys")), dim=-1)
        sim = gather_tokens(keys, index) @ keys.transpose(1, 2)  # (M, k, N)
        sim.scatter_(2, index.unsqueeze(-1), -torch.inf)  # a token is not its own neighbour
        near = sim.topk(min(self.neighbours, n - 1), dim=-1).indices  # (M, k, neighbours)
        weight = torch.zeros_like(sim).scatter_(2, near, attn.unsqueeze(1).expand_as(sim).gather(2, near))
        x = at_least_float32(tokens)
        return (gather_tokens(x, index) + weight @ x).to(tokens.dtype), index
