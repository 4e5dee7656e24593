"""Greedy max-min diversity selection (the Max-Min Diversity Problem, MMDP).

Pick S, |S| = k, maximising min_{i != j in S} d(i, j). The greedy 2-approximation adds, at each
step, the token farthest from everything picked so far. The N x N cosine distances are computed
once (DivPrune's first pick needs them all anyway); keeping a RUNNING minimum distance of every
token to S then makes a step one row gather, one ``minimum`` and one argmax: O(k N) per image,
instead of re-reducing the |S| x N block at every step as the reference implementation does.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.ops.similarity import cosine_distance


def farthest_nearest_neighbour(dist: Tensor) -> Tensor:
    """dist (M, N, N) pairwise distances -> (M,) index of the token whose nearest OTHER token is
    farthest: DivPrune's first pick (official ``DivPrune``: column-wise 2nd-smallest distance,
    then argmax)."""
    others = dist.diagonal_scatter(torch.full_like(dist[:, 0], torch.inf), dim1=-2, dim2=-1)
    return others.amin(dim=-1).argmax(dim=-1)


def max_min_diversity(tokens: Tensor, k: int, first: Tensor | None = None) -> Tensor:
    """Greedy MMDP on cosine distance 1 - cos. tokens (M, N, D) -> (M, k) indices in pick order.

    first: (M,) first pick; default :func:`farthest_nearest_neighbour` (DivPrune).
    Step i picks argmax_j min_{s in S} d(s, j); a picked token is masked out, so indices stay
    unique even when tokens repeat (every remaining distance 0). Ties go to the lowest index.
    """
    m, n, _ = tokens.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    dist = cosine_distance(tokens)  # (M, N, N), float32 at least
    rows = torch.arange(m, device=tokens.device)
    pick = farthest_nearest_neighbour(dist) if first is None else first
    index = torch.empty(m, k, dtype=torch.long, device=tokens.device)
    min_dist = torch.full((m, n), torch.inf, dtype=dist.dtype, device=tokens.device)
    for i in range(k):
        index[:, i] = pick
        min_dist = torch.minimum(min_dist, dist[rows, pick])  # distance of every token to S
        min_dist[rows, pick] = -torch.inf
        pick = min_dist.argmax(dim=-1)
    return index
