"""Cost: analytical FLOPs per stage, KV-cache bytes, and measured prefill and decode time.

FLOPs count multiply-adds as 2 FLOPs, for the matmuls that dominate a transformer (projections,
MLP, attention scores and values); norms, activations and softmax are ignored. The prefill of
a pressed model costs vision tower + projector (unchanged: every image is still encoded) plus
the language model over the pressed sequence, so the speedup a press can reach is bounded by
``flops(unpressed) / flops(pressed)``: the "FLOPs-ratio limit" reported next to measured speedups.

Each decoder layer is counted at its own length. A ``pre_llm`` press shortens every layer's input;
an ``in_llm`` press cutting the sequence to width W at layer k leaves layers < k at the LM-input
length L and runs layers >= k on W tokens (queries and keys: the earlier layers' cache is not
read again), given as ``layer_seq_len = [(k, W), ...]`` (the adapter's ``press.stats``); a ``kv``
press runs the prefill unpressed and shortens only the cache decoding reads (``kv_len`` at every
layer). :func:`stats_lengths` reads both from a press's stats.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from itertools import groupby
from typing import Callable

import torch


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


def stats_lengths(stats: dict, cache: bool = False) -> tuple[int, list | None]:
    """``(seq_len, layer_seq_len)`` of a press's ``stats``: what the prefill's layers run on, or
    (``cache``) what the KV cache holds after it (a ``kv`` press: ``kv_len`` at every layer)."""
    if cache and "kv_len" in stats:
        return stats["kv_len"], None
    return stats.get("pressed_seq_len", stats.get("seq_len")), stats.get("layer_seq_len") or None


@dataclass
class PrefillFlops:
    vision: float
    projector: float
    language: float

    @property
    def total(self) -> float:
        return self.vision + self.projector + self.language


def llava_prefill_flops(config, seq_len: int, num_images: int = 1, batch: int = 1,
                        layer_seq_len=None) -> PrefillFlops:
    """FLOPs of one LLaVA prefill: ``num_images`` per row, ``seq_len`` LM tokens per row (from
    each ``(layer, width)`` of ``layer_seq_len`` on, ``width``: :func:`language_flops`)."""
    vision_cfg, text_cfg = config.vision_config, config.text_config
    patches = (vision_cfg.image_size // vision_cfg.patch_size) ** 2
    vision = transformer_flops(vision_cfg, patches + 1, batch=batch * num_images)
    n_visual = patches if config.vision_feature_select_strategy == "default" else patches + 1
    projector = 2.0 * batch * num_images * n_visual * (
        vision_cfg.hidden_size * text_cfg.hidden_size + text_cfg.hidden_size**2
    )
    return PrefillFlops(vision, projector, language_flops(text_cfg, seq_len, batch, layer_seq_len))


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


def qwen_vl_prefill_flops(config, grids_thw: list[list[int]], seq_len: int, batch: int = 1,
                          layer_seq_len=None) -> PrefillFlops:
    """FLOPs of one Qwen-VL prefill: the tower over every image and video of the batch
    (``grids_thw``, all rows together), the merger as the projector, and ``batch`` rows of
    ``seq_len`` LM tokens (``layer_seq_len``: :func:`language_flops`). A press after the tower
    lowers only the language-model part."""
    tower, merger = qwen_vl_vision_flops(config.vision_config, grids_thw) if grids_thw else (0.0, 0.0)
    return PrefillFlops(tower, merger, language_flops(config.text_config, seq_len, batch, layer_seq_len))


def prefill_flops(config, inputs: dict, seq_len: int, layer_seq_len=None) -> PrefillFlops:
    """FLOPs of the prefill of ``inputs`` (a batch as the model takes it) with ``seq_len`` LM
    tokens per row (``layer_seq_len``: :func:`language_flops`): Qwen-VL models (a
    ``spatial_merge_size`` tower) or LLaVA."""
    batch = inputs["input_ids"].shape[0]
    if hasattr(config.vision_config, "spatial_merge_size"):
        grids = [g for key in ("image_grid_thw", "video_grid_thw") if inputs.get(key) is not None
                 for g in inputs[key].tolist()]
        return qwen_vl_prefill_flops(config, grids, seq_len, batch=batch, layer_seq_len=layer_seq_len)
    images = inputs["pixel_values"].shape[0] / batch if inputs.get("pixel_values") is not None else 0
    return llava_prefill_flops(config, seq_len, num_images=images, batch=batch, layer_seq_len=layer_seq_len)


def kv_cache_bytes(text_cfg, seq_len: int, batch: int = 1, dtype: torch.dtype = torch.float32,
                   layer_seq_len=None) -> int:
    """Bytes of the keys and values a decoder LM caches for ``batch`` rows of ``seq_len`` tokens
    (from each ``(layer, width)`` of ``layer_seq_len`` on, ``width``: an ``in_llm`` press's cache)."""
    heads = text_cfg.num_attention_heads
    head_dim = _get(text_cfg, "head_dim", default=text_cfg.hidden_size // heads)
    kv_heads = _get(text_cfg, "num_key_value_heads", default=heads)
    itemsize = torch.empty((), dtype=dtype).element_size()
    entries = sum(layer_lengths(text_cfg.num_hidden_layers, seq_len, layer_seq_len))
    return 2 * kv_heads * head_dim * entries * batch * itemsize


def prompt_cache_bytes(model, stats: dict, batch: int) -> int:
    """Bytes of the prompt's KV cache ``model`` holds after a (pressed) prefill of ``batch`` rows
    whose token counts are ``stats`` (a press's, or ``{"seq_len": L}`` unpressed), each layer at
    its own length."""
    seq_len, layer_seq_len = stats_lengths(stats, cache=True)
    return kv_cache_bytes(model.config.get_text_config(), seq_len, batch=batch, dtype=next(model.parameters()).dtype,
                          layer_seq_len=layer_seq_len)


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


class _Stamps:
    """A logits processor: ``generate`` calls it once per new token, as soon as that token's
    logits exist; it notes the time (after the device finishes) and leaves the scores alone."""

    def __init__(self):
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        if scores.is_cuda:
            torch.cuda.synchronize(scores.device)
        self.times.append(time.perf_counter())
        return scores


def decode_seconds(model, inputs: dict, steps: int = 8) -> float:
    """Mean seconds of one greedy decode step: ``generate`` of ``steps`` new tokens (no early
    stop) from ``inputs``, timed from the first token's logits (the prefill's) to the last's, so
    the prefill is left out. Run it under a press to time decoding on the press's cache."""
    if not isinstance(steps, int) or steps < 2:
        raise ValueError(f"decode steps must be an int >= 2 (the first token comes from the prefill), got {steps!r}")
    from transformers import LogitsProcessorList

    stamps, config = _Stamps(), model.generation_config
    pad = config.pad_token_id if config.pad_token_id is not None else 0
    with torch.inference_mode():
        model.generate(**inputs, max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                       pad_token_id=pad, logits_processor=LogitsProcessorList([stamps]))
    if len(stamps.times) != steps:
        raise RuntimeError(f"generate produced {len(stamps.times)} tokens, expected {steps}")
    return (stamps.times[-1] - stamps.times[0]) / (steps - 1)
