"""ToMe: "Token Merging: Your ViT But Faster" (Bolya et al., ICLR 2023, arXiv 2210.09461;
official code facebookresearch/ToMe), applied once to the visual tokens before the LM as the
VLM token-merging baselines do (e.g. CrossGET, Shi et al., ICML 2024, arXiv 2305.17455)."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from mmpress.ops.merge import merge_to
from mmpress.presses.base import Press, VisualContext, register


@register
@dataclass
class ToMePress(Press):
    """Merges visual tokens by bipartite soft matching until k remain (``ops.merge``).

    Each round (ToMe Sec. 3, official ``tome/merge.py: bipartite_soft_matching``) splits the
    tokens alternately into A and B, matches every A token to its most similar B token (cosine)
    and merges the r best-matched pairs, r <= half; merged tokens are size-weighted means
    (official ``merge_wavg``). Rounds repeat until exactly k tokens remain. Each merged token
    takes the position of its destination (B) token.

    Deviations: the similarity metric is the projected tokens themselves (inside a ViT ToMe uses
    the attention keys of each layer; here there is no next layer); tokens are put back in
    position order after each round so the alternating split stays spatially interleaved
    (official: unmerged A tokens first, then B); no proportional attention (the LM runs
    unmodified, so the sizes are not used after merging).
    """

    name = "tome"
    paper = "Bolya et al., ICLR 2023, arXiv 2210.09461"

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        merged, _, position = merge_to(tokens, k)
        return merged, position
