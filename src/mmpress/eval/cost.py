"""Cost: analytical FLOPs per stage, KV-cache bytes, and measured prefill time.

FLOPs count multiply-adds as 2 FLOPs, for the matmuls that dominate a transformer (projections,
MLP, attention scores and values); norms, activations and softmax are ignored. The prefill of
a pressed model costs vision tower + projector (unchanged: every image is still encoded) plus
the language model over the pressed sequence, so the speedup a press can reach is bounded by
``flops(unpressed) / flops(pressed)``: the "FLOPs-ratio limit" reported next to measured speedups.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def _get(cfg, *names, default=None):
    for name in names:
        value = getattr(cfg, name, None)
        if value is not None:
            return value
    return default


def transformer_flops(cfg, seq_len: int, batch: int = 1, causal: bool = False) -> float:
    """Forward FLOPs of a stack of transformer blocks over ``seq_len`` tokens."""
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
    return 2.0 * batch * cfg.num_hidden_layers * (seq_len * (proj + mlp) + attn)


@dataclass
class PrefillFlops:
    vision: float
    projector: float
    language: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language


def llava_prefill_flops(config, seq_len: int, num_images: int = 1, batch: int = 1) -> PrefillFlops:
    """FLOPs of one LLaVA prefill: ``num_images`` per row, ``seq_len`` LM tokens per row."""
    vision_cfg, text_cfg = config.vision_config, config.text_config
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    vision = transformer_flops(vision_cfg, patches + 1, batch=batch * num_images)
    n_visual = patches if config.vision_feature_select_strategy == "default" else patches + 1
    projector = 2.0 * batch * num_images * n_visual * (
        vision_cfg.hidden_size * text_cfg.hidden_size + text_cfg.hidden_size**2
    )
    language = transformer_flops(text_cfg, seq_len, batch=batch, causal=True)
    language += 2.0 * batch * text_cfg.hidden_size * text_cfg.vocab_size  # lm_head, last token only
    return PrefillFlops(vision, projector, language)


def kv_cache_bytes(text_cfg, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32) -> int:
    heads = text_cfg.num_attention_heads
    head_dim = _get(text_cfg, "head_dim", default=text_cfg.hidden_size // heads)
    kv_heads = _get(text_cfg, "num_key_value_heads", default=heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    return 2 * text_cfg.num_hidden_layers * kv_heads * head_dim * seq_len * batch * itemsize


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> float:
    """Median wall-clock seconds of ``fn()`` (synchronising CUDA if it is in use)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
