"""VTC-CLS: "[CLS] Token Tells Everything Needed for Training-free Efficient MLLMs"
(Wang et al. 2024, arXiv 2412.05819; official code THU-MIG/VTC-CLS)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmpress.presses.base import ScorerPress, VisualContext, register


@register
@dataclass
class VTCCLSPress(ScorerPress):
    """Keeps the k patch tokens the vision tower's [CLS] query attends to most.

    Score: the [CLS] row of the softmax attention, averaged over heads (official
    ``CLIPVisionTower.cls_token_only``, then ``topk`` in ``LlavaMetaForCausalLM.encode_images``),
    taken in the layer whose output feeds the projector (``vision_feature_layer``, -2 for
    LLaVA-1.5: official ``attentions[-2]``).

    layers: the paper's ensemble. None scores with that one layer; a tuple of hidden-state
    indices (the ``vision_feature_layer`` convention: i = output of block i-1, negatives count
    from the end) sums the [CLS] attention of those layers. The official ``--layer s`` sums
    blocks s .. L-2, i.e. ``layers=tuple(range(s + 1, L))`` for an L-block tower (CLIP-L: L=24).
    The adapter computes ``ctx.cls_attn_layers`` for the layers named here.

    Deviation: one top-k per image over a batch of M images (official: batch size 1).
    """

    layers: tuple[int, ...] | None = None

    name = "vtc_cls"
    paper = "Wang et al., arXiv 2024, arXiv 2412.05819"
    needs = ("cls_attn",)

    @property
    def vision_layers(self) -> tuple[int, ...]:
        return tuple(self.layers or ())

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        if self.layers:
            return ctx.require("cls_attn_layers").sum(dim=1)  # (M, L, N) -> (M, N)
        return ctx.require("cls_attn")
