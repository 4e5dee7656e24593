"""SA-MAP (Samp): "SA-MAP: Similarity-Attention Boosted Token Compression via Merging-and-Pruning
for Efficient Speech LLMs" (Tencent AngelSlim, 2026; official code Tencent/AngelSlim, branch
``SA-MAP``, ``SA-MAP/almeval/models/qwen2_audio/qwen2_audio_pruner.py``, ``method == 'SA-MAP'``;
the earlier ``samp`` branch of a fork names it Samp)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from mmpress.ops.audio import similar_runs
from mmpress.ops.dpp import greedy_dpp_map
from mmpress.ops.similarity import at_least_float32, cosine_similarity
from mmpress.ops.video import merge_runs
from mmpress.presses.base import Press, VisualContext, register


@register
@dataclass
class SampPress(Press):
    """Merges runs of similar adjacent audio tokens, then keeps k of the runs by a DPP.

    Official selection (Qwen2-Audio, after the projector; per clip of N tokens, k kept):
    1. similarity: cosine of the projected tokens, (N, N);
    2. attention: the audio encoder's last-layer softmax attention, pooled to tokens (rows: mean
       of a token's 2 frames, columns: sum of its 2 frames). Merge importance: with the max over
       heads, each token's column mean over the query tokens; prune relevance: with the mean over
       heads, the diagonal (a token's attention to itself);
    3. merge: walking left to right, a token joins the current run while its mean similarity to the
       run's tokens is >= ``threshold`` (official ``threshold=0.85``, ``run_eval.sh``); each run
       becomes the importance-weighted mean of its tokens, with relevance the mean of theirs;
    4. prune: fast greedy DPP MAP (CDPruner's loop) on the runs, kernel
       ``L = diag(r) cos(runs) diag(r)``, k picks, kept in time order.
    Each kept run takes the position of its first token.

    Signals: ``audio_attn`` (step 2, from the adapter) and the tokens. Budget: k per clip (official
    ``max(round(N * ratio), 2)``; ``keep_ratio`` gives ceil(ratio N), ``keep`` an exact count).

    Deviations: (1) ties between equal DPP gains go to the lower run (official ``argmax``: the
    same); (2) a clip merged to fewer runs than k keeps its tokens unmerged and the DPP picks k of
    them (official: the DPP runs past its runs into -inf / NaN gains); (3) the attention and the
    similarity in float32 at least, the run test in float64 (official: the model dtype);
    (4) batched over clips of equal length (official: a loop over clips). Positions: renumbered
    0..L'-1 by default (official: the processor expands the placeholders to the kept count,
    ``official_positions``); ``positions="keep"`` keeps the original ids.
    """

    threshold: float = 0.85

    name = "samp"
    paper = "SA-MAP (Samp), Tencent AngelSlim 2026"
    needs = ("audio_attn",)

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.threshold, bool) or not isinstance(self.threshold, (int, float)) \
                or not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be a cosine similarity in [-1, 1] (official 0.85), got {self.threshold!r}")

    def compress(self, tokens: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor]:
        m, n, _ = tokens.shape
        attn = ctx.require("audio_attn")
        if attn.shape != (m, 2, n, n):
            raise ValueError(f"audio_attn {tuple(attn.shape)} must be (clips, 2, tokens, tokens) = {(m, 2, n, n)}: "
                             "the encoder attention pooled to tokens after the max and the mean over heads")
        attn = at_least_float32(attn)
        importance = attn[:, 0].mean(dim=1)  # (M, N) column mean: the attention each token receives
        relevance = attn[:, 1].diagonal(dim1=1, dim2=2)  # (M, N) each token's attention to itself
        x = at_least_float32(tokens)
        start = similar_runs(cosine_similarity(x), self.threshold)
        runs = start.sum(dim=1)
        start = torch.where((runs < k)[:, None], torch.ones_like(start), start)  # deviation (2)
        total, weight, first = merge_runs(x * importance.unsqueeze(-1), importance, start, n)
        _, size, _ = merge_runs(x, x.new_ones(m, n), start, n)
        rel_sum, _, _ = merge_runs(relevance.unsqueeze(-1), relevance, start, n)
        valid = size > 0  # slots past a clip's run count are empty
        merged = total / weight.clamp_min(torch.finfo(x.dtype).tiny).unsqueeze(-1)
        quality = rel_sum[..., 0] / size.clamp_min(1)
        sim = cosine_similarity(merged)
        sim.diagonal(dim1=1, dim2=2).fill_(1.0)  # cos(v, v) = 1 exactly, as the official normalised product
        kernel = quality.unsqueeze(-1) * sim * quality.unsqueeze(-2)
        pair = valid.unsqueeze(-1) & valid.unsqueeze(-2)
        kernel = kernel.masked_fill(~pair, 0.0)
        kernel.diagonal(dim1=1, dim2=2).masked_fill_(~valid, -1e30)  # empty slots: never a gain
        picks = greedy_dpp_map(kernel, k).sort(dim=1).values
        out = merged.gather(1, picks.unsqueeze(-1).expand(-1, -1, merged.shape[-1]))
        return out.to(tokens.dtype), first.gather(1, picks)
