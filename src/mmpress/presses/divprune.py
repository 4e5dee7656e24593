"""DivPrune: "Diversity-based Visual Token Pruning for Large Multimodal Models"
(Alvar et al., CVPR 2025, arXiv 2503.02175; official code vbdi/divprune)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmpress.ops.diversity import max_min_diversity
from mmpress.presses.base import SelectorPress, VisualContext, register


@register
@dataclass
class DivPrunePress(SelectorPress):
    """Keeps the k most mutually diverse tokens: the paper's Max-Min Diversity Problem (maximise
    the smallest pairwise distance among the kept tokens) solved by its greedy algorithm, on
    cosine distance 1 - cos of the projected visual tokens -- the tokens official ``DivPrune``
    (``LLaVA/llava/model/llava_arch.py``) reads from the LM input embeddings. First pick: the token whose nearest neighbour is farthest (official: column-wise
    second-smallest distance, argmax); then repeatedly the token farthest from the picked set.

    Deviations: a running minimum makes the greedy O(k N) per image (official: min over the
    |S| x N block at each step, O(k^2 N)), batched over M images (official: batch 1, image at a
    hard-coded offset 35). Same picks up to floating-point ties.
    """

    name = "divprune"
    paper = "Alvar et al., CVPR 2025, arXiv 2503.02175"

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        return max_min_diversity(tokens, k)
