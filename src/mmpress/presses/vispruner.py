"""VisPruner: "Beyond Text-Visual Attention: Exploiting Visual Cues for Effective Token Pruning in
VLMs" (Zhang et al., ICCV 2025, arXiv 2412.01818; official code Theia-4869/VisPruner)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.similarity import at_least_float32, cosine_similarity
from mmpress.presses.base import SelectorPress, VisualContext, register


def remove_duplicates(sim: Tensor, candidates: Tensor, keep: int, per_round: int) -> Tensor:
    """VisPruner's diverse-token step: prune near-duplicates from ``candidates`` until ``keep`` remain.

    sim (M, N, N) cosine similarities, candidates (M, R) token indices -> (M, keep). Each round
    splits the current candidates alternately into A (even slots) and B (odd slots), scores every
    A token by its highest similarity to a B token, and drops the ``per_round`` A tokens of
    highest score (the most duplicated); the survivors are the rest of A by descending score,
    then B -- the official order, which decides the next round's split. Rounds shrink the set by at most
    ``per_round`` (official: 8) and never below ``keep``.
    """
    m, n, _ = sim.shape
    while candidates.shape[1] > keep:
        r = candidates.shape[1]
        a, b = candidates[:, ::2], candidates[:, 1::2]
        # official: r = min(8, R - keep); also at most |A| (the official code assumes R even)
        drop = min(per_round, r - keep, a.shape[1])
        pairs = (a.unsqueeze(-1) * n + b.unsqueeze(1)).flatten(1)  # flat (a, b) positions in sim
        duplication = sim.flatten(1).gather(1, pairs).view(m, a.shape[1], b.shape[1]).amax(dim=-1)
        distinct = duplication.argsort(dim=-1, descending=True, stable=True)[:, drop:]
        candidates = torch.cat([a.gather(1, distinct), b], dim=1)
    return candidates


@register
@dataclass
class VisPrunerPress(SelectorPress):
    """Important tokens by [CLS] attention, then diverse tokens among the rest.

    The paper's two steps, as official ``LlavaMetaForCausalLM.encode_images`` (``llava_arch.py``):
    1. Important tokens: T_imp = floor(k * important_ratio) tokens of highest [CLS] attention
       (the [CLS] row of the feature layer's attention, head-averaged: ``ctx.cls_attn``).
    2. Diverse tokens: the other N - T_imp tokens, in descending-attention order, lose their
       near-duplicates round by round (:func:`remove_duplicates`: bipartite A/B split, drop the
       ``per_round`` A tokens most similar to some B token) until k - T_imp remain. Similarity:
       cosine of the vision tower's features BEFORE the projector (official: ``image_features``
       of ``feature_select``, the feature layer's hidden states with [CLS] dropped;
       ``ctx.vision_features``).

    Defaults are the official ones: ``important_ratio=0.5`` (``--important_ratio`` default;
    the paper also reports 0.75 at 64 tokens), 8 tokens removed per round.
    ``similarity="projected"``: cosines of the projected tokens (the LM input) instead, the
    signal this press used before issue 16 -- an option, not the paper's.

    Qwen-VL (no official code: VisPruner ships LLaVA only): ``cls_attn`` is the adapter's
    no-[CLS] saliency (see ``models/qwen_vl.py``) and ``vision_features`` what the merger, Qwen's
    projector, receives for each token: its 2x2 patches of the last vision block, concatenated.

    Precision and ties (not forced, named): the similarities are computed in float32 at least
    (official: the tower's dtype, fp16 in its scripts; a half-precision cosine rounds near-
    duplicate scores together, so fp16 picks can differ from ours where scores tie after
    rounding). Ties in attention or duplication go to the lower index (stable sorts; official:
    ``argsort``, unstable, whose tie order is the device's). Batched over M images (official:
    the same, with one budget for the batch).
    """

    important_ratio: float = 0.5
    per_round: int = 8
    similarity: str = "vision"

    name = "vispruner"
    paper = "Zhang et al., ICCV 2025, arXiv 2412.01818"
    needs = ("cls_attn", "vision_features")

    def __post_init__(self):
        super().__post_init__()
        if not 0.0 <= self.important_ratio <= 1.0 or self.per_round < 1:
            raise ValueError("important_ratio must be in [0, 1] and per_round >= 1")
        if self.similarity not in ("vision", "projected"):
            raise ValueError(f"similarity must be 'vision' (official: the tower's features before the projector) or "
                             f"'projected' (the LM input tokens), got {self.similarity!r}")
        if self.similarity == "projected":
            self.needs = ("cls_attn",)  # the instance's signals: no tower features to record

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        important = int(k * self.important_ratio)
        order = at_least_float32(ctx.require("cls_attn")).argsort(dim=-1, descending=True, stable=True)
        if important == k:
            return order[:, :k]
        features = ctx.require("vision_features") if self.similarity == "vision" else tokens
        diverse = remove_duplicates(cosine_similarity(features), order[:, important:], k - important, self.per_round)
        return torch.cat([order[:, :important], diverse], dim=1)
