"""Prefill speed of every press on real-sized random models of a family's shape.

Compute cost does not depend on the weights, so a random model of the real shape times the
same as the trained one. The LLaVA shape is the peer baseline's (shared/MEASURED.md): a CLIP
tower of 6 layers x 384 at 336 px (24 x 24 = 576 patches) and a Qwen2 language model of 12
layers x 896, with 576 image + ~33 text tokens, so figures compare like for like. The Qwen-VL
shape scales Qwen2.5-VL-7B down the same way (:class:`QwenShape`): a windowed vision tower of
8 x 640 and the same 12 x 896 language model with M-RoPE, fed an image of 1024 tokens or a video
of 16 frames (8 temporal steps x 256 tokens).
"""

from __future__ import annotations

import inspect
import statistics
import time
from dataclasses import dataclass, field, replace

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from mmpress.eval.cost import decode_seconds, prefill_flops, prompt_cache_bytes, stats_lengths, time_call
from mmpress.presses.base import PRESSES, get_press

IMAGE_TOKEN = 3
VIDEO_TOKEN, VISION_START, VISION_END = 4, 5, 6
ARCHS = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl")


@dataclass
class LMShape:
    """The language model both families' CPU shapes share: a Qwen2 of 12 x 896, and the prompt's
    text tokens."""

    lm_layers: int = 12
    lm_hidden: int = 896
    lm_intermediate: int = 4864
    lm_heads: int = 14
    lm_kv_heads: int = 2
    vocab: int = 32000
    text_tokens: int = 33


@dataclass
class Shape(LMShape):
    vision_layers: int = 6
    vision_hidden: int = 384
    image_size: int = 336
    patch_size: int = 14


