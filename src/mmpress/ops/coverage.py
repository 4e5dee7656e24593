"""Greedy maximum coverage (MMTok's selection step).

``cover[m, r, j]`` says how well candidate j covers item r. The coverage of a set S is
f(S) = sum_r max(0, max_{j in S} cover[r, j]); f is monotone submodular, so adding at each step
the candidate of largest marginal gain is a (1 - 1/e)-approximation. A RUNNING max of each
item's coverage makes the gain of every candidate one clamp-and-sum: O(k R N) per image.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.ops.similarity import at_least_float32


def greedy_coverage(cover: Tensor, k: int) -> Tensor:
    """cover (M, R, N): R items to cover, N candidates -> (M, k) candidate indices in pick order.
    A picked candidate is masked out, so indices stay unique once every gain is 0; ties go to
    the lowest index."""
    m, _, n = cover.shape
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    cover = at_least_float32(cover)
    rows = torch.arange(m, device=cover.device)
    best = cover.new_zeros(m, cover.shape[1])  # coverage of each item by the picks so far
    taken = torch.zeros(m, n, dtype=torch.bool, device=cover.device)
    index = torch.empty(m, k, dtype=torch.long, device=cover.device)
    excess = torch.empty_like(cover)  # reused: one (M, R, N) buffer instead of one per step
    for i in range(k):
        gain = torch.sub(cover, best.unsqueeze(-1), out=excess).clamp_min_(0).sum(dim=1)  # (M, N)
        pick = gain.masked_fill(taken, -torch.inf).argmax(dim=-1)
        index[:, i] = pick
        taken[rows, pick] = True
        best = torch.maximum(best, cover[rows, :, pick])
    return index
