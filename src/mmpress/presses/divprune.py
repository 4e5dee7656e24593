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
    (``LLaVA/llava/model/llava_arch.py``) reads from the LM input embeddings. First pick: the
    token whose nearest neighbour is farthest (official: column-wise second-smallest distance,
    the smallest being the token itself, then argmax); then repeatedly the token farthest from
    the picked set (argmax of the min distance to it). Ties go to the lower index, as the
    official ``torch.argmax``. Tested against a re-implementation of the official loop
    (tests/test_official_pre.py).

    Deviations, none changing the picks while k stays below the number of distinct tokens:
    (1) a picked token is masked out (official: it scores its self-distance ~0, so once every
    remaining token duplicates a picked one it may be picked twice and enter the sequence twice);
    the first pick excludes the diagonal (official: 2nd-smallest, the same unless a duplicate's
    distance rounds below the self-distance); (2) distances in float32 at least (official: the
    model dtype, fp16); (3) a running minimum makes the greedy O(k N) per image (official: min
    over the |S| x N block each step), batched over M images (official: batch 1, the image at a
    hard-coded offset 35); (4) ``keep_ratio`` gives ceil(ratio N) tokens, as for every press
    (official ``SUBSET_RATIO``: round(ratio N)): pass ``keep=`` for an exact count.
    Positions: official LLaVA drops the tokens from the input embeddings and lets the LM number
    the shorter sequence 0..L'-1: the default on 1-D RoPE families (``official_positions``);
    ``press(model, positions="keep")`` keeps the original ids instead.
    """

    name = "divprune"
    paper = "Alvar et al., CVPR 2025, arXiv 2503.02175"

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        return max_min_diversity(tokens, k)
