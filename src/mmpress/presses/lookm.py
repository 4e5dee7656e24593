"""LOOK-M: "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference" (Wan et al., EMNLP Findings 2024, arXiv 2406.18139; official code SUSTechBruce/LOOK-M)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.presses.base import KVPress, VisualContext, register


@register
@dataclass
class LookMPress(KVPress):
    """Text-prior KV eviction with merging, after prefill, in every layer and per KV head.

    1. Text prior (paper Sec. 3.2, official ``H2OLlamaAttention_drop``): every text entry is kept;
       the visual entries compete for the budget by the attention they accumulate from all prompt
       queries (H2O's heavy-hitter score: the layer's softmax attention summed over query rows;
       we average, the same ranking), per head. ``keep`` visual entries per image survive.
    2. Merging (Sec. 3.3, the shipped ``text_prior_pivot_merge``): each evicted entry finds the
       kept entry of highest key cosine similarity (its pivot); keys and values alike, the pivot
       becomes the mean of itself and ``(evicted + pivot) / 2`` of every evicted entry assigned
       to it (official ``scatter_reduce(mean, include_self=True)``). ``merge="average"`` merges
       the evicted entries themselves (official averaged merge); ``merge=None`` only evicts.

    Deviations: the budget is ``keep`` visual entries per image (official: 10% of the prompt as
    heavy hitters + a 10% recent window, which with the text prior also keeps text only);
    grouped-query attention averages the query heads of a KV head (official: MHA only).
    A later turn's question does not re-select: evicted entries are gone (merged into kept ones).
    """

    merge: str | None = "pivot"

    name = "lookm"
    paper = "Wan et al., EMNLP Findings 2024, arXiv 2406.18139"
    query = "all"

    def __post_init__(self):
        super().__post_init__()
        if self.merge not in ("pivot", "average", None):
            raise ValueError(f"merge must be 'pivot', 'average' or None, got {self.merge!r}")

    def press_kv(self, keys: Tensor, values: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor, Tensor]:
        m, n, _ = keys.shape
        order = ctx.require("llm_attn").argsort(dim=-1, descending=True)
        keep, evicted = order[:, :k].sort(dim=-1).values, order[:, k:]
        kept_k, kept_v = gather_tokens(keys, keep), gather_tokens(values, keep)
        if self.merge is None or k == n:
            return kept_k, kept_v, keep
        ev_k, ev_v = gather_tokens(keys, evicted), gather_tokens(values, evicted)
        sim = F.normalize(ev_k.float(), dim=-1) @ F.normalize(kept_k.float(), dim=-1).transpose(1, 2)
        pivot = sim.argmax(dim=-1)  # (M, N - k) the kept entry each evicted one merges into
        count = torch.ones(m, k, device=keys.device).scatter_add_(1, pivot, torch.ones_like(pivot, dtype=torch.float))

        def merged(kept: Tensor, ev: Tensor) -> Tensor:
            src = ev.float()
            if self.merge == "pivot":
                src = (src + gather_tokens(kept, pivot).float()) / 2
            total = kept.float().scatter_add(1, pivot[..., None].expand_as(src), src)
            return (total / count[..., None]).to(kept.dtype)

        return merged(kept_k, ev_k), merged(kept_v, ev_v), keep
