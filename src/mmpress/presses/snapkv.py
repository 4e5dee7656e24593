"""SnapKV: "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., NeurIPS 2024,
arXiv 2404.14469; official code FasterDecoding/SnapKV), the text-LLM reference KV policy, here
applied to the visual span of the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mmpress.presses.base import KVPress, VisualContext, register


@register
@dataclass
class SnapKVPress(KVPress):
    """After prefill, in every layer and per KV head, keeps the ``keep`` visual KV entries of each
    image that the observation window (the last ``window`` = 32 prompt tokens) attends to most,
    the votes smoothed by a 1-D average pool of ``kernel_size`` = 5 along the tokens (official
    ``SnapKVCluster.update_kv`` / ``init_snapkv`` defaults: window 32, kernel 5, avgpool).

    Scores: softmax attention of the window's queries (the layer's own, rotated) over all keys,
    averaged over the window rows and over the query heads that share a KV head (kvpress's
    ``SnapKVPress`` convention; official: per query head, with the keys repeated to every head).
    Text entries, the window included, are never evicted (official: the window is kept; the
    rest of the text competes for the budget, which here counts visual entries only).
    A later turn's question does not re-select: the evicted entries are gone.
    """

    window: int = 32
    kernel_size: int = 5

    name = "snapkv"
    paper = "Li et al., NeurIPS 2024, arXiv 2404.14469"

    def score(self, tokens: Tensor, ctx: VisualContext) -> Tensor:
        votes = ctx.require("llm_attn")  # (M, N)
        if self.kernel_size <= 1:
            return votes
        return F.avg_pool1d(votes[:, None], self.kernel_size, stride=1, padding=self.kernel_size // 2)[:, 0]
