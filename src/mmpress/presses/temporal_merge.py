"""Temporal token pruning: DyCoke's first stage (TTM), "DyCoke: Dynamic Compression of Tokens for
Fast Video Large Language Models" (Tao et al., CVPR 2025, arXiv 2411.15024; official code
KD-TAO/DyCoke, ``dycole_ttm`` in ``llava/model/llava_arch.py``), with HoliTom's merge of
temporally redundant tokens into one as an option (Shao et al., "HoliTom: Holistic Token Merging
for Fast Video Large Language Models", arXiv 2505.21334)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.ops.similarity import at_least_float32
from mmpress.ops.video import first_true, merge_runs, row_rank, video_grid
from mmpress.presses.base import Press, VisualContext, register

REFERENCES = ("dycoke", "previous")


def dycoke_partners(t: int) -> tuple[list[int], list[int]]:
    """Official ``dycole_ttm`` frame roles for t frames: partner[f] is the frame f is compared
    with (-1: kept whole), and the frames the official code drops whole.

    Pairs (f, f+1) for even f: odd frames against the previous frame. Windows of 4 starting at
    i = 0, 4, ... while i < t - 4: frame i + 2 against frame i (so the last window's frame 2 stays
    whole). With odd t the last frame belongs to no pair and is dropped."""
    partner = [f - 1 if f % 2 else -1 for f in range(t)]
    for i in range(0, t - 4, 4):
        partner[i + 2] = i
    dropped = [t - 1] if t % 2 and t > 1 else []
    for f in dropped:
        partner[f] = f - 1  # a frame to merge into (merge=True); keeps no token of its own
    return partner, dropped


@register
@dataclass
class TemporalMergePress(Press):
    """Keeps, in each frame compared with a reference frame, the tokens least similar to the same
    place there; the reference frames stay whole. Exactly k tokens per video.

    Official ``dycole_ttm`` (DyCoke Sec. 3.2, Eq. 2), ``reference="dycoke"`` (default):
    1. Frame roles (:func:`dycoke_partners`): even frames whole; odd frame f compared with
       frame f - 1; in windows of 4 frames (but the last), frame 2 compared with the window's
       frame 0 (it stays whole otherwise); with odd t the last frame is dropped.
    2. Redundancy: cosine of token (f, p) with token (partner(f), p), same spatial place.
    3. Budget: the whole frames keep their P = h*w tokens; the other k - (whole frames) * P are
       split evenly over the compared frames (earlier frames one more, ``ops.video.split_evenly``)
       and each keeps its least similar tokens (DyCoke's ``topk(largest=False)``; ties to the
       lower place). The official per-frame count is int((1 - K) P) with K = ``dycoke_k`` = 0.7
       pruned: ``keep = whole * P + compared * int(0.3 * P)`` reproduces it exactly.
    The kept tokens are returned verbatim (``merge=False``, official: pruning).

    merge: HoliTom's temporal merge instead of pruning: every token not kept joins the token at
    its place in its partner frame (transitively, to a kept token), which becomes the
    size-weighted mean of all the tokens that joined it, at its own position.
    reference: "previous" compares every frame with the previous one and keeps only frame 0
    whole (any k >= P exact; an option, not the official windows).

    Deviations (forced by the exact-k budget, which the official ratio K cannot express):
    (1) a budget below the official whole frames (k < whole * P) cannot keep them whole: the
    "previous" roles are used there; (2) k < P (less than one frame; an image, t = 1): every
    place is merged over all frames, then the P place-tokens are merged along the raster order,
    the most similar neighbours first (edges inside a row before edges across rows), to k runs,
    each at its first place; (3) with odd t, a budget above what the other frames hold is taken
    from the last frame (official: dropped) by the same rule against frame t - 2. Kept tokens
    stay in raster order (official: each compared frame's kept tokens by ascending similarity).
    Positions: official LLaVA-OneVision inserts the kept tokens at consecutive positions
    (the default on 1-D RoPE families, ``official_positions``); ``positions="keep"`` keeps the
    original ids.
    Batched over M videos, no loop over frames. Tested against a re-implementation of
    ``dycole_ttm`` (tests/test_official_pre.py).
    """

    merge: bool = False
    reference: str = "dycoke"

    name = "temporal_merge"
    paper = "DyCoke (Tao et al., CVPR 2025, arXiv 2411.15024), TTM stage; HoliTom arXiv 2505.21334"
    needs = ("grid",)
    video = True

    def __post_init__(self):
        super().__post_init__()
        if self.reference not in REFERENCES:
            raise ValueError(f"reference must be one of {REFERENCES}, got {self.reference!r}")

    def roles(self, t: int, p: int, k: int, device=None) -> tuple[Tensor, Tensor]:
        """(partner (t,) per frame, -1 for whole frames; budget (t,)) for a budget k >= P. Counts
        are static Python ints; the tensors are built from ``arange`` (no host-to-device copy)."""
        dycoke = self.reference == "dycoke"
        partner, dropped = dycoke_partners(t) if dycoke else ([-1] + list(range(t - 1)), [])
        n_whole = sum(1 for f in partner if f < 0)
        if k < n_whole * p:  # deviation (1): the official reference frames do not fit
            dycoke, dropped, n_whole = False, [], 1
        n_compared = t - n_whole - len(dropped)
        f = torch.arange(t, device=device)
        if dycoke:  # the same roles as dycoke_partners, as tensor ops
            part = torch.where(f % 2 == 1, f - 1, torch.where((f % 4 == 2) & (f < t - 2), f - 2, -1))
            part = torch.where(f == t - 1, t - 2, part) if dropped else part
        else:
            part = f - 1
        rest = k - n_whole * p
        base, extra = divmod(min(rest, n_compared * p), max(n_compared, 1))
        compared = (part >= 0) & (f != t - 1) if dropped else part >= 0
        ordinal = compared.long().cumsum(0) - 1
        budget = torch.where(compared, base + (ordinal < extra).long(), max(0, rest - n_compared * p))
        return part, torch.where(part < 0, p, budget)  # deviation (3): a dropped frame's share last

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, d = tokens.shape
        t, h, w = video_grid(n, ctx.grid_thw or (1, *ctx.require("grid")))
        p, device = h * w, tokens.device
        if k < p:
            return self._below_one_frame(tokens, t, w, p, k)
        partner_t, budget_t = self.roles(t, p, k, device)
        x = at_least_float32(tokens)
        unit = F.normalize(x, dim=-1).unflatten(1, (t, p))
        sim = (unit * unit[:, partner_t.clamp_min(0)]).sum(dim=-1)  # (M, t, P): vs the partner frame
        kept = row_rank(sim, descending=False) < budget_t[:, None]  # whole frames: budget P
        kept = kept.flatten(1)  # (M, N), exactly k True per row
        index = first_true(kept, k)
        if not self.merge:
            return gather_tokens(tokens, index), index
        # every token joins its partner's token at the same place until a kept one: pointer
        # jumping along the partner chains (partners are earlier frames, depth < t)
        own = torch.arange(n, device=device)
        up = (partner_t.clamp_min(0)[:, None] * p + torch.arange(p, device=device)).flatten()
        target = torch.where(kept, own, up)
        for _ in range(max(1, (t - 1).bit_length())):
            target = target.gather(1, target)
        total = torch.zeros_like(x).scatter_add_(1, target.unsqueeze(-1).expand(-1, -1, d), x)
        size = x.new_zeros(m, n).scatter_add_(1, target, x.new_ones(m, n))
        merged = gather_tokens(total, index) / size.gather(1, index).unsqueeze(-1)
        return merged.to(tokens.dtype), index

    def _below_one_frame(self, tokens: Tensor, t: int, w: int, p: int, k: int) -> tuple[Tensor, Tensor]:
        """Deviation (2): k < P. Runs along time at every place, then along the raster."""
        m, n, _ = tokens.shape
        device = tokens.device
        start = torch.zeros(m, t, p, dtype=torch.bool, device=device)
        start[:, 0].fill_(True)  # (assigning a Python scalar would copy it from the host)
        path = torch.arange(n, device=device).view(t, p).T.reshape(-1)  # place-major
        x = at_least_float32(tokens)[:, path]
        total, size, first = merge_runs(x, x.new_ones(m, n), start.transpose(1, 2).reshape(m, n), p)
        position = path[first]
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
