"""Temporal token merging: DyCoke's first stage (TTM), "DyCoke: Dynamic Compression of Tokens for
Fast Video Large Language Models" (Tao et al., CVPR 2025, arXiv 2411.15024; official code
KD-TAO/DyCoke, ``dycole_ttm`` in ``llava/model/llava_arch.py``), with HoliTom's merge of
temporally redundant tokens into one (Shao et al., "HoliTom: Holistic Token Merging for Fast
Video Large Language Models", arXiv 2505.21334)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.ops.similarity import at_least_float32
from mmpress.ops.video import frame_similarity, merge_runs, row_rank, split_evenly, video_grid
from mmpress.presses.base import Press, VisualContext, register


@register
@dataclass
class TemporalMergePress(Press):
    """Merges tokens that repeat the same place of the previous frame, the most redundant first,
    under per-frame budgets, to exactly k tokens per video.

    1. Redundancy (DyCoke Sec. 3.2, Eq. 2): cosine of token (f, p) with token (f-1, p), same
       spatial place in the previous frame (:func:`ops.video.frame_similarity`).
    2. Per-frame budgets (DyCoke keeps its reference frame whole and the same share of every
       other frame): frame 0 keeps all P = h*w tokens; the other k - P are split evenly over
       frames 1..t-1 (``ops.video.split_evenly``), and each such frame keeps its least redundant
       tokens (lowest cosine; ties to the lower place) -- DyCoke's ``topk(largest=False)``.
    3. Every other token merges into the token at its place in the previous frame; chains of
       merges form runs along time, each represented by its earliest token, which gives its
       position (:func:`ops.video.merge_runs`). The merged token is the size-weighted mean of its
       run (HoliTom's temporal merge); ``merge=False`` keeps the representative verbatim and
       drops the rest, as DyCoke's pruning does.
    4. k < P (less than one frame; an image, t = 1): every place is merged over all frames, then
       the P place-tokens are merged along the raster order, the most similar neighbours first
       (edges inside a row before edges across rows), to k runs, each at its first place.

    DyCoke's TTM has no threshold: it keeps a fixed share of each frame (official K = 0.7 pruned,
    ``dycoke_k``), so exactness comes from the budgets, not from a cosine threshold; map
    ``keep_ratio = (1 + (t-1)(1-K)) / t`` to reproduce its token count.

    Deviations: DyCoke groups frames in windows of 4 and compares frames 1, 2 with the window's
    frame 0 and frame 3 with frame 2 (the window's frame 0 kept whole); here every frame is
    compared with the previous one and only frame 0 is kept whole, so any k >= P is exact (the
    official code also compares pair i with the previous pair's similarities, an indexing slip,
    and never prunes frame 2 of the last window). Batched over M videos, no loop over frames.
    """

    merge: bool = True

    name = "temporal_merge"
    paper = "DyCoke (Tao et al., CVPR 2025, arXiv 2411.15024), TTM stage; HoliTom arXiv 2505.21334"
    needs = ("grid",)
    video = True

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, d = tokens.shape
        t, h, w = video_grid(n, ctx.grid_thw or (1, *ctx.require("grid")))
        p, device = h * w, tokens.device
        # 1-2. which tokens open a new run along time: frame 0, and each frame's kept tokens
        start = torch.zeros(m, t, p, dtype=torch.bool, device=device)
        start[:, 0].fill_(True)  # (assigning a Python scalar would copy it from the host)
        if k >= p and t > 1:
            budget = split_evenly(k - p, t - 1, device)  # (t-1,) per-frame budgets
            start[:, 1:] = row_rank(frame_similarity(tokens, t), descending=False) < budget[:, None]
        # 3. runs along time, place-major: path slot (p, f) holds token f*P + p
        path = torch.arange(n, device=device).view(t, p).T.reshape(-1)
        x = at_least_float32(tokens)[:, path]
        total, size, first = merge_runs(x, x.new_ones(m, n), start.transpose(1, 2).reshape(m, n), max(k, p))
        position = path[first]
        if k < p:  # 4. the P place-tokens (one per place, in raster order) merged along the raster
            unit = F.normalize(total / size.unsqueeze(-1), dim=-1)
            edge = (unit[:, 1:] * unit[:, :-1]).sum(-1)  # (M, P-1): place q-1 with place q
            edge = edge - 4.0 * (torch.arange(1, p, device=device) % w == 0)  # across rows: last
            start2 = torch.ones(m, p, dtype=torch.bool, device=device)
            start2[:, 1:] = row_rank(edge, descending=True) >= p - k
            total, size, first = merge_runs(total, size, start2, k)
            position = position.gather(1, first)
        if not self.merge:
            return gather_tokens(tokens, position), position
        return (total / size.unsqueeze(-1)).to(tokens.dtype), position
