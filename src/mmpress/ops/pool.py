"""Spatially uniform reduction of a patch grid: average pooling and sampling to exactly k.

An (h, w) grid is cut into exactly k near-equal rectangular cells, for ANY k <= h*w (k need not be
a square or divide the grid): gh horizontal bands, gh ~ sqrt(k h / w) so cells are about square,
band b holding k // gh or k // gh + 1 cells that split its columns evenly. When k = (h/s)(w/s)
this is exactly ``avg_pool2d`` with stride s.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from mmpress.ops.similarity import at_least_float32


def grid_cells(grid: tuple[int, int], k: int, device=None) -> tuple[Tensor, Tensor]:
    """Cut the (h, w) raster grid into k cells. Returns cell (h*w,): the cell of every token,
    and centre (k,): the token at the middle of each cell (its representative)."""
    h, w = grid
    if not 1 <= k <= h * w:
        raise ValueError(f"k must be in [1, {h * w}], got {k}")
    # bands: enough that no band needs more cells than it has columns, never more than rows
    bands = min(max(round(math.sqrt(k * h / w)), math.ceil(k / w), 1), h, k)
    per_band = torch.full((bands,), k // bands, device=device)
    per_band[: k % bands] += 1
    first_cell = per_band.cumsum(0) - per_band
    r = torch.arange(h, device=device).repeat_interleave(w)
    c = torch.arange(w, device=device).repeat(h)
    band = r * bands // h
    cell = first_cell[band] + c * per_band[band] // w
    # middle of each (rectangular) cell: midpoint of its row span and of its column span
    span = {name: torch.stack([torch.full((k,), h * w, device=device).scatter_reduce(0, cell, v, "amin"),
                               torch.full((k,), -1, device=device).scatter_reduce(0, cell, v, "amax")])
            for name, v in (("row", r), ("col", c))}
    centre = span["row"].sum(0) // 2 * w + span["col"].sum(0) // 2
    return cell, centre


def grid_sample(grid: tuple[int, int], k: int, device=None) -> Tensor:
    """(k,) ascending indices of k spatially uniform tokens of an (h, w) raster grid."""
    return grid_cells(grid, k, device)[1].sort().values


def grid_pool(tokens: Tensor, grid: tuple[int, int], k: int) -> tuple[Tensor, Tensor]:
    """Average-pool tokens (M, h*w, D) over k uniform cells -> pooled (M, k, D) and the centre
    token (k,) of each cell."""
    m, n, d = tokens.shape
    if grid[0] * grid[1] != n:
        raise ValueError(f"grid {grid} does not hold the {n} tokens")
    cell, centre = grid_cells(grid, k, tokens.device)
    x = at_least_float32(tokens)
    total = x.new_zeros(m, k, d).index_add_(1, cell, x)
    count = total.new_zeros(k).index_add_(0, cell, total.new_ones(n))  # (bincount would sync on CUDA)
    return (total / count[:, None]).to(tokens.dtype), centre


def spaced_mask(candidates: Tensor, count: Tensor) -> Tensor:
    """Pick ``count[m]`` of the candidates of row m, evenly spaced in token order.

    candidates (M, N) bool, count (M,) long <= candidates per row -> (M, N) bool. Among R
    candidates the picks are those of rank floor(j R / count), j = 0..count-1, i.e. rank r is
    picked iff some j * R / count falls in [r, r + 1).
    """
    rank = candidates.long().cumsum(dim=1) - 1
    total = candidates.sum(dim=1, keepdim=True)
    count = count.unsqueeze(1)
    first_j = (rank * count + total - 1).div(total.clamp_min(1), rounding_mode="floor")  # ceil(r c / R)
    return candidates & (first_j * total < (rank + 1) * count)
