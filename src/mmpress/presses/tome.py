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

    Each round is official ToMe's (Sec. 3; ``tome/merge.py: bipartite_soft_matching`` with
    ``merge_wavg``): split the tokens alternately into A and B, match every A token to its most
    similar B token (cosine), merge the r = min(N - k, N // 2) best-matched A tokens into their B
    partners as size-weighted means (sizes add), and output the unmerged A tokens (descending
    edge score), then B -- the order the next round splits alternately. Rounds repeat until
    exactly k tokens remain. Each merged token takes the position of its destination (B) token
    (ToMe has no positions: a ViT adds them before merging).

    reorder: put the tokens back in position order after each round, so every split is
    spatially interleaved (an option; not the official order).

    Deviations: (1) the metric is the projected tokens themselves (inside a ViT ToMe uses each
    block's attention keys; pressed once before the LM there is no block, and repeated rounds on
    the same tokens stand in for ToMe's one round per layer); (2) ties between equal edge scores
    go to the lower A index (official ``argsort`` is unstable: unspecified); (3) no proportional
    attention (the LM runs unmodified, so the sizes are not used after merging).
    """

    reorder: bool = False

    name = "tome"
    paper = "Bolya et al., ICLR 2023, arXiv 2210.09461"

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        merged, _, position = merge_to(tokens, k, reorder=self.reorder)
        return merged, position
