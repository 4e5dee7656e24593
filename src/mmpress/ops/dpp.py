"""Greedy MAP inference for a determinantal point process (DPP), batched over M kernels.

A DPP with a positive semi-definite kernel L (N x N) scores a subset S by det(L_S): items of large
L_ii ("quality") that are unlike each other (small L_ij) together. Finding the best S of size k
is NP-hard; the greedy algorithm adds, at each step, the item j of largest gain

    log det(L_{S + j}) - log det(L_S) = log d_j^2,    d_j^2 = L_jj - L_jS L_S^-1 L_Sj,

the squared residual of item j once the picked items are projected out (a Schur complement).

Fast greedy MAP (Chen, Zhang & Zhou, "Fast Greedy MAP Inference for Determinantal Point Process
to Improve Recommendation Diversity", NeurIPS 2018, Algorithm 1; the code CDPruner follows) keeps
every d_i^2 and the rows c_i of an incremental Cholesky factor of L_S up to date: when j joins S,

    e_i = (L_ji - <c_j, c_i>) / d_j,    c_i <- [c_i, e_i],    d_i^2 <- d_i^2 - e_i^2,

one (M, |S|) x (M, |S|, N) product per step: O(N k^2) per kernel for k picks, instead of one
log-det per candidate per step.

On CUDA the k steps run inside one Triton program per image (``ops.triton_greedy.greedy_dpp``);
the PyTorch loop :func:`greedy_dpp_map_torch` is the reference and the CPU path.
"""

from __future__ import annotations

import torch
from torch import Tensor

from mmpress.ops import triton_greedy
from mmpress.ops.similarity import at_least_float32


def greedy_dpp_map(kernel: Tensor, k: int, eps: float = 1e-10) -> Tensor:
    """kernel (M, N, N) symmetric PSD -> (M, k) indices in pick order (Chen et al. Algorithm 1).

    Step 1 picks argmax_i L_ii; each later step the item of largest residual d_i^2, i.e. of
    largest log-det gain. Ties go to the lowest index. A picked item is masked out, so the k
    indices are unique even for a rank-deficient kernel.

    eps: once the best residual is d^2 <= eps, every remaining item lies in the span of the
    picked ones (rank exhausted, every gain is log 0). Fast-map-dpp stops there and the official
    CDPruner loop divides by sqrt(d^2 <= 0) (NaN); we must return k items, so such a step adds
    its pick without updating the factor, and the remaining picks follow the residuals d^2 as
    they stood. Math in float32 at least. A CUDA float32 kernel runs the Triton kernel (the same
    picks up to float near-ties), anything else :func:`greedy_dpp_map_torch`.
    """
    n = kernel.shape[-1]
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, {n}], got {k}")
    kernel = at_least_float32(kernel.detach())  # indices carry no gradient (the loop runs in place)
    if triton_greedy.use_triton(kernel) and triton_greedy.fits(kernel):
        return triton_greedy.greedy_dpp(kernel, k, eps)
    return greedy_dpp_map_torch(kernel, k, eps)


def greedy_dpp_map_torch(kernel: Tensor, k: int, eps: float = 1e-10) -> Tensor:
    """The greedy's k steps in PyTorch (reference, CPU path): only device ops in the loop (no
    host sync), so on a GPU it never waits for the host."""
    m, n, _ = kernel.shape
    d2 = kernel.diagonal(dim1=1, dim2=2).clone()  # (M, N) residual of every item given S
    factor = kernel.new_zeros(m, k, n)  # row i: e of the i-th pick for every item (c_i = factor[:, :, i])
    picks = []
    for i in range(k):
        d2_pick, pick = d2.max(dim=-1, keepdim=True)  # (M, 1): the largest gain, first on ties
        picks.append(pick)
        row = kernel.gather(1, pick.unsqueeze(-1).expand(m, 1, n))  # L_j. (M, 1, N)
        c_pick = factor[:, :i].gather(2, pick.unsqueeze(1).expand(m, i, 1))  # c_j (M, i, 1)
        residual = torch.baddbmm(row, c_pick.transpose(1, 2), factor[:, :i], alpha=-1).squeeze(1)
        scale = torch.where(d2_pick > eps, d2_pick.clamp_min(eps).rsqrt(), 0.0)  # 1 / d_j, or 0
        e = torch.mul(residual, scale, out=factor[:, i])
        d2.addcmul_(e, e, value=-1)
        d2.scatter_(1, pick, -torch.inf)
    return torch.cat(picks, dim=1)
