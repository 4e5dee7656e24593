"""Attention a language-model layer's keys receive from a few query rows, computed from queries and
keys (RoPE and grouped-query attention applied as the model applies them), so the model itself
keeps running with SDPA / FlashAttention and no attention map of the whole sequence is built."""

from __future__ import annotations

import torch
from torch import Tensor


def attention_probs(q: Tensor, k: Tensor, q_index: Tensor, k_valid: Tensor, scaling: float) -> Tensor:
    """Softmax attention (B, Hkv, H / Hkv, R, L), float32, of the query rows over the keys.

    q (B, H, R, d): rotated queries of R rows per sequence; k (B, Hkv, L, d): rotated keys, with H a
    multiple of Hkv (grouped-query attention: query head h reads KV head h // (H / Hkv)).
    q_index (B, R): the column of each query row (causal: row r sees keys j <= q_index[r]);
    k_valid (B, L): False for padding keys. A row that sees no key (padding) stays finite.
    """
    b, h, r, d = q.shape
    hkv, length = k.shape[1], k.shape[2]
    logits = torch.einsum("bgqrd,bgld->bgqrl", q.float().view(b, hkv, h // hkv, r, d), k.float()) * scaling
    cols = torch.arange(length, device=k.device)
    visible = k_valid[:, None, :] & (cols <= q_index[:, :, None])  # (B, R, L)
    visible = visible | ~visible.any(-1, keepdim=True)
    return logits.masked_fill(~visible[:, None, None], -torch.inf).softmax(dim=-1)


def received_attention(q: Tensor, k: Tensor, q_index: Tensor, q_valid: Tensor, k_valid: Tensor,
                       scaling: float, chunk: int = 256) -> Tensor:
    """Mean attention each key receives from the valid query rows, per KV head: (B, Hkv, L),
    ``mean_{h in group, r valid} softmax_j(q_r . k_j * scaling)`` (0 for keys no row sees).
    Query rows are taken ``chunk`` at a time, so many rows (every prompt token) fit in memory."""
    weight = q_valid.float() / q_valid.sum(dim=1, keepdim=True).clamp(min=1)  # (B, R)
    group = q.shape[1] // k.shape[1]
    total = 0
    for start in range(0, q.shape[2], chunk):
        rows = slice(start, start + chunk)
        probs = attention_probs(q[:, :, rows], k, q_index[:, rows], k_valid, scaling)
        total = total + torch.einsum("bgqrl,br->bgl", probs, weight[:, rows])
    return total / group


def attention_rows(q: Tensor, k: Tensor, q_index: Tensor, k_valid: Tensor, scaling: float) -> Tensor:
    """Attention of each query row over the keys, averaged over all heads: (B, R, L)."""
    return attention_probs(q, k, q_index, k_valid, scaling).mean(dim=(1, 2))
