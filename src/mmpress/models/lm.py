"""The language model as the ``in_llm`` and ``kv`` stages see it: its decoder layers, a layer's
rotated queries and keys for a few rows (as its attention module computes them), and the
attention mask a layer receives, cut to the columns a press kept.

Family-neutral: every language model mmpress adapts (Llama, Qwen2, Qwen3, Mistral, ... as
transformers writes them) has ``layers[i].input_layernorm`` and ``layers[i].self_attn`` with
``q_proj`` / ``k_proj`` (optional ``q_norm`` / ``k_norm``) and its module's
``apply_rotary_pos_emb(q, k, cos, sin)``; a test compares the scores with eager attention's.
"""

from __future__ import annotations

import sys

import torch
from torch import Tensor, nn

from mmpress.ops.sequence import gather_rows


def _part(lm: nn.Module, name: str, kind: type, missing: str) -> nn.Module:
    """``lm.<name>`` if it is a ``kind``, else a ValueError: "<class> has no <missing>"."""
    part = getattr(lm, name, None)
    if not isinstance(part, kind):
        raise ValueError(f"{type(lm).__name__} has no {missing}")
    return part


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    return _part(lm, "layers", nn.ModuleList, "decoder `layers`: in-LLM and KV presses need a Llama-style language "
                 "model")


def final_norm(lm: nn.Module) -> nn.Module:
    """The language model's norm after its last decoder layer (``lm.norm``)."""
    return _part(lm, "norm", nn.Module, "final `norm`: this press needs a Llama-style language model")


def rotary_embedding(lm: nn.Module) -> nn.Module:
    """The language model's rotary embedding (``rotary_emb(x, position_ids) -> (cos, sin)``)."""
    return _part(lm, "rotary_emb", nn.Module, "`rotary_emb`: renumbering positions (positions='reindex') needs a "
                 "Llama-style language model; pass positions='keep'")


def queries_keys(layer: nn.Module, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor],
                 rows: Tensor, keys: bool = True, projected: Tensor | None = None) -> tuple[Tensor, Tensor | None, float]:
    """Rotated queries (B, H, R, d) of the ``rows`` (B, R) of ``hidden`` (B, L, D) entering
    ``layer``, rotated keys (B, Hkv, L, d) of every column (None if not ``keys``: e.g. the KV
    cache holds them), and the attention's scaling. ``projected``: the layer's own ``q_proj``
    output (B, L, H * d), when a hook kept it (then no query is projected again)."""
    attn = layer.self_attn
    rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if rope is None or not hasattr(attn, "q_proj"):
        raise ValueError(f"{type(attn).__name__} is not a Llama-style attention module (q_proj, k_proj, "
                         "apply_rotary_pos_emb): in-LLM and KV presses do not support this language model")
    b, length, _ = hidden.shape
    d = attn.head_dim
    if projected is None:
        projected, rows_of = attn.q_proj(layer.input_layernorm(gather_rows(hidden, rows))), None
    else:
        rows_of = rows
    q = (projected if rows_of is None else gather_rows(projected, rows_of)).view(b, rows.shape[1], -1, d)
    if attn.q_proj.out_features == 2 * attn.o_proj.in_features:  # output-gated (Qwen3.5, Qwen3-Next): [query | gate] per head
        q = q.view(b, rows.shape[1], -1, 2 * d)[..., :d]
    norm = hasattr(attn, "q_norm")  # Qwen3: RMSNorm per head before RoPE
    q = attn.q_norm(q) if norm else q
    cos, sin = (t.expand(b, *t.shape[1:]) for t in position_embeddings)
    q, _ = rope(q.transpose(1, 2), q.transpose(1, 2), gather_rows(cos, rows), gather_rows(sin, rows))
    if not keys:
        return q, None, attn.scaling
    k = attn.k_proj(layer.input_layernorm(hidden)).view(b, length, -1, d)
    k = attn.k_norm(k) if norm else k
    _, k = rope(k.transpose(1, 2), k.transpose(1, 2), cos, sin)
    return q, k, attn.scaling


def cut_mask(mask: Tensor | None, cols: Tensor, valid: Tensor, rows: Tensor | None, flash: bool,
             square_causal_ok: bool = False) -> Tensor | None:
    """The attention mask a layer gets when its keys are the columns ``cols`` (B, W) of the
    sequence ``mask`` was made for (``valid`` (B, W): False in padding) and, at prefill, its
    queries the ``rows`` (B, W) (None when decoding: the queries are the new tokens, unchanged).

    ``mask`` is what transformers passes the layers: None (no padding: SDPA runs causal / flash
    unmasked), (B, kv) for FlashAttention, or (B, 1, q, kv), bool (SDPA) or additive float
    (eager). A padded query row is let see every key, so that it stays finite (its output is
    padding). ``square_causal_ok``: the caller knows no row is padded (None stays None).
    """
    b, width = cols.shape
    if mask is None:
        if square_causal_ok:
            return None
        if flash:
            return valid.long()
        q = width if rows is not None else None
        return _causal(valid, q, rows is not None)
    if mask.ndim == 2:
        return mask.expand(b, -1).gather(1, cols) * valid.to(mask.dtype)
    if mask.ndim != 4:
        raise ValueError(f"in-LLM presses support SDPA, eager and flash attention masks; got {type(mask).__name__}")
    mask = mask.expand(b, *mask.shape[1:])
    heads, q = mask.shape[1], mask.shape[2]
    if rows is not None:
        mask = mask.gather(2, rows[:, None, :, None].expand(b, heads, rows.shape[1], mask.shape[3]))
        q = rows.shape[1]
    mask = mask.gather(3, cols[:, None, None, :].expand(b, heads, q, width))
    keys = valid[:, None, None, :]
    if mask.dtype == torch.bool:
        mask = mask & keys
        return mask | ~valid[:, None, :, None] if rows is not None else mask
    mask = mask.masked_fill(~keys, torch.finfo(mask.dtype).min)
    return mask.masked_fill(~valid[:, None, :, None], 0.0) if rows is not None else mask


def _causal(valid: Tensor, q: int | None, prefill: bool) -> Tensor:
    """(B, 1, q, kv) bool: causal, aligned to the last key, padding keys hidden."""
    b, kv = valid.shape
    q = kv if q is None else q
    cols = torch.arange(kv, device=valid.device)
    rows = torch.arange(kv - q, kv, device=valid.device)
    mask = (cols[None, :] <= rows[:, None])[None, None] & valid[:, None, None, :]
    return mask | ~valid[:, None, :, None] if prefill else mask


def decode_cut(mask: Tensor | None, cols: Tensor, valid: Tensor, prompt_width: int, kv: int, q: int,
               flash: bool) -> Tensor:
    """The mask of a decoding step (or a later turn) for a layer whose cache holds the prompt's
    ``cols`` (B, W) and every token appended since; ``mask`` covers ``prompt_width`` + the
    appended columns (``kv`` in all, the ``q`` new ones last) in the coordinates ``cols`` index."""
    grown = kv - prompt_width
    tail = torch.arange(prompt_width, kv, device=cols.device).expand(cols.shape[0], grown)
    all_cols = torch.cat([cols, tail], dim=1)
    all_valid = torch.cat([valid, valid.new_ones(cols.shape[0], grown)], dim=1)
    if mask is None:
        return all_valid.long() if flash else _causal(all_valid, q, False)
    return cut_mask(mask, all_cols, all_valid, None, flash)
