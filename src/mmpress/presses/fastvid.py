"""FastVID: "FastVID: Dynamic Density Pruning for Fast Video Large Language Models" (Shen et al.,
NeurIPS 2025, arXiv 2503.11187; official code LunarShen/FastVID, the pruning block in
``fastvid_llavaonevision/.../language_model/modeling_qwen2.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.ops.similarity import at_least_float32
from mmpress.ops.video import cut_segments, density_peak_score, first_true, row_rank, split_evenly, video_grid
from mmpress.presses.base import Press, VisualContext, register


def _stable_by(order: Tensor, key: Tensor, descending: bool) -> Tensor:
    """Re-sort a permutation ``order`` (M, L) by ``key`` (M, L, given per original token),
    stably, so earlier sorts break the ties."""
    return order.gather(1, key.gather(1, order).argsort(dim=1, descending=descending, stable=True))


@register
@dataclass
class FastVIDPress(Press):
    """Dynamic temporal segmentation, then density-based spatio-temporal pruning (STPrune).

    1. DySeg (Sec. 3.2): frame global feature g_f = mean of the frame's tokens (official
       Qwen2.5-VL port; the LLaVA code uses SigLIP's pooled output); transition similarity
       cos(g_{f-1}, g_f); a segment boundary after the ``segments - 1`` lowest transitions and
       after every one below ``tau`` (:func:`ops.video.cut_segments`).
    2. Budgets: k split evenly over the t frames (official: int(P * ratio) each); of frame f's
       r_f, c_f = int(d r_f) are contextual and s_f = r_f - c_f salient (``d`` = ``STPrune_d``).
    3. ATS (Sec. 3.3): each frame's s_f tokens of highest attention ``ctx.cls_attn`` stay verbatim.
    4. DTM (Sec. 3.3): a segment's sum_f c_f contextual tokens come from its anchor frames, every
       ``anchor_step``-th frame counted from the segment's last, split evenly over them; in an
       anchor frame, the non-salient tokens of highest DPC-kNN score
       (:func:`ops.video.density_peak_score`, k = ``neighbours``, within the frame).
    5. Merge: for each frame holding contextual tokens, every non-salient token of the segment
       joins its most similar (cosine) contextual token of that frame; a contextual token
       becomes alpha x + (1 - alpha) mean(joined), alpha = max(1 / (count + 1), ``beta``), at its
       own position.

    Defaults: the paper's and official scripts' c = 8, tau = 0.9 (the Qwen2.5-VL script: 0.84),
    d = 0.4, p = 4, beta = 0.6. Signal: ``cls_attn`` (M, N), the per-token attention the model's
    tower gives (LLaVA-OneVision: SigLIP's pooling-head attention; Qwen2.5-VL official: the frame's
    mean query over the merged tokens' keys in the last vision block).

    Deviations: exact k (official floors lose the remainders: anchors' shares here differ by at
    most one, the extras to the anchors nearest the segment end); an anchor needing more tokens
    than it has non-salient ones (high budgets; official: crash) takes them all and the segment's
    remainder goes to its other frames by density; density ties go to the lower index (official:
    1e-6 random noise); the Qwen2.5-VL port's extra sub-segmentation (``DySeg_ignore``) is not
    reproduced; the frame's global feature is the token mean in every family (the LLaVA-OneVision
    code's SigLIP pooled feature is a signal the adapters do not provide). Batched over M videos,
    no loop over frames or segments. Positions: the kept tokens keep their original ids, as the
    official code (``position_ids = keep_indexs``). Tested against the official loop:
    ``fastvid_reference`` in tests/test_video_presses.py (more videos in
    tests/test_official_pre.py).
    """

    segments: int = 8
    tau: float = 0.9
    contextual_ratio: float = 0.4
    anchor_step: int = 4
    beta: float = 0.6
    neighbours: int = 4

    name = "fastvid"
    paper = "Shen et al., NeurIPS 2025, arXiv 2503.11187"
    needs = ("grid", "cls_attn")
    video = True
    official_positions = "keep"  # official: position_ids = keep_indexs (the original ids)

    def __post_init__(self):
        super().__post_init__()
        if self.segments < 1 or self.anchor_step < 1 or self.neighbours < 1:
            raise ValueError("segments, anchor_step and neighbours must be >= 1")
        if not 0 <= self.contextual_ratio <= 1 or not 0 <= self.beta <= 1:
            raise ValueError("contextual_ratio and beta must be in [0, 1]")

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, d = tokens.shape
        t, h, w = video_grid(n, ctx.grid_thw or (1, *ctx.require("grid")))
        attn = ctx.require("cls_attn")
        p, device = h * w, tokens.device
        x = at_least_float32(tokens)
        frames = x.view(m, t, p, d)
        frame = torch.arange(t, device=device)

        # 1. DySeg -> segment id of every frame, its start frame, length and place from the end
        g = F.normalize(frames.mean(dim=2), dim=-1)
        seg = cut_segments((g[:, 1:] * g[:, :-1]).sum(-1), self.segments, self.tau)  # (M, t)
        ones = torch.ones(m, t, dtype=torch.long, device=device)
        seg_len = torch.zeros_like(ones).scatter_add_(1, seg, ones)  # indexed by segment id
        seg_start = torch.full_like(ones, t).scatter_reduce(1, seg, frame.expand(m, t), "amin")
        from_end = seg_len.gather(1, seg) - 1 - (frame - seg_start.gather(1, seg))

        # 2-3. budgets (static) and ATS
        retain = split_evenly(k, t, device)
        low, high = (int(r * self.contextual_ratio) for r in (k // t, k // t + 1))  # official int(d r)
        ctx_num = torch.where(frame < k % t, high, low)
        n_ctx = (t - k % t) * low + (k % t) * high  # a Python int: no device sync
        salient = row_rank(attn.view(m, t, p)) < (retain - ctx_num)[:, None]  # (M, t, P)

        # 4. anchor frames share their segment's contextual budget
        seg_ctx = torch.zeros_like(ones).scatter_add_(1, seg, ctx_num.expand(m, t))
        n_anchor = (seg_len + self.anchor_step - 1) // self.anchor_step
        share, extra = seg_ctx.gather(1, seg), n_anchor.gather(1, seg)
        ordinal = from_end // self.anchor_step
        extra = extra.clamp_min(1)
        quota = (from_end % self.anchor_step == 0) * (share // extra + (ordinal < share % extra))
        free = ~salient
        score = density_peak_score(frames.reshape(m * t, p, d), free.view(m * t, p), self.neighbours).view(m, t, p)
        chosen = free & (row_rank(score) < quota.unsqueeze(-1))  # quota capped by the free tokens
        # segment-wise top seg_ctx by (chosen, density); salient tokens never
        tier = (chosen.long() + free.long()).view(m, n)  # 2 chosen, 1 free, 0 salient
        order = score.view(m, n).argsort(dim=1, descending=True, stable=True)
        order = _stable_by(order, tier, descending=True)
        token_seg = seg.repeat_interleave(p, dim=1)
        order = _stable_by(order, token_seg, descending=False)
        rank = torch.arange(n, device=device) - seg_start.gather(1, token_seg.gather(1, order)) * p
        contextual = torch.zeros(m, n, dtype=torch.bool, device=device).scatter_(
            1, order, rank < seg_ctx.gather(1, token_seg.gather(1, order)))

        # 5. DTM merge into the contextual tokens of each frame
        target = first_true(contextual, n_ctx)  # (M, C)
        kept = first_true(contextual | salient.view(m, n), k)
        if n_ctx == 0:
            return gather_tokens(tokens, kept), kept
        unit = F.normalize(x, dim=-1)
        sim = unit @ gather_tokens(unit, target).transpose(1, 2)  # (M, N, C)
        target_frame = target // p
        valid = free.view(m, n, 1) & (token_seg.unsqueeze(2) == seg.gather(1, target_frame).unsqueeze(1))
        sim = sim.masked_fill(~valid, -torch.inf)
        by_frame = target_frame.unsqueeze(1).expand(m, n, n_ctx)
        best = sim.new_full((m, n, t), -torch.inf).scatter_reduce(2, by_frame, sim, "amax").gather(2, by_frame)
        col = torch.arange(n_ctx, device=device).expand(m, n, n_ctx)
        is_best = valid & (sim == best)
        lowest = torch.full((m, n, t), n_ctx, device=device).scatter_reduce(
            2, by_frame, col.masked_fill(~is_best, n_ctx), "amin").gather(2, by_frame)
        assign = (is_best & (col == lowest)).to(x.dtype)  # (M, N, C) one target per frame
        count = assign.sum(dim=1).unsqueeze(-1)  # (M, C, 1)
        mean = assign.transpose(1, 2) @ x / count.clamp_min(1)
        alpha = (1 / (count + 1)).clamp_min(self.beta)
        merged = alpha * gather_tokens(x, target) + (1 - alpha) * mean
        out = x.scatter(1, target.unsqueeze(-1).expand(-1, -1, d), merged)
        return gather_tokens(out, kept).to(tokens.dtype), kept
