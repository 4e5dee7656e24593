"""SnapKV: "SnapKV: LLM Knows What You are Looking for Before Generation" (Li et al., NeurIPS 2024,
arXiv 2404.14469; official code FasterDecoding/SnapKV), the text-LLM reference KV policy, here
applied to the visual span of the prompt."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

from mmpress.presses.base import KVPress, register


@register
@dataclass
class SnapKVPress(KVPress):
    """After prefill, in every layer and per KV head, keeps the ``keep`` visual KV entries of each
    image that the observation window (the last ``window`` = 32 prompt tokens) attends to most,
    the votes smoothed by a 1-D average pool of ``kernel_size`` = 5 along the tokens (official
    ``SnapKVCluster.update_kv`` / ``init_snapkv`` defaults: window 32, kernel 5, avgpool).

    Scores: softmax attention of the window's queries (the layer's own, rotated) over all keys,
    summed over the window rows (here averaged: the same ranking), then pooled along the whole
    prompt before the window (``smooth``), so the text next to an image enters the pooled votes
    of its first and last tokens as in the official code. Deviations, forced by the cache layout
    and the press's budget: votes are averaged over the query heads that share a KV head (the
    cache keeps entries per KV head; official: MHA, per query head); text entries, the window
    included, are never evicted and the budget counts visual entries per image (official: the
    window is kept, the rest of the prompt competes for ``max_capacity_prompt - window``).
    A later turn's question does not re-select: the evicted entries are gone.
    """

    window: int = 32
    kernel_size: int = 5

    name = "snapkv"
    paper = "Li et al., NeurIPS 2024, arXiv 2404.14469"

    def smooth(self, votes: Tensor, candidates: Tensor) -> Tensor:
        """(B, H, W) votes of every prompt column -> pooled along the prompt as the official
        ``update_kv`` pools ``attn_weights_sum`` (the prefix before the window, zero-padded):
        ``candidates`` (B, W) False at the window and padding, which are not voted on."""
        if self.kernel_size <= 1:
            return votes
        b, h, w = votes.shape
        flat = (votes * candidates[:, None]).reshape(b * h, 1, w)
        return F.avg_pool1d(flat, self.kernel_size, stride=1, padding=self.kernel_size // 2)[..., :w].view(b, h, w)
