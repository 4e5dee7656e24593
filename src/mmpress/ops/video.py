"""Video helpers: tokens (M, t*h*w, D) of M videos of one (t, h, w) grid, raster order over
(t, h, w), i.e. frame after frame, each frame an h x w raster. Pure tensor functions, batched over
the M videos, no loop over tokens or frames and no host sync (budgets are Python ints known from
the grid and k; everything data-dependent stays on the device).

- :func:`video_grid` resolves (t, h, w) from the context (an image is t = 1).
- :func:`frame_similarity`: cosine of every token with the SAME place in the previous frame
  (DyCoke / EVS / HoliTom's temporal redundancy).
- :func:`cut_segments`: DySeg-style temporal segmentation from frame-to-frame similarities.
- :func:`split_evenly`, :func:`row_rank`, :func:`first_true`: static budgets and sync-free
  top-k / compaction by ranks.
- :func:`merge_runs`: merge runs of consecutive tokens along a path into one (size-weighted sums).
- :func:`density_peak_score`: DPC-kNN score (density x distance to a denser token).
- :func:`frames_as_images` / :func:`frame_index_to_video`: run an image press frame by frame.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.similarity import at_least_float32


def video_grid(n: int, grid_thw: tuple[int, int, int] | None = None,
               grid: tuple[int, int] | None = None) -> tuple[int, int, int]:
    """(t, h, w) of n tokens: ``grid_thw`` when given, else the image grid ``grid`` as t = 1."""
    if grid_thw is not None:
        t, h, w = (int(v) for v in grid_thw)
    elif grid is not None:
        t, (h, w) = 1, grid
    else:
        raise ValueError("a video press needs the token grid: VisualContext.grid_thw (t, h, w) or grid (h, w)")
    if t * h * w != n:
        raise ValueError(f"grid (t, h, w) = {(t, h, w)} does not hold the {n} tokens")
    return t, h, w


def frame_similarity(tokens: Tensor, t: int) -> Tensor:
    """tokens (M, t*P, D) -> (M, t-1, P): cosine of token (f, p) with token (f-1, p), f >= 1,
    in float32 at least."""
    x = F.normalize(at_least_float32(tokens), dim=-1).unflatten(1, (t, -1))
    return (x[:, 1:] * x[:, :-1]).sum(dim=-1)


def split_evenly(total: int, parts: int, device=None) -> Tensor:
    """(parts,) long summing to ``total``: total // parts each, the first total % parts one more."""
    return total // parts + (torch.arange(parts, device=device) < total % parts).long()


def row_rank(score: Tensor, descending: bool = True) -> Tensor:
    """Rank of every entry in its row (last dim) under a STABLE sort: ties go to the lower index.
    ``row_rank(s) < k`` is the top-k mask, for a k that may differ per row (a tensor)."""
    order = score.argsort(dim=-1, descending=descending, stable=True)
    ranks = torch.arange(score.shape[-1], device=score.device).expand_as(order)
    return torch.empty_like(order).scatter_(-1, order, ranks)


def first_true(mask: Tensor, count: int) -> Tensor:
    """mask (M, L) bool with exactly ``count`` True per row -> (M, count) their indices,
    ascending (what ``mask.nonzero()`` gives per row, without the sync)."""
    return mask.to(torch.uint8).argsort(dim=-1, descending=True, stable=True)[:, :count]


def cut_segments(sim: Tensor, min_segments: int, tau: float) -> Tensor:
    """DySeg (FastVID Sec. 3.2): sim (M, t-1) transition similarity of frames f-1 -> f.
    A segment starts after each of the ``min_segments - 1`` lowest transitions and after every
    transition below ``tau``. Returns segment ids (M, t), 0-based, non-decreasing."""
    m = sim.shape[0]
    cut = (row_rank(sim, descending=False) < min_segments - 1) | (sim < tau)
    start = torch.cat([torch.ones(m, 1, dtype=torch.bool, device=sim.device), cut], dim=1)
    return start.long().cumsum(dim=1) - 1


def merge_runs(total: Tensor, size: Tensor, start: Tensor, groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Merge runs of a path: slot i opens a new run where ``start[:, i]``, else joins the run of
    slot i - 1. total (M, L, D) size-weighted sums, size (M, L), start (M, L) bool with exactly
    ``groups`` True per row (slot 0 True) -> summed total (M, G, D), size (M, G), and the first
    slot of each run (M, G)."""
    m, length = start.shape
    group = start.long().cumsum(dim=1) - 1
    out = total.new_zeros(m, groups, total.shape[-1]).scatter_add_(
        1, group.unsqueeze(-1).expand(-1, -1, total.shape[-1]), total)
    out_size = size.new_zeros(m, groups).scatter_add_(1, group, size)
    slots = torch.arange(length, device=start.device).expand(m, length)
    first = torch.full((m, groups), length, device=start.device).scatter_reduce(1, group, slots, "amin")
    return out, out_size, first


def density_peak_score(x: Tensor, valid: Tensor, k: int = 4) -> Tensor:
    """DPC-kNN score of every valid token (Du et al. 2016, as FastVID's DTM and HoliTom use it):
    x (B, L, D), valid (B, L) bool -> (B, L), -inf where invalid. With d = ||x_i - x_j|| / sqrt(D)
    among valid tokens: density rho_i = exp(-mean of the k smallest d_ij^2) (j = i included, as
    the official ``topk(largest=False)``); delta_i = min d_ij over tokens j denser than i (the
    densest: the largest d); score = rho * delta. Ties in density go to the lower index (the
    official code adds 1e-6 random noise instead)."""
    b, length, dim = x.shape
    x = at_least_float32(x)
    d = torch.cdist(x, x) / math.sqrt(dim)
    pair = valid.unsqueeze(2) & valid.unsqueeze(1)
    nearest = d.masked_fill(~pair, torch.inf).topk(min(k, length), dim=-1, largest=False).values
    finite = nearest.isfinite()
    density = torch.exp(-nearest.where(finite, 0.0).square().sum(-1) / finite.sum(-1).clamp_min(1))
    idx = torch.arange(length, device=x.device)
    rho_i, rho_j = density.unsqueeze(2), density.unsqueeze(1)
    denser = pair & ((rho_j > rho_i) | ((rho_j == rho_i) & (idx[None, :] < idx[:, None])))
    d_max = d.masked_fill(~pair, -torch.inf).flatten(1).amax(dim=1).view(b, 1, 1)
    delta = torch.where(denser, d, d_max).amin(dim=-1)
    return (delta * density).masked_fill(~valid, -torch.inf)


def frames_as_images(tokens: Tensor, t: int) -> Tensor:
    """(M, t*P, D) -> (M*t, P, D): every frame as an image, so an image press can run per frame
    (give it ``grid=(h, w)`` and a per-frame budget)."""
    m, n, d = tokens.shape
    return tokens.reshape(m * t, n // t, d)


def frame_index_to_video(index: Tensor, t: int, p: int) -> Tensor:
    """Per-frame indices (M*t, k_f) in [0, P) -> (M, t*k_f) indices into the video's t*P
    tokens, ascending when each frame's are."""
    mt, kf = index.shape
    offset = (torch.arange(t, device=index.device) * p).repeat(mt // t).unsqueeze(1)
    return (index + offset).reshape(mt // t, t * kf)
