"""EVS: "Efficient Video Sampling: Pruning Temporally Redundant Tokens for Faster VLM Inference"
(Bagrov et al., arXiv 2510.14624), the video pruning vLLM ships for Qwen2.5-VL / Qwen3-VL
(``vllm/multimodal/evs.py: compute_retention_mask``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.pool import grid_sample
from mmpress.ops.video import frame_similarity, video_grid
from mmpress.presses.base import SelectorPress, VisualContext, register

#: vLLM's score for the first frame: above any dissimilarity 1 - cos <= 2
FIRST_FRAME = 255.0


@register
@dataclass
class EVSPress(SelectorPress):
    """Drops the patches whose content barely changes from the previous frame; keeps frame 0 whole.

    Official ``compute_retention_mask`` on the merged (LM-input) video tokens: dissimilarity
    1 - cos(x_{f,p}, x_{f-1,p}) of every token with the same place in the previous frame; frame 0
    scores 255 (always kept); the k highest scores are kept (stable descending sort: ties to the
    earlier token, so a static video keeps frame 0, then frame 1's first places, ...).

    Budget: vLLM's pruning rate q keeps ``max(h*w, int(t*h*w*(1 - q)))`` tokens; here k comes
    from ``keep`` / ``keep_ratio`` as for every press (``keep_ratio = 1 - q`` up to int vs ceil).

    Below one frame there is no official selection: vLLM's count never goes below h*w. For
    k < h*w (and for an image, t = 1) the press keeps k spatially uniform tokens of frame 0
    (``ops.pool.grid_sample``; the stable sort would take its first k in raster order, the top
    rows only). Positions: vLLM gives the kept tokens their original M-RoPE (t, h, w) ids
    (``compute_mrope_for_media``), mmpress's default. Batched over M videos. Tested against
    ``compute_retention_mask`` as written (``evs_reference`` in tests/test_video_presses.py;
    exact ties in tests/test_official_pre.py).
    """

    name = "evs"
    paper = "Bagrov et al., arXiv 2510.14624 (vLLM EVS)"
    needs = ("grid",)
    video = True
    official_positions = "keep"  # vLLM keeps the original M-RoPE ids of the retained tokens

    def select(self, tokens: Tensor, ctx: VisualContext, k: int) -> Tensor:
        m, n, _ = tokens.shape
        t, h, w = video_grid(n, ctx.grid_thw or (1, *ctx.require("grid")))
        p = h * w
        first = torch.full((p,), FIRST_FRAME, device=tokens.device)
        if k < p:  # frame 0 cannot stay whole: its uniform sample first
            first[grid_sample((h, w), k, tokens.device)] += 1
        dissimilarity = 1.0 - frame_similarity(tokens, t)  # (M, t-1, P)
        score = torch.cat([first.to(dissimilarity.dtype).expand(m, 1, p), dissimilarity], dim=1).flatten(1)
        return score.argsort(dim=-1, descending=True, stable=True)[:, :k]
