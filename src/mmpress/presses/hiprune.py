"""HiPrune: "Training-Free Visual Token Pruning via Hierarchical Attention in Vision-Language Models"
(Liu et al., arXiv 2508.00553; official code Danielement321/HiPrune)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.presses.base import SelectorPress, VisualContext, register
from mmpress.presses.globalcom2 import anyres_layout, split_evenly


def hiprune_piece(shallow: Tensor, deep: Tensor, width: int, q: int, alpha: float) -> Tensor:
    """HiPrune on one sub-image: (M, n) object-layer and output-layer attention, raster ``width``,
    q tokens -> (M, q) local indices (unsorted).

    Anchors: the t = round(q alpha / 5) tokens of highest object-layer attention; buffers: each
    anchor's flat neighbours i - 1, i + 1, i - width, i + width, clamped to [0, n - 1] (official:
    flat indices, so i +- 1 wraps to the next / previous row); registers: the q - |anchors u
    buffers| other tokens of highest output-layer attention. Ties: the lower index."""
    m, n = shallow.shape
    t = round(q * alpha / 5)  # Python's round, as official
    taken = torch.zeros(m, n, dtype=torch.bool, device=shallow.device)
    if t > 0:
        anchors = shallow.argsort(dim=1, descending=True, stable=True)[:, :t]
        near = torch.stack([anchors, anchors - 1, anchors + 1, anchors - width, anchors + width], dim=-1)
        near = near.flatten(1).clamp(0, n - 1)
        taken.scatter_(1, near, True)
    # official: deep - mask, then topk(q - |U|); attention < 1, so every anchor / buffer ranks first
    priority = torch.where(taken, torch.inf, deep.to(torch.promote_types(deep.dtype, torch.float32)))
    return priority.argsort(dim=1, descending=True, stable=True)[:, :q]


@register
@dataclass
class HiPrunePress(SelectorPress):
    """Anchor, buffer and register tokens from the vision tower's hierarchical attention.

    Official ``LLaVA/llava/model/llava_arch.py`` (``encode_images``), per image the tower encodes
    (LLaVA-1.5: the image; LLaVA-NeXT: the base and each crop, each with budget int(R / B)):
    1. Anchors: t = round(q alpha / 5) tokens of highest attention at the object layer
       (``HIPRUNE_OBJECT_LAYER`` = 9 of CLIP-L's 24 blocks: ``attentions[8]``, the block producing
       hidden state 9); alpha = 0.1 (``HIPRUNE_ALPHA``).
    2. Buffers: each anchor's neighbours i +- 1 and i +- W in the flat raster (W = 24: the grid's
       width), clamped to the image (:func:`hiprune_piece`).
    3. Registers: the remaining q - |anchors u buffers| tokens of highest attention at the output
       layer (``attentions[mm_vision_select_layer]``: the block feeding the projector).
    ``object_layer=None`` (default): 9 on a 24-block tower, round(9 L / 24) on one of L blocks
    (official Qwen2.5-VL: 16 of 32; pass ``object_layer=16``).

    AnyRes (``ctx.parts``, see :func:`~mmpress.presses.globalcom2.anyres_layout`): the base and each
    crop are pressed apart, each with its own raster, as the official code presses each image the
    tower encodes; the budget k is split evenly among them (:func:`split_evenly`). Tiles without a
    crop grid (OneVision's shrunk raster) are one sub-image, and so is each part of other families
    (InternVL's, Idefics3's tiles and thumbnail): no official code there.

    Deviations, each forced: (1) Signal: official scores are the attention each token RECEIVES,
    averaged over all queries ([CLS] included) and heads (``attn.mean(dim=1).mean(dim=1)[:, 1:]``;
    its [CLS]-row variant is commented out). No adapter gives received attention on a tower with
    [CLS], so the [CLS] row is read here (``cls_attn_layers`` at the object layer, ``cls_attn`` at
    the output layer) -- the official commented-out variant. Qwen-VL's ``cls_attn`` is already the
    received attention (official there). Proposed signal: ``attn_received`` (M, N) and
    ``attn_received_layers`` (M, L, N). (2) Budget: exactly k per item (official: int(R / B) per
    sub-image, the remainder dropped): the remainder goes one token each to the first sub-images.
    (3) LLaVA-NeXT layout: official HiPrune sets ``mm_patch_merge_type = 'spatial'`` (no unpadding,
    no newline tokens, a crop keeps tokens of its padding); here the model's layout stays (unpadded
    tiles, newline tokens kept by the adapter), so a crop is its unpadded rectangle with that
    rectangle's width for neighbours, and its share is capped at its size (the excess goes to the
    others). Ties: the lower index (official ``topk`` on the device).
    """

    alpha: float = 0.1
    object_layer: int | None = None

    name = "hiprune"
    paper = "Liu et al., arXiv 2508.00553"
    needs = ("cls_attn",)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not 0 <= self.alpha <= 1:
            raise ValueError(f"alpha must be in [0, 1] (the share of anchors and buffers; official 0.1), "
                             f"got {self.alpha!r}")
        if self.object_layer is not None and (isinstance(self.object_layer, bool)
                                              or not isinstance(self.object_layer, int) or self.object_layer < 1):
            raise ValueError(f"object_layer must be a vision hidden-state index >= 1 (official: 9 on CLIP-L) or "
                             f"None, got {self.object_layer!r}")

    @property
    def vision_layers(self) -> tuple[int, ...]:
        return (self.object_layer,) if self.object_layer is not None else (9,)

    def vision_layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The object layer on a tower of ``num_layers`` blocks (hidden-state index)."""
        if self.object_layer is not None:
            return (self.object_layer,)
        return (max(1, round(9 * num_layers / 24)),)

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        m, n, _ = tokens.shape
        shallow, deep = ctx.require("cls_attn_layers")[:, 0], ctx.require("cls_attn")
        layout = anyres_layout(ctx.parts, n, ctx.grid, self.name, deep.device)
        pieces = layout.pieces
        quota = split_evenly(k, list(layout.sizes))
        picks = []
        for piece, q in zip(pieces, quota):
            if q == 0:
                continue
            if piece.grid is None:
                raise ValueError(f"hiprune finds buffer tokens on the image's patch grid; this item's "
                                 f"{piece.role} tokens form no raster (ctx.grid / Part.grid)")
            if 5 * round(q * self.alpha / 5) > q:
                raise ValueError(f"hiprune alpha={self.alpha} gives anchors and buffers beyond a budget of {q} "
                                 "tokens: lower alpha or raise the budget")
            index = piece.index
            local = hiprune_piece(shallow[:, index], deep[:, index], piece.grid[1], q, self.alpha)
            picks.append(index[local])
        return torch.cat(picks, dim=1)