def llava_shaped(shape: Shape = Shape(), seed: int = 0, attn: str = "sdpa") -> LlavaForConditionalGeneration:
    torch.manual_seed(seed)
    vision = CLIPVisionConfig(hidden_size=shape.vision_hidden, intermediate_size=4 * shape.vision_hidden,
                              num_hidden_layers=shape.vision_layers, num_attention_heads=max(1, shape.vision_hidden // 64),
                              image_size=shape.image_size, patch_size=shape.patch_size)
    text = Qwen2Config(vocab_size=shape.vocab, hidden_size=shape.lm_hidden, intermediate_size=shape.lm_intermediate,
                       num_hidden_layers=shape.lm_layers, num_attention_heads=shape.lm_heads,
                       num_key_value_heads=shape.lm_kv_heads, max_position_embeddings=4096, pad_token_id=0)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    return LlavaForConditionalGeneration(config).eval()


def prompt_batch(shape: Shape, batch: int = 1, seed: int = 0) -> dict[str, torch.Tensor]:
    """``batch`` left-padded prompts: a few system tokens, the image, a question of ragged length."""
    g = torch.Generator().manual_seed(seed)
    n_img = (shape.image_size // shape.patch_size) ** 2
    lengths = [shape.text_tokens - 4 * (i % 4) for i in range(batch)]  # ragged: 33, 29, 25, 21, ...
    width = n_img + max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        text = torch.randint(10, shape.vocab, (length,), generator=g)
        row = torch.cat([text[:5], torch.full((n_img,), IMAGE_TOKEN), text[5:]])
        ids[i, width - row.numel():], mask[i, width - row.numel():] = row, 1
    pixels = torch.randn(batch, 3, shape.image_size, shape.image_size, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@dataclass
class QwenShape(LMShape):
    """Qwen2.5-VL-7B (vision 32 x 1280, windows of 112 px, full attention in every 8th block;
    LM 28 x 3584) scaled for a CPU as :class:`Shape` scales LLaVA: vision 8 x 640 with full
    attention in blocks 3 and 7, LM 12 x 896. ``arch="qwen2_vl"`` gives Qwen2-VL's tower instead
    (full attention everywhere, plain MLP of ``4 x vision_hidden``). An image of ``image_size`` px
    is (image_size / 14)^2 patches, a quarter as many tokens (896 px: 1024); a video has
    ``frames`` frames of ``frame_size`` px, two frames per temporal step (16 x 448 px: 8 x 256)."""

    arch: str = "qwen2_5_vl"
    vision_layers: int = 8
    vision_hidden: int = 640
    vision_intermediate: int | None = None  # None: 1710 / 1280 of the width, as in 7B
    fullatt_blocks: tuple[int, ...] | None = None  # None: every 4th block, the last one included
    window_size: int = 112
    image_size: int = 896
    frame_size: int = 448
    frames: int = 16
    patch_size: int = 14
    merge: int = 2
    temporal_patch: int = 2
    extra: dict = field(default_factory=dict)  # other config fields, e.g. for tests

    def grid(self, kind: str) -> tuple[int, int, int]:
        """(t, h, w) patches of one image or video."""
        side = (self.image_size if kind == "image" else self.frame_size) // self.patch_size
        t = 1 if kind == "image" else -(-self.frames // self.temporal_patch)
        return t, side, side


def qwen_shaped(shape: QwenShape = QwenShape(), seed: int = 0, attn: str = "sdpa"):
    """A random Qwen2-VL / Qwen2.5-VL model of ``shape``."""
    from transformers import (Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLConfig,
                              Qwen2VLForConditionalGeneration)

    torch.manual_seed(seed)
    half = shape.lm_hidden // shape.lm_heads // 2  # M-RoPE splits the rotary half of a head as 7B does
    mrope = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=shape.vocab, hidden_size=shape.lm_hidden, intermediate_size=shape.lm_intermediate,
                num_hidden_layers=shape.lm_layers, num_attention_heads=shape.lm_heads,
                num_key_value_heads=shape.lm_kv_heads, max_position_embeddings=32768,
                pad_token_id=0, bos_token_id=1, eos_token_id=2,
                rope_scaling={"type": "mrope", "mrope_section": mrope})
    vision = dict(depth=shape.vision_layers, num_heads=max(1, shape.vision_hidden // 64), patch_size=shape.patch_size,
                  spatial_merge_size=shape.merge, temporal_patch_size=shape.temporal_patch, in_channels=3)
    tokens = dict(image_token_id=IMAGE_TOKEN, video_token_id=VIDEO_TOKEN, vision_start_token_id=VISION_START,
                  vision_end_token_id=VISION_END)
    if shape.arch == "qwen2_5_vl":
        depth = shape.vision_layers
        full = shape.fullatt_blocks or tuple(range(min(3, depth - 1), depth, 4))
        inter = shape.vision_intermediate or round(shape.vision_hidden * 1710 / 1280)
        config = Qwen2_5_VLConfig(vision_config=dict(hidden_size=shape.vision_hidden, intermediate_size=inter,
                                                     out_hidden_size=shape.lm_hidden, window_size=shape.window_size,
                                                     fullatt_block_indexes=list(full), **vision),
                                  text_config=text, **tokens, **shape.extra)
        cls = Qwen2_5_VLForConditionalGeneration
    elif shape.arch == "qwen2_vl":
        config = Qwen2VLConfig(vision_config=dict(embed_dim=shape.vision_hidden, hidden_size=shape.lm_hidden,
                                                  mlp_ratio=4, **vision),
                               text_config=text, **tokens, **shape.extra)
        cls = Qwen2VLForConditionalGeneration
    elif shape.arch == "qwen3_vl":  # full attention, DeepStack features from 3 blocks, interleaved M-RoPE
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        depth = shape.vision_layers
        inter = shape.vision_intermediate or shape.vision_hidden * 4
        text["head_dim"] = shape.lm_hidden // shape.lm_heads
        text["rope_scaling"] = {"rope_type": "default", "mrope_section": mrope, "mrope_interleaved": True}
        config = Qwen3VLConfig(vision_config=dict(hidden_size=shape.vision_hidden, intermediate_size=inter,
                                                  out_hidden_size=shape.lm_hidden, num_position_embeddings=2304,
                                                  deepstack_visual_indexes=[depth // 4, depth // 2, 3 * depth // 4],
                                                  **vision),
                               text_config=text, **tokens, **shape.extra)
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown Qwen-VL arch {shape.arch!r}: qwen2_vl, qwen2_5_vl or qwen3_vl")
    config._attn_implementation = attn
    return cls(config).eval()


def qwen_prompt_batch(model, shape: QwenShape, kind: str = "image", batch: int = 1, seed: int = 0) -> dict:
    """``batch`` left-padded prompts as the Qwen-VL processor lays them out: a few system tokens,
    vision-start, the image's (or video's) tokens, vision-end, a question of ragged length; the
    pixels as flattened patches with their ``{kind}_grid_thw``."""
    if kind not in ("image", "video"):
        raise ValueError(f"unknown input {kind!r}: image or video")
    g = torch.Generator().manual_seed(seed)
    t, h, w = shape.grid(kind)
    token = IMAGE_TOKEN if kind == "image" else VIDEO_TOKEN
    n_vis = t * h * w // shape.merge**2
    # Qwen3-VL lays a video out frame by frame: a timestamp token, then the frame between
    # vision-start/end (its processor writes "<t seconds>"; one text token stands for it here)
    steps = t if kind == "video" and shape.arch == "qwen3_vl" else 1
    lengths = [shape.text_tokens - 4 * (i % 4) for i in range(batch)]
    width = n_vis + (3 if steps > 1 else 2) * steps + max(lengths)
    ids = torch.zeros(batch, width, dtype=torch.long)
    mask = torch.zeros(batch, width, dtype=torch.long)
    for i, length in enumerate(lengths):
        text = torch.randint(10, shape.vocab, (length,), generator=g)
        frame = [torch.tensor([VISION_START]), torch.full((n_vis // steps,), token), torch.tensor([VISION_END])]
        visual = frame if steps == 1 else [x for _ in range(steps) for x in (torch.tensor([11]), *frame)]
        row = torch.cat([text[:5], *visual, text[5:]])
        ids[i, width - row.numel():], mask[i, width - row.numel():] = row, 1
    patch_dim = 3 * shape.temporal_patch * shape.patch_size**2
    pixels = torch.randn(batch * t * h * w, patch_dim, generator=g)
    key = "pixel_values" if kind == "image" else "pixel_values_videos"
    inputs = {"input_ids": ids, "attention_mask": mask, key: pixels,
              f"{kind}_grid_thw": torch.tensor([[t, h, w]] * batch)}
    if "mm_token_type_ids" in inspect.signature(model.forward).parameters:  # transformers >= 5.24
        inputs["mm_token_type_ids"] = (ids == IMAGE_TOKEN).int() + 2 * (ids == VIDEO_TOKEN).int()
    return inputs


def shaped(arch: str, shape=None, kind: str = "image", batch: int = 1, seed: int = 0):
    """(model, inputs) of a family: ``arch`` in :data:`ARCHS`, ``shape`` a :class:`Shape` (llava)
    or :class:`QwenShape` (qwen2_vl, qwen2_5_vl; None: the default one), ``kind`` image or video."""
    if arch == "llava":
        if kind != "image":
            raise ValueError("the LLaVA-1.5 shape takes images only: --input image")
        shape = shape or Shape()
        return llava_shaped(shape, seed=seed), prompt_batch(shape, batch=batch, seed=seed)
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}: {', '.join(ARCHS)}")
    shape = replace(shape or QwenShape(), arch=arch)
    model = qwen_shaped(shape, seed=seed)
    return model, qwen_prompt_batch(model, shape, kind=kind, batch=batch, seed=seed)


def visual_tokens(config, inputs: dict) -> int:
    """Visual tokens (image and video) of the row holding the most."""
    ids = inputs["input_ids"]
    visual = ids == config.image_token_id
    if getattr(config, "video_token_id", None) is not None:
        visual |= ids == config.video_token_id
    return int(visual.sum(1).max())


def encode_visuals(model, inputs: dict) -> None:
    """The vision tower and projector alone (the model's ``get_image_features`` /
    ``get_video_features``) over every image and video of ``inputs``."""
    config = model.config
    if inputs.get("pixel_values") is not None:
        if "image_grid_thw" in inputs:
            model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
        else:
            model.get_image_features(pixel_values=inputs["pixel_values"],
                                     vision_feature_layer=config.vision_feature_layer,
                                     vision_feature_select_strategy=config.vision_feature_select_strategy)
    if inputs.get("pixel_values_videos") is not None:
        model.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])


def run_prefill(model, inputs: dict, presses: list[str], keeps: list[int], repeats: int = 5, progress=None,
                split: bool = True, decode_steps: int = 0) -> dict:
    """Median prefill seconds (one forward, ``logits_to_keep=1`` as generate's prefill) for the
    unpressed model and every press x budget (a press that sets its own budget: once, ``keep``
    None); speedup next to its FLOPs-ratio limit (each decoder layer at its own length: an
    ``in_llm`` press's layers after its cut count the cut width), and the press's own overhead
    (time inside ``press.press`` / ``press_kv``, summed per forward; not the attention an in-LLM or
    KV press reads) as a fraction of the unpressed prefill.

    Cells are timed round-robin (one warm-up round, then ``repeats`` rounds, each timing every
    cell once), so slow drifts of a shared machine hit the baseline and the presses alike. With
    ``split``, the vision tower + projector alone is one more cell: the vision / language-model
    split of the unpressed prefill, which bounds every press acting after the tower. With
    ``decode_steps`` (>= 2), each round also times that many greedy decode steps after a prefill
    (:func:`~mmpress.eval.cost.decode_seconds`, under the press): decode tokens/s and its speedup
    over the unpressed model, where a ``kv`` press (its prefill unpressed) gains.

    Each row: ``press``, ``keep``, ``stage``, ``seconds``, ``speedup``, ``limit``, ``efficiency``,
    ``overhead``; ``kept_tokens`` (visual tokens per image after the last stage), ``avg_tokens``
    (per image, averaged over the decoder layers), ``layer_kept`` (in_llm: ``[layer, kept per
    image]``), ``kv_bytes`` / ``kv_ratio`` (the prompt's KV cache after the prefill, each layer at
    its own length); with ``decode_steps``: ``decode_s`` (per step), ``decode_tok_s`` (all rows)
    and ``decode_speedup``.

    Returns ``{"rows", "skipped", "vision_seconds", "vision_share", "flops"}``: ``skipped`` maps a
    press the family cannot run (it raised a ValueError in the warm-up, e.g. a [CLS]-attention
    press on a tower without [CLS], or an in-LLM press at a layer the model lacks), or ``"name
    keep=k"`` for a budget the press refuses, to its reason; ``flops`` is the unpressed split."""
    if decode_steps and (not isinstance(decode_steps, int) or decode_steps < 2):
        raise ValueError(f"decode_steps must be 0 or an int >= 2, got {decode_steps!r}")
    config = model.config
    n_vis = visual_tokens(config, inputs)
    batch, width = inputs["input_ids"].shape
    cells = [dict(press="none", keep=n_vis, obj=None, times=[], decode=[], spent=[], stats=None)]
    skipped = {}
    for name in presses:
        own = name in PRESSES and not PRESSES[name].needs_budget  # e.g. PDrop's ratios, VTW: one cell, keep None
        for keep in [None] if own else [k for k in keeps if k < n_vis]:
            try:
                press = get_press(name) if own else get_press(name, keep=keep)
            except ValueError as e:  # a budget this press refuses (e.g. SparseVLM's official settings only)
                if name not in PRESSES:
                    raise
                skipped[f"{name} keep={keep}"] = " ".join(str(e).split())
                continue
            cells.append(dict(press=name, keep=keep, obj=_timed(press), times=[], decode=[], spent=[], stats=None))
    if split:
        cells.append(dict(press="vision", keep=n_vis, obj="vision", times=[]))

    def forward():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    def vision():
        with torch.inference_mode():
            encode_visuals(model, inputs)

    def decode():
        return decode_seconds(model, inputs, decode_steps) if decode_steps else None

    for round_ in range(repeats + 1):
        for cell in list(cells):
            press = cell["obj"]
            if press is None:  # the baseline runs with no hooks at all: the true unpressed model
                seconds, step = time_call(forward, repeats=1, warmup=0), decode()
            elif press == "vision":
                seconds, step = time_call(vision, repeats=1, warmup=0), None
            else:
                try:
                    with press(model):
                        spent = press.spent_s
                        seconds = time_call(forward, repeats=1, warmup=0)
                        spent, cell["stats"] = press.spent_s - spent, dict(press.stats)
                        step = decode()
                except ValueError as e:
                    if round_:
                        raise
                    skipped[cell["press"]] = " ".join(str(e).split())
                    cells.remove(cell)
                    continue
                if round_:
                    cell["spent"].append(spent)
            if round_:  # round 0 warms up
                cell["times"].append(seconds)
                if step is not None:
                    cell["decode"].append(step)
        if progress is not None:
            progress()

    vision_seconds = statistics.median(cells.pop()["times"]) if split else None
    base = statistics.median(cells[0]["times"])
    base_decode = statistics.median(cells[0]["decode"]) if decode_steps else None
    base_flops = prefill_flops(config, inputs, width)
    base_kv = prompt_cache_bytes(model, {"seq_len": width}, batch)
    rows = []
    for cell in cells:
        seconds = statistics.median(cell["times"])
        press, stats = cell["obj"], cell["stats"]
        flops = base_flops if press is None else prefill_flops(config, inputs, *stats_lengths(stats))
        kv = base_kv if press is None else prompt_cache_bytes(model, stats, batch)
        speedup, limit = base / seconds, base_flops.total / flops.total
        overhead = 0.0 if press is None else statistics.median(cell["spent"]) / base
        row = dict(press=cell["press"], keep=cell["keep"], stage="none" if press is None else press.stage,
                   seconds=seconds, speedup=speedup, limit=limit, efficiency=speedup / limit, overhead=overhead,
                   **_tokens(cell["keep"], stats), kv_bytes=kv, kv_ratio=kv / base_kv)
        if decode_steps:
            step = statistics.median(cell["decode"])
            row.update(decode_s=step, decode_tok_s=batch / step, decode_speedup=base_decode / step)
        rows.append(row)
    split_flops = dict(vision=base_flops.vision + base_flops.projector, language=base_flops.language)
    if split:  # the unpressed row carries the split
        rows[0].update(vision_seconds=vision_seconds, vision_share=vision_seconds / base,
                       vision_flops_share=split_flops["vision"] / base_flops.total)
    return dict(rows=rows, skipped=skipped, vision_seconds=vision_seconds,
                vision_share=None if vision_seconds is None else vision_seconds / base, flops=split_flops)


def _tokens(keep: int, stats: dict | None) -> dict:
    """Visual tokens per image of a row: after the last stage, averaged over the decoder layers, and
    (in_llm) from each pressed layer on; ``stats`` None: the unpressed model (``keep``: all)."""
    if stats is None:
        return dict(kept_tokens=float(keep), avg_tokens=float(keep), layer_kept=None)
    images, kept = max(1, stats["images"]), stats["kept_visual_tokens"]
    layer_kept = [[layer, n / images] for layer, n in stats.get("layer_kept") or ()] or None
    return dict(kept_tokens=kept / images, avg_tokens=stats.get("layer_avg_visual_tokens", kept) / images,
                layer_kept=layer_kept)


def bench_prefill(model, inputs: dict, presses: list[str], keeps: list[int], repeats: int = 5, progress=None,
                  decode_steps: int = 0) -> list[dict]:
    """:func:`run_prefill`'s rows, without the vision split."""
    return run_prefill(model, inputs, presses, keeps, repeats=repeats, progress=progress, split=False,
                       decode_steps=decode_steps)["rows"]


def _timed(press):
    """Adds the seconds of the press's own work (``press.press``, and ``press_kv`` of a KV press)
    inside the real run to ``press.spent_s``; a call nested in another (a ``press_kv`` that calls
    ``press``) counts once."""
    press.spent_s, busy = 0.0, []
    for method in ("press", "press_kv"):
        inner = getattr(press, method, None)
        if inner is None:
            continue

        def timed(*args, _inner=inner, **kwargs):
            if busy:
                return _inner(*args, **kwargs)
            busy.append(True)
            start = time.perf_counter()
            try:
                return _inner(*args, **kwargs)
            finally:
                press.spent_s += time.perf_counter() - start
                busy.pop()

        setattr(press, method, timed)  # an instance attribute shadows the method
    return press
