"""LOOK-M: "LOOK-M: Look-Once Optimization in KV Cache for Efficient Multimodal Long-Context
Inference" (Wan et al., EMNLP Findings 2024, arXiv 2406.18139; official code SUSTechBruce/LOOK-M,
``kv_mode="text_prior_pivot_merge"``: ``TextPivotMerge_LayerWise`` in
``LLaVA-mix_merge_v1/llava/model/kv_token_merge/modify_llama.py``)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from mmpress.ops.select import gather_tokens
from mmpress.presses.base import KVPress, VisualContext, register


@register
@dataclass
class LookMPress(KVPress):
    """Text-prior KV eviction with pivot merging, after prefill, in every layer and per KV head,
    as the official ``TextPivotMerge_LayerWise`` (run once, on the prefill) does:

    1. Scores (paper Sec. 3.2, official ``_update_hh_score``): the attention each entry receives
       from every prompt row (H2O's heavy-hitter score: the layer's causal softmax summed over all
       query rows; we average, the same ranking), per head.
    2. Text prior (Sec. 3.2): every text entry is kept (official: text scores outrank every
       image score and ``mask = hh_score >= 0`` keeps all of them). The last
       ``floor(recent_ratio * L)`` prompt entries (L: the row's prompt length; official
       ``recent_ratio=0.1``) are always kept, image entries among them included; the other image
       entries compete by score for the rest of the budget (ties: the earlier entry first).
    3. Pivot merge (Sec. 3.3): each evicted entry finds, by key cosine similarity, its pivot among
       ALL kept entries of the row and head, text included (``pivots="all"``; ties: the earliest
       in the sequence, as ``max`` returns); keys and values alike, every pivot becomes
       ``mean(itself, (evicted + pivot) / 2 for each evicted entry it absorbs)`` (official
       ``scatter_reduce(reduce="mean", include_self=True)``), so merged text entries change too.

    Options: ``pivots="visual"`` merges into the image's kept entries only (text untouched);
    ``merge="average"`` merges the evicted entries themselves (``text_prior_avg_merge`` without its
    similarity filter); ``merge=None`` only evicts (``text_prior_h2o``); ``recent_ratio=0`` keeps
    no recent window.

    Deviations, each forced:
    - Budget: ``keep`` visual entries per image (recent-window image entries counted in it; if
      the window holds more than ``keep`` of an image, its first ``keep``). Official: a budget over
      the whole prompt, ``int(0.1 L)`` heavy hitters (text first) + ``int(0.1 L)`` recent, so the
      image count it keeps depends on the text's length. mmpress compares presses at a visual
      budget per image (the adapter's cache accounting, ``kept_visual_tokens``, the bench's
      ``--keep``); the official count is reproduced by passing it as ``keep`` (tested).
    - Several images in one prompt: each image is selected and merged in turn (official: one
      joint top-k over all images' entries); one image reproduces the official cache exactly.
    - Grouped-query attention: the score averages the query heads of a KV head (the cache keeps
      one entry per KV head; official: multi-head attention only).
    Decoding keeps the original position ids (as the official generate's attention-mask
    numbering); a later turn does not re-select: evicted entries are gone (merged into kept ones).
    """

    merge: str | None = "pivot"
    pivots: str = "all"
    recent_ratio: float = 0.1

    name = "lookm"
    paper = "Wan et al., EMNLP Findings 2024, arXiv 2406.18139"
    query = "all"

    def __post_init__(self):
        super().__post_init__()
        if self.merge not in ("pivot", "average", None):
            raise ValueError(f"merge must be 'pivot', 'average' or None, got {self.merge!r}")
        if self.pivots not in ("all", "visual"):
            raise ValueError(f"pivots must be 'all' (every kept entry, text included: official) or 'visual', "
                             f"got {self.pivots!r}")
        ratio = self.recent_ratio
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1 or math.isnan(ratio):
            raise ValueError(f"recent_ratio must be a number in [0, 1) (official 0.1), got {ratio!r}")

    def press_kv(self, keys: Tensor, values: Tensor, ctx: VisualContext, k: int) -> tuple[Tensor, Tensor, Tensor]:
        """The image's entries alone (no text, no recent window): what ``press_kv_row`` does when
        the stage gives it no row."""
        return self.press_kv_row(keys, values, ctx, k)[:3]

    def press_kv_row(self, keys: Tensor, values: Tensor, ctx: VisualContext, k: int,
                     text_keys: Tensor | None = None, text_values: Tensor | None = None,
                     text_ok: Tensor | None = None, length: Tensor | None = None):
        """(M, N, d) keys / values of an image's entries (M = rows x KV heads), with the (M, T, d)
        keys / values of its row's entries of which ``text_ok`` (M, T) marks the text (the stage
        passes whole rows), the sequence indices ``ctx.token_index`` (M, N) / ``ctx.text_index``
        (M, T) and the rows' prompt lengths ``length`` (M,) -> kept keys, kept values (M, k, d),
        their index (M, k, ascending) and the text keys, values after merging (the given ones when
        nothing merged into them; None without text)."""
        m, n, _ = keys.shape
        score = ctx.require("llm_attn")
        if length is not None and self.recent_ratio > 0:
            # official int(L * recent_ratio): the same double product, truncated
            recent = (length.double() * self.recent_ratio).floor().long()
            forced = ctx.require("token_index") >= (length - recent)[:, None]
            score = score.masked_fill(forced, math.inf)
        order = score.argsort(dim=-1, descending=True, stable=True)
        keep, evicted = order[:, :k].sort(dim=-1).values, order[:, k:]
        kept_k, kept_v = gather_tokens(keys, keep), gather_tokens(values, keep)
        with_text = text_keys is not None and self.pivots == "all"
        if self.merge is None or k == n:
            return kept_k, kept_v, keep, text_keys, text_values
        dtype = torch.promote_types(keys.dtype, torch.float32)
        ev_k, ev_v = gather_tokens(keys, evicted).to(dtype), gather_tokens(values, evicted).to(dtype)
        cand_k, cand_v = kept_k.to(dtype), kept_v.to(dtype)
        cand_ok = torch.ones(m, k, dtype=torch.bool, device=keys.device)
        if with_text:
            # candidates in sequence order, so that a cosine tie goes to the earliest (official argmax)
            where = torch.cat([ctx.require("token_index").gather(1, keep),
                               ctx.require("text_index").masked_fill(~text_ok, torch.iinfo(torch.long).max)], dim=1)
            perm = where.argsort(dim=1, stable=True)
            cand_k = gather_tokens(torch.cat([cand_k, text_keys.to(dtype)], dim=1), perm)
            cand_v = gather_tokens(torch.cat([cand_v, text_values.to(dtype)], dim=1), perm)
            cand_ok = torch.cat([cand_ok, text_ok], dim=1).gather(1, perm)
        sim = F.normalize(ev_k, dim=-1) @ F.normalize(cand_k, dim=-1).transpose(1, 2)
        pivot = sim.masked_fill(~cand_ok[:, None], -math.inf).argmax(dim=-1)  # (M, N - k)
        count = torch.ones(cand_ok.shape, dtype=dtype, device=keys.device).scatter_add_(
            1, pivot, torch.ones_like(pivot, dtype=dtype))

        def merged(cand: Tensor, ev: Tensor) -> Tensor:
            src = (ev + gather_tokens(cand, pivot)) / 2 if self.merge == "pivot" else ev
            return cand.scatter_add(1, pivot[..., None].expand_as(src), src) / count[..., None]

        out_k, out_v = merged(cand_k, ev_k), merged(cand_v, ev_v)
        if not with_text:
            return out_k.to(keys.dtype), out_v.to(values.dtype), keep, text_keys, text_values
        back = perm.argsort(dim=1)  # undo the sequence order: kept entries first, then text
        out_k, out_v = gather_tokens(out_k, back), gather_tokens(out_v, back)
        return (out_k[:, :k].to(keys.dtype), out_v[:, :k].to(values.dtype), keep,
                out_k[:, k:].to(text_keys.dtype), out_v[:, k:].to(text_values.dtype))
