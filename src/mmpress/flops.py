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



def vision_block_costs(vision_cfg) -> tuple[float, float, float, float]:
    """(per_token, per_mlp_token, per_attention, per_patch): a vision block's FLOPs per token
    entering its attention (q, k, v, o projections), per token entering its MLP, per unit of its
    attention work (a sequence of S tokens: S^2 query-key pairs, scores and values), and the patch
    embedding's per patch entering the tower where the family counts it (Qwen-VL's 3-D patch
    embedding; 0 for the ViT towers, whose count leaves it out). As the families count their
    towers: ``transformer_flops`` for CLIP / SigLIP / DINOv2 (plain MLP),
    ``models/qwen_vl.vision_flops`` for Qwen2-VL (``embed_dim``, MLP of ``mlp_ratio``) and
    Qwen2.5-VL (gated MLP); DINOv2's SwiGLU option as a gated MLP."""
    width = _get(vision_cfg, "embed_dim", "hidden_size")  # Qwen2-VL: hidden_size is the LM's width
    inter = _get(vision_cfg, "intermediate_size", default=None) or int(width * _get(vision_cfg, "mlp_ratio", default=4))
    gated = hasattr(vision_cfg, "fullatt_block_indexes") or bool(getattr(vision_cfg, "use_swiglu_ffn", False))
    temporal = getattr(vision_cfg, "temporal_patch_size", None)
    per_patch = 2.0 * vision_cfg.in_channels * temporal * vision_cfg.patch_size**2 * width if temporal else 0.0
    return 8.0 * width**2, 2.0 * (3 if gated else 2) * width * inter, 4.0 * width, per_patch


def tower_flops(vision_cfg, block_tokens, block_attention) -> float:
    """FLOPs of a vision tower whose block i takes ``block_tokens[i]`` tokens (summed over the
    items) with attention work ``block_attention[i]`` (the sum over its attention sequences, an
    image, a frame or a window, of their length squared): an in-vision press's tower, block by
    block (``Stats.vision_block_tokens`` / ``vision_block_attention``). A block's MLP runs on the
    tokens leaving it, the next block's (ToMe merges between a block's attention and its MLP); the
    last block's on ``block_tokens[depth]`` where given (one entry more than the blocks), else on
    those entering it. The patch embedding counts the tokens entering the first block."""
    depth = len(block_attention)
    if len(block_tokens) not in (depth, depth + 1):
        raise ValueError(f"one attention count per block: {len(block_attention)} counts for {len(block_tokens)} "
                         "token counts (the blocks', and optionally the tokens leaving the last)")
    if not depth:
        return 0.0
    per_token, per_mlp, per_attention, per_patch = vision_block_costs(vision_cfg)
    leaving = list(block_tokens[1:]) + ([] if len(block_tokens) > depth else [block_tokens[-1]])
    return per_patch * block_tokens[0] + sum(per_token * n + per_mlp * m + per_attention * q
                                             for n, m, q in zip(block_tokens, leaving, block_attention))
