"""Tiny random LLaVA models (no download): every code path runs in seconds."""

from __future__ import annotations

import pytest
import torch
from transformers import CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

IMAGE_TOKEN = 7
PAD = 0
VOCAB = 64


def tiny_llava(tower: str = "clip", attn: str = "sdpa", seed: int = 0) -> LlavaForConditionalGeneration:
    """LLaVA-1.5-shaped model, tiny: 32x32 images, 4x4 patches -> 64 visual tokens (8x8 grid)."""
    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=32, patch_size=4, num_channels=3)
    vision = CLIPVisionConfig(**common) if tower == "clip" else Dinov2Config(**common, mlp_ratio=2)
    text = LlamaConfig(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       pad_token_id=PAD, bos_token_id=1, eos_token_id=2)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN,
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    config._attn_implementation = attn
    model = LlavaForConditionalGeneration(config).eval()
    model.generation_config.pad_token_id = PAD
    return model


def make_batch(prompt_lens=(5,), images_per_row=None, n_tokens=64, seed=0):
    """Left-padded batch: each row = text, <image>*n (per image), text; ragged lengths."""
    g = torch.Generator().manual_seed(seed)
    images_per_row = images_per_row or [1] * len(prompt_lens)
    rows = []
    for length, n_img in zip(prompt_lens, images_per_row):
        pre = torch.randint(10, VOCAB, (2,), generator=g).tolist()
        post = torch.randint(10, VOCAB, (length,), generator=g).tolist()
        rows.append(pre + [IMAGE_TOKEN] * (n_tokens * n_img) + post)
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):] = torch.tensor(row)
        mask[i, width - len(row):] = 1
    pixels = torch.randn(sum(images_per_row), 3, 32, 32, generator=g)
    return {"input_ids": ids, "attention_mask": mask, "pixel_values": pixels}


@pytest.fixture(scope="session", params=["clip", "dinov2"])
def model(request):
    return tiny_llava(request.param)
