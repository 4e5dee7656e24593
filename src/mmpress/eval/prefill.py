"""Prefill speed of every press on a real-sized LLaVA-1.5-shaped model with random weights.

Compute cost does not depend on the weights, so a random model of the real shape times the
same as the trained one. The default shape is the peer baseline's (shared/MEASURED.md): a CLIP
tower of 6 layers x 384 at 336 px (24 x 24 = 576 patches) and a Qwen2 language model of 12
layers x 896, with 576 image + ~33 text tokens, so figures compare like for like.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration, Qwen2Config

from mmpress.eval.cost import llava_prefill_flops, time_call
from mmpress.presses.base import get_press

IMAGE_TOKEN = 3


@dataclass
class Shape:
    vision_layers: int = 6
    vision_hidden: int = 384
    image_size: int = 336
    patch_size: int = 14
    lm_layers: int = 12
    lm_hidden: int = 896
    lm_intermediate: int = 4864
    lm_heads: int = 14
    lm_kv_heads: int = 2
    vocab: int = 32000
    text_tokens: int = 33


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


def bench_prefill(model, inputs: dict, presses: list[str], keeps: list[int], repeats: int = 5, progress=None) -> list[dict]:
    """Median prefill seconds (one forward, ``logits_to_keep=1`` as generate's prefill) for the
    unpressed model and every press x budget; speedup next to its FLOPs-ratio limit, and the
    press's own overhead (time inside ``press.press``) as a fraction of the unpressed prefill."""
    config = model.config
    n_img = int((inputs["input_ids"] == config.image_token_id).sum(1).max())
    seq_len = inputs["input_ids"].shape[1]
    batch = inputs["input_ids"].shape[0]

    def forward():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    base_time = time_call(forward, repeats=repeats)
    base_flops = llava_prefill_flops(config, seq_len, batch=batch).total
    rows = [dict(press="none", keep=n_img, seconds=base_time, speedup=1.0, limit=1.0, efficiency=1.0, overhead=0.0)]
    for name in presses:
        for keep in keeps:
            if keep >= n_img:
                continue
            press = get_press(name, keep=keep)
            inner, spent = press.press, []

            def timed(tokens, ctx, inner=inner, spent=spent):
                start = time.perf_counter()
                out = inner(tokens, ctx)
                spent.append(time.perf_counter() - start)
                return out

            press.press = timed  # instance attribute: times the press's own work inside the real run
            with press(model):
                seconds = time_call(forward, repeats=repeats)
            flops = llava_prefill_flops(config, press.stats["pressed_seq_len"], batch=batch).total
            limit = base_flops / flops
            speedup = base_time / seconds
            rows.append(dict(press=name, keep=keep, seconds=seconds, speedup=speedup, limit=limit,
                             efficiency=speedup / limit, overhead=statistics.median(spent) / base_time))
            if progress is not None:
                progress()
    return rows
