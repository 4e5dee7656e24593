"""Greedy max-min diversity selection (the Max-Min Diversity Problem, MMDP).

Pick S, |S| = k, maximising min_{i != j in S} d(i, j). The greedy 2-approximation adds, at each
step, the token farthest from everything picked so far. The N x N cosine distances are computed
once (DivPrune's first pick needs them all anyway); keeping a RUNNING minimum distance of every
token to S then makes a step one row gather, one ``minimum`` and one argmax: O(k N) per image,
instead of re-reducing the |S| x N block at every step as the reference implementation does.

On CUDA the k steps run inside one Triton program per image (``ops.triton_greedy``); the PyTorch
loop :func:`greedy_max_min` is the reference and the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.ops import triton_greedy
from mmpress.ops.similarity import cosine_distance


def farthest_nearest_neighbour(dist: Tensor) -> Tensor:
    """dist (M, N, N) pairwise distances -> (M,) index of the token whose nearest OTHER token is
    farthest: DivPrune's first pick (official ``DivPrune``: column-wise 2nd-smallest distance,
    then argmax)."""
    others = dist.diagonal_scatter(torch.full_like(dist[:, 0], torch.inf), dim1=-2, dim2=-1)
    return others.amin(dim=-1).argmax(dim=-1)


def greedy_max_min(dist: Tensor, k: int, first: Tensor) -> Tensor:
    """The greedy's steps 2..k on precomputed distances, in PyTorch (reference, CPU path).
    dist (M, N, N), first (M,) -> (M, k) indices in pick order.

    Only device ops inside the loop (no ``.item()``, no host scalar copied to the device), so on
    a GPU the loop never waits for the host and can be captured in a CUDA graph."""
    m, n, _ = dist.shape
    min_dist = torch.full((m, n), torch.inf, dtype=dist.dtype, device=dist.device)
    index = torch.empty(m, k, dtype=torch.long, device=dist.device)
    pick = first.to(device=dist.device, dtype=torch.long).unsqueeze(-1)  # (M, 1)
    for i in range(k):
        index[:, i : i + 1] = pick
        row = dist.gather(1, pick.unsqueeze(-1).expand(m, 1, n)).squeeze(1)  # d(pick, .)
        torch.minimum(min_dist, row, out=min_dist)  # distance of every token to S
        min_dist.scatter_(1, pick, -torch.inf)  # picked: never again, even when all ties are 0
        pick = min_dist.argmax(dim=-1, keepdim=True)
    return index


def max_min_diversity(tokens: Tensor, k: int, first: Tensor | None = None) -> Tensor:
    """Greedy MMDP on cosine distance 1 - cos. tokens (M, N, D) -> (M, k) indices in pick order.

    first: (M,) first pick; default :func:`farthest_nearest_neighbour` (DivPrune).
    Step i picks argmax_j min_{s in S} d(s, j); a picked token is masked out, so indices stay
    unique even when tokens repeat (every remaining distance 0). Ties go to the lowest index.
    CUDA float32 distances run the Triton kernel (same picks), anything else the PyTorch loop.
    """
    n = tokens.shape[1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    # indices carry no gradient: select on detached values (the in-place loop cannot run under
    # autograd, and a k-step graph would only cost memory); the kept tokens keep theirs
    dist = cosine_distance(tokens.detach())  # (M, N, N), float32 at least
    first = farthest_nearest_neighbour(dist) if first is None else first
    if triton_greedy.use_triton(dist):
        return triton_greedy.max_min(dist, first, k)
    return greedy_max_min(dist, k, first)
