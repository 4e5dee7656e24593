"""Greedy maximum coverage (MMTok's selection step).

``cover[m, r, j]`` says how well candidate j covers item r. The coverage of a set S is
f(S) = sum_r max(0, max_{j in S} cover[r, j]); f is monotone submodular, so adding at each step
the candidate of largest marginal gain is a (1 - 1/e)-approximation. A RUNNING max of each
item's coverage makes the gain of every candidate one clamp-and-sum: O(k R N) per image.

On CUDA the k steps run inside one Triton program per image (``ops.triton_greedy``), which also
updates the gains only on the items the last pick covers better; the PyTorch loop
:func:`greedy_coverage_torch` is the reference and the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.ops import triton_greedy
from mmpress.ops.similarity import at_least_float32


def greedy_coverage_torch(cover: Tensor, k: int) -> Tensor:
    """The greedy in PyTorch (reference, CPU path): cover (M, R, N) float -> (M, k) indices.

    Only device ops inside the loop (no ``.item()``, no host scalar copied to the device), so on
    a GPU the loop never waits for the host and can be captured in a CUDA graph."""
    m, r, n = cover.shape
    best = cover.new_zeros(m, r, 1)  # coverage of each item by the picks so far
    taken = torch.zeros(m, n, dtype=torch.bool, device=cover.device)
    index = torch.empty(m, k, dtype=torch.long, device=cover.device)
    excess = torch.empty_like(cover)  # reused: one (M, R, N) buffer instead of one per step
    for i in range(k):
        gain = torch.sub(cover, best, out=excess).clamp_min_(0).sum(dim=1)  # (M, N)
        pick = gain.masked_fill_(taken, -torch.inf).argmax(dim=-1, keepdim=True)  # (M, 1)
        index[:, i : i + 1] = pick
        taken.scatter_(1, pick, True)
        picked = cover.gather(2, pick.unsqueeze(1).expand(m, r, 1))  # cover[:, :, pick]
        torch.maximum(best, picked, out=best)
    return index


def greedy_coverage(cover: Tensor, k: int) -> Tensor:
    """cover (M, R, N): R items to cover, N candidates -> (M, k) candidate indices in pick order.
    A picked candidate is masked out, so indices stay unique once every gain is 0; ties go to
    the lowest index. CUDA float32 input (N <= ``triton_greedy.MAX_BLOCK_N``) runs the Triton
    kernel, anything else the PyTorch loop."""
    n = cover.shape[2]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    cover = at_least_float32(cover.detach())  # indices carry no gradient (the loop runs in place)
    if triton_greedy.use_triton(cover) and triton_greedy.fits(cover):
        return triton_greedy.greedy_coverage(cover, k)
    return greedy_coverage_torch(cover, k)
