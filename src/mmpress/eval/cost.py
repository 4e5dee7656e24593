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


def qwen_vl_vision_flops(vision_cfg, grids_thw: list[list[int]]) -> tuple[float, float]:
    """FLOPs of a Qwen2-VL / Qwen2.5-VL vision tower over images / videos of ``grids_thw`` (t, h, w)
    patches: (tower, merger). Attention runs per temporal step (each of the t frames of a video is
    its own sequence); in Qwen2.5-VL only ``fullatt_block_indexes`` attend over a whole frame, the
    other blocks within windows of ``window_size`` pixels (``get_vision_window_index``)."""
    merge, patch = vision_cfg.spatial_merge_size, vision_cfg.patch_size
    qwen2_5 = hasattr(vision_cfg, "fullatt_block_indexes")
    qwen3 = hasattr(vision_cfg, "deepstack_visual_indexes")  # full attention, plain MLP, extra mergers
    width = vision_cfg.embed_dim if not (qwen2_5 or qwen3) else vision_cfg.hidden_size
    out = vision_cfg.out_hidden_size if qwen2_5 or qwen3 else vision_cfg.hidden_size
    inter = vision_cfg.intermediate_size if qwen2_5 or qwen3 else int(width * vision_cfg.mlp_ratio)
    depth = vision_cfg.depth
    full = {i % depth for i in vision_cfg.fullatt_block_indexes} if qwen2_5 else set(range(depth))
    side = max(1, vision_cfg.window_size // merge // patch) if qwen2_5 else 0  # window side, in merged tokens
    patches = sum(t * h * w for t, h, w in grids_thw)
    frame_sq = window_sq = 0.0  # sum of squared attention lengths, per block kind
    for t, h, w in grids_thw:
        frame_sq += t * (h * w) ** 2
        if qwen2_5:
            rows = [min(side, h // merge - i) for i in range(0, h // merge, side)]
            cols = [min(side, w // merge - j) for j in range(0, w // merge, side)]
            window_sq += t * sum((r * c * merge**2) ** 2 for r in rows for c in cols)
    embed = 2.0 * patches * vision_cfg.in_channels * vision_cfg.temporal_patch_size * patch**2 * width
    per_token = 4 * width**2 + (3 if qwen2_5 else 2) * width * inter  # qkv + proj, MLP (gated in 2.5)
    attn = 4.0 * width * (len(full) * frame_sq + (depth - len(full)) * window_sq)  # scores + values
    tower = embed + 2.0 * depth * patches * per_token + attn
    merged = patches / merge**2
    mergers = 1 + (len(vision_cfg.deepstack_visual_indexes) if qwen3 else 0)  # Qwen3-VL: one per DeepStack layer
    merger = 2.0 * mergers * merged * ((merge**2 * width) ** 2 + merge**2 * width * out)
    return tower, merger


def qwen_vl_prefill_flops(config, grids_thw: list[list[int]], seq_len: int, batch: int = 1) -> PrefillFlops:
    """FLOPs of one Qwen-VL prefill: the tower over every image and video of the batch
    (``grids_thw``, all rows together), the merger as the projector, and ``batch`` rows of
    ``seq_len`` LM tokens. A press after the tower lowers only the language-model part."""
    tower, merger = qwen_vl_vision_flops(config.vision_config, grids_thw) if grids_thw else (0.0, 0.0)
    text_cfg = config.text_config
    language = transformer_flops(text_cfg, seq_len, batch=batch, causal=True)
    language += 2.0 * batch * text_cfg.hidden_size * text_cfg.vocab_size  # lm_head, last token only
    return PrefillFlops(tower, merger, language)


def prefill_flops(config, inputs: dict, seq_len: int) -> PrefillFlops:
    """FLOPs of the prefill of ``inputs`` (a batch as the model takes it) with ``seq_len`` LM
    tokens per row: Qwen-VL models (a ``spatial_merge_size`` tower) or LLaVA."""
    batch = inputs["input_ids"].shape[0]
    if hasattr(config.vision_config, "spatial_merge_size"):
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in inputs[key].tolist()]
        return qwen_vl_prefill_flops(config, grids, seq_len, batch=batch)
    images = inputs["pixel_values"].shape[0] / batch if inputs.get("pixel_values") is not None else 0
    return llava_prefill_flops(config, seq_len, num_images=images, batch=batch)


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
