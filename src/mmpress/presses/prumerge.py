"""LLaVA-PruMerge(+): "Adaptive Token Reduction for Efficient Large Multimodal Models"
(Shang et al., arXiv 2024, arXiv 2403.15388; official code 42Shawn/LLaVA-PruMerge)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.pool import spaced_mask
from mmpress.ops.select import gather_tokens, topk_indices
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

    0. Signals (official ``token_prune_merge_advanced(_plus)`` in ``clip_encoder.py``): forward
       hooks on ``layers[23].self_attn.q_proj`` / ``k_proj`` of CLIP-L (24 blocks: the LAST block,
       whose input is the feature layer -2, layer-normed by its ``layer_norm1``), i.e. the
       full-width q and k, heads concatenated, biases included; ``attn = softmax(q k^T * C^-1/2)``
       with C the feature width, ONE softmax over all tokens, [CLS] included; the [CLS] row over
       the patches is the attention, ``k[:, 1:]`` the merge keys. Here: ``cls_attn_concat`` and
       ``vision_keys_concat`` at the layer in ``layers`` (the adapter recomputes them from the
       block's attention input: no eager attention needed).
    1. Prune (paper: adaptive important-token selection by IQR outlier detection; official
       ``outlier_dectection``): tokens whose [CLS] attention exceeds Q3 + 1.5 IQR of the
       image's attention values are kept first.
    2. Budget: PruMerge is adaptive (it keeps as many tokens as there are outliers); our budget
       is fixed. ``plus=True`` (PruMerge+, official ``token_prune_merge_advanced_plus``) fills
       the remaining slots with tokens evenly spaced in raster order among the non-outliers (the
       official code adds a fixed-stride raster sequence); ``plus=False`` fills them by
       attention (official ``token_prune_merge_advanced`` at a fixed ratio: ``topk(cls_attn, k)``).
       Either way, with more than k outliers the k of highest attention are kept.
    3. Merge (paper: token supplement by clustering on key similarity): each kept token i
       finds its ``neighbours`` most similar tokens among ALL others (cosine of the keys) and
       becomes x_i + sum_j a_j x_j, a_j their [CLS] attention -- the official update (an
       un-normalised attention-weighted sum added to the token; official default 32).

    layers: the vision layer of the signals, as a hidden-state index (the ``vision_feature_layer``
    convention). Official: ``layers[23]``, the last CLIP block, i.e. ``(-1,)``; None: the feature
    layer's block. attention: "concat" (official, above) or "heads_mean" (an option, the earlier
    default: ``cls_attn`` -- each head's softmax with its own d^-1/2 scale, averaged over heads --
    of the listed layers, averaged over them, or the feature layer's with ``layers=None``; merge
    keys the feature layer's head-averaged ``vision_keys``).

    Checked against official code re-implemented in tests/test_official_vision.py, end to end on
    tiny LLaVA towers (CLIP, DINOv2) in float64: the signals (q / k from the last block's weights
    and its layer norm, one softmax scaled by C^-1/2), the selection (``topk`` of that attention;
    the IQR outliers, numpy's linear percentiles, always kept by PruMerge+) and the merge loop (32
    nearest by key cosine among all other tokens, ``topk`` ties as official, weights the [CLS]
    attention, no normalisation). Ties: ``topk`` as official, in at least float32 (float64 stays
    float64; official: the tower's fp16).

    Deviations, each forced by the fixed budget or the stage: the budget (step 2 above; official
    PruMerge+ appends ``arange(0, 575, step // 3)`` with step = 1 / outlier ratio, a budget of
    its own); quartiles per image (official: over the whole batch, one image); the official
    extra token (attention-weighted sum of all pruned tokens, appended with no position in the
    image) is not added: every kept token must take the position of an image token; we merge
    projector outputs (official: the tower's features before the projector; a pre-LLM press
    receives projected tokens). Qwen-VL (no [CLS]): ``cls_attn_concat`` is the attention each
    token receives in the same single-softmax form (see ``models/qwen_vl.py``), a substitute.
    """

    plus: bool = True
    neighbours: int = 32
    layers: tuple[int, ...] | None = (-1,)
    attention: str = "concat"

    name = "prumerge"
    paper = "Shang et al., arXiv 2024, arXiv 2403.15388"
    needs = ("cls_attn_concat", "vision_keys_concat")
    ATTENTIONS: ClassVar[tuple[str, ...]] = ("concat", "heads_mean")

    def __post_init__(self):
        super().__post_init__()
        if self.attention not in self.ATTENTIONS:
            raise ValueError(f"prumerge attention must be one of {self.ATTENTIONS} (official: 'concat'); "
                             f"got {self.attention!r}")
        if self.attention == "heads_mean":
            self.needs = ("cls_attn", "vision_keys")  # the instance's signals: the head-averaged ones
        elif self.layers is not None and len(self.layers) > 1:
            raise ValueError(f"prumerge attention='concat' reads one vision layer; got layers={self.layers!r}: pass "
                             "one, e.g. layers=(-1,) (official: the last block), or attention='heads_mean' to "
                             "average several")

    @property
    def vision_layers(self) -> tuple[int, ...]:
        return tuple(self.layers or ())

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        if self.attention == "concat":
            attn, keys = ctx.require("cls_attn_concat"), ctx.require("vision_keys_concat")
        else:
            attn = ctx.require("cls_attn_layers").mean(dim=1) if self.layers else ctx.require("cls_attn")
            keys = ctx.require("vision_keys")
        # one dtype, at least float32 (float64 stays float64: ties are decided at full precision)
        dtype = torch.promote_types(torch.promote_types(attn.dtype, keys.dtype),
                                    torch.promote_types(tokens.dtype, torch.float32))
        attn = attn.to(dtype)
        n = tokens.shape[1]
        q1, q3 = quartiles(attn)
        outlier = attn > q3 + 1.5 * (q3 - q1)
        if self.plus:
            fill = (k - outlier.sum(dim=1)).clamp_min(0)
            outlier = outlier | spaced_mask(~outlier, fill)
        index = topk_indices(attn + 2.0 * outlier, k)  # attention <= 1: kept tokens rank first

        keys = F.normalize(keys.to(dtype), dim=-1)
        sim = gather_tokens(keys, index) @ keys.transpose(1, 2)  # (M, k, N)
        sim.scatter_(2, index.unsqueeze(-1), -torch.inf)  # a token is not its own neighbour
        near = sim.topk(min(self.neighbours, n - 1), dim=-1).indices  # (M, k, neighbours)
        weight = torch.zeros_like(sim).scatter_(2, near, attn.unsqueeze(1).expand_as(sim).gather(2, near))
        x = tokens.to(dtype)
        return (gather_tokens(x, index) + weight @ x).to(tokens.dtype), index
