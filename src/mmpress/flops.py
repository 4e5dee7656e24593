"""Analytical FLOPs of a transformer prefill: the core every family's count is built from.

FLOPs count multiply-adds as 2 FLOPs, for the matmuls that dominate a transformer (projections,
MLP, attention scores and values); norms, activations and softmax are ignored. A family file
(``models/<family>.py``) counts its vision tower and projector with these and its language model
with :func:`language_flops`, each decoder layer at its own length (``layer_seq_len``: an in-LLM
press's cuts). Below ``models/`` and ``eval/``: both import it.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby


def _get(cfg, *names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def transformer_flops(cfg, seq_len: int, batch: int = 1, causal: bool = False, layers: int | None = None) -> float:
    """Forward FLOPs of a stack of ``layers`` (default: all of ``cfg``'s) transformer blocks over
    ``seq_len`` tokens (queries and keys)."""
    hidden = cfg.hidden_size
    heads = cfg.num_attention_heads
    head_dim = _get(cfg, "head_dim", default=hidden // heads)
    kv_heads = _get(cfg, "num_key_value_heads", default=heads)
    inter = _get(cfg, "intermediate_size", default=None) or int(hidden * _get(cfg, "mlp_ratio", default=4))
    # decoder LMs with grouped KV heads (Llama, Qwen2, Mistral, SmolLM) use gated (3-matrix) MLPs;
    # ViT towers (CLIP, SigLIP, DINOv2) use plain 2-matrix MLPs
    mlp = (3 if hasattr(cfg, "num_key_value_heads") else 2) * hidden * inter
    proj = hidden * head_dim * (2 * heads + 2 * kv_heads)  # q, o and k, v
    attn = 2 * heads * head_dim * seq_len * (seq_len + 1) / 2 if causal else 2 * heads * head_dim * seq_len**2
    layers = cfg.num_hidden_layers if layers is None else layers
    return 2.0 * batch * layers * (seq_len * (proj + mlp) + attn)


def layer_lengths(n_layers: int, seq_len: int, layer_seq_len=None) -> list[int]:
    """The sequence width each of ``n_layers`` decoder layers runs on: ``seq_len``, and from each
    ``(layer, width)`` of ``layer_seq_len`` on, that width (ValueError if a layer is out of range
    or the cuts are not ascending)."""
    lengths, last = [seq_len] * n_layers, -1
    for layer, width in layer_seq_len or ():
        if not last < layer < n_layers:
            raise ValueError(f"layer_seq_len {list(layer_seq_len)}: cuts must be at ascending layers in "
                             f"0..{n_layers - 1}")
        lengths[layer:], last = [width] * (n_layers - layer), layer
    return lengths


def language_flops(text_cfg, seq_len: int, batch: int = 1, layer_seq_len=None) -> float:
    """Prefill FLOPs of a decoder LM (causal) over ``seq_len`` tokens per row, each layer at its
    own width (``layer_seq_len``: ``[(layer, width), ...]``, the widths from those layers on), and
    the LM head on the last token."""
    runs = groupby(layer_lengths(text_cfg.num_hidden_layers, seq_len, layer_seq_len))
    flops = sum(transformer_flops(text_cfg, width, batch=batch, causal=True, layers=len(list(run)))
                for width, run in runs)
    return flops + 2.0 * batch * text_cfg.hidden_size * text_cfg.vocab_size  # lm_head, last token only


@dataclass
class PrefillFlops:
    vision: float
    projector: float
    language: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language
