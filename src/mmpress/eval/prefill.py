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
    press's own overhead (time inside ``press.press``) as a fraction of the unpressed prefill.

    Cells are timed round-robin (one warm-up round, then ``repeats`` rounds, each timing every
    cell once), so slow drifts of a shared machine hit the baseline and the presses alike."""
    config = model.config
    n_img = int((inputs["input_ids"] == config.image_token_id).sum(1).max())
    batch = inputs["input_ids"].shape[0]
    cells = [dict(press="none", keep=n_img, obj=None, times=[])]
    for name in presses:
        for keep in keeps:
            if keep < n_img:
                cells.append(dict(press=name, keep=keep, obj=_timed(get_press(name, keep=keep)), times=[]))

    def forward():
        with torch.inference_mode():
            model(**inputs, logits_to_keep=1)

    for round_ in range(repeats + 1):
        for cell in cells:
            if cell["obj"] is None:
                seconds = time_call(forward, repeats=1, warmup=0)
            else:
                with cell["obj"](model):
                    seconds = time_call(forward, repeats=1, warmup=0)
            if round_:  # round 0 warms up
                cell["times"].append(seconds)
        if progress is not None:
            progress()

    base = statistics.median(cells[0]["times"])
    base_flops = llava_prefill_flops(config, inputs["input_ids"].shape[1], batch=batch).total
    rows = []
    for cell in cells:
        seconds = statistics.median(cell["times"])
        press = cell["obj"]
        flops = base_flops if press is None else llava_prefill_flops(config, press.stats["pressed_seq_len"], batch=batch).total
        speedup, limit = base / seconds, base_flops / flops
        overhead = 0.0 if press is None else statistics.median(press.spent) / base
        rows.append(dict(press=cell["press"], keep=cell["keep"], seconds=seconds, speedup=speedup, limit=limit,
                         efficiency=speedup / limit, overhead=overhead))
    return rows


def _timed(press):
    """Times the press's own work (``press.press``) inside the real run, in ``press.spent``."""
    inner, press.spent = press.press, []

    def timed(tokens, ctx):
        start = time.perf_counter()
        out = inner(tokens, ctx)
        press.spent.append(time.perf_counter() - start)
        return out

    press.press = timed  # an instance attribute shadows the method
    return press
