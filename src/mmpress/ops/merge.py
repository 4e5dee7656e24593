"""Token merging by bipartite soft matching (ToMe, Bolya et al., ICLR 2023, arXiv 2210.09461).

One round (ToMe Sec. 3, "bipartite soft matching"): split the tokens alternately into A (even)
and B (odd); each A token proposes an edge to its most similar B token (cosine); the r A tokens
with the strongest edges are merged into their B partner, the others stay. Merged tokens are
SIZE-weighted means (ToMe's ``merge_wavg``) and sizes add, so a token that already stands for
several patches counts for them all. One round removes at most half the tokens; rounds repeat
until exactly k remain. Every token keeps the original position of the B token it ended in.

Token order between rounds is the official one by default: a round outputs the unmerged A tokens
in descending order of their best edge, then the B tokens (``torch.cat([unm, dst])`` in ToMe's
``merge``), and the next round splits that sequence alternately. ``reorder=True`` puts the tokens
back in position order after each round instead (a spatially interleaved split every round).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.similarity import at_least_float32


def _rows(t: Tensor, index: Tensor) -> Tensor:
    """Gather rows: t (M, N, C), index (M, k) -> (M, k, C)."""
    return t.gather(1, index.unsqueeze(-1).expand(-1, -1, t.shape[-1]))


def bipartite_merge(x: Tensor, size: Tensor, pos: Tensor, r: int,
                    reorder: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """One round merging r tokens away. x (M, N, D) float32+, size (M, N), pos (M, N) original
    positions -> the same three with N - r tokens: the unmerged A tokens (by descending edge
    score, ties to the lower A index; official ``argsort`` is unstable there), then B, as ToMe
    orders them; in position order with ``reorder``."""
    unit = F.normalize(x, dim=-1)
    score, partner = (unit[:, ::2] @ unit[:, 1::2].transpose(1, 2)).max(dim=-1)  # best B for each A
    order = score.argsort(dim=-1, descending=True, stable=True)
    src, keep = order[:, :r], order[:, r:]  # A tokens merged away / A tokens kept
    dst = partner.gather(1, src)

    def combine(t: Tensor) -> Tensor:  # sum the merged A rows into their B rows, drop them from A
        a, b = t[:, ::2], t[:, 1::2]
        b = b.scatter_reduce(1, dst.unsqueeze(-1).expand(-1, -1, t.shape[-1]), _rows(a, src), reduce="sum")
        return torch.cat([_rows(a, keep), b], dim=1)

    total = combine(x * size.unsqueeze(-1))
    size = combine(size.unsqueeze(-1)).squeeze(-1)
    pos = torch.cat([pos[:, ::2].gather(1, keep), pos[:, 1::2]], dim=1)
    x = total / size.unsqueeze(-1)
    if not reorder:
        return x, size, pos
    order = pos.argsort(dim=-1)
    return _rows(x, order), size.gather(1, order), pos.gather(1, order)


def merge_to(tokens: Tensor, k: int, reorder: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Repeated bipartite soft matching down to exactly k tokens (``reorder``: position order
    between rounds; default the official order). tokens (M, N, D) -> merged (M, k, D) in the
    input dtype, size (M, k) patches per token (sums to N), position (M, k) original index of
    each token's destination, ascending."""
    m, n, _ = tokens.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    x = at_least_float32(tokens)
    size = x.new_ones(m, n)
    pos = torch.arange(n, device=x.device).expand(m, n)
    while x.shape[1] > k:
        x, size, pos = bipartite_merge(x, size, pos, min(x.shape[1] - k, x.shape[1] // 2), reorder)
    order = pos.argsort(dim=-1)
    return _rows(x, order).to(tokens.dtype), size.gather(1, order), pos.gather(1, order)
