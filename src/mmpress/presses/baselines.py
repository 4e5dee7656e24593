"""Baselines every compression method must beat: keep all, random, spatially uniform, pooling.

Uniform and pooling work on the raster of an item's tokens: an image's (or a video frame's) patch
grid, or an audio clip's frames as a 1 x N line in time order (even spacing in time, average
pooling of adjacent frames)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.pool import grid_pool, grid_sample
from mmpress.presses.base import Press, ScorerPress, SelectorPress, VisualContext, register


def raster(ctx: VisualContext, n: int) -> tuple[int, int]:
    """The (h, w) raster of the items' n tokens: the patch grid, or an audio clip's 1 x n line."""
    return (1, n) if ctx.kind == "audio" else ctx.require("grid")


@register
@dataclass
class NonePress(Press):
    """Keeps every visual token: the uncompressed reference. It takes no budget: ``NonePress(keep=8)``
    raises rather than silently keeping everything."""

    name = "none"
    paper = "no compression (reference)"
    needs_budget = False

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, _ = tokens.shape
        return tokens, torch.arange(n, device=tokens.device).expand(m, n)


@register
@dataclass
class RandomPress(ScorerPress):
    """Keeps k tokens drawn uniformly without replacement, reproducibly: a fresh generator
    seeded with ``seed`` on the tokens' device draws every call. The draw of an image depends
    on its place in the batch (one (M, N) draw), so batch and single runs differ."""

    seed: int = 0

    name = "random"
    paper = "random pruning baseline"

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        generator = torch.Generator(device=tokens.device).manual_seed(self.seed)
        return torch.rand(tokens.shape[:2], generator=generator, device=tokens.device)


@register
@dataclass
class UniformPress(SelectorPress):
    """Keeps k spatially uniform tokens: the centre token of each of k near-equal cells of the
    patch grid (``ops.pool.grid_cells``), the same for every image; on an audio clip, k tokens
    evenly spaced in time. An image without a single grid (tiles) is refused."""

    name = "uniform"
    paper = "spatially uniform sampling baseline"
    needs = ("grid",)
    audio_line = True

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        return grid_sample(raster(ctx, tokens.shape[1]), k, tokens.device).expand(tokens.shape[0], k)


@register
@dataclass
class PoolPress(Press):
    """2-D average pooling of the patch grid to k tokens (k near-equal cells, any k); on an audio
    clip, average pooling of k runs of adjacent frames. Each pooled token takes the position of its
    cell's centre token."""

    name = "pool"
    paper = "2-D average pooling baseline"
    needs = ("grid",)
    audio_line = True

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        pooled, centre = grid_pool(tokens, raster(ctx, tokens.shape[1]), k)
        return pooled, centre.expand(tokens.shape[0], k)
