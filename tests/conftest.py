"""Tiny random LLaVA models (no download): every code path runs in seconds."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (CLIPImageProcessorPil, CLIPVisionConfig, Dinov2Config, LlamaConfig, LlavaConfig,
                          LlavaForConditionalGeneration, LlavaProcessor, PreTrainedTokenizerFast)

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


@pytest.fixture
def one_thread():
    """A tiny model only loses to thread synchronisation on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session", params=["clip", "dinov2"])
def model(request):
    return tiny_llava(request.param)


# ---- a tiny processor matching conftest's tiny LLaVA ------------------------------------------
WORDS = ("what color shape is the there a red green blue circle square yes no how many "
         "answer with one word").split()
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} <end> {% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


def tiny_processor() -> LlavaProcessor:
    """Word-level tokenizer over the tiny model's 64 ids (<image> = id 7) + a 32 px CLIP processor."""
    specials = ["<pad>", "<s>", "</s>", "<unk>", "<user>", "<assistant>", "<end>", "<image>"]
    vocab = {token: i for i, token in enumerate(specials + WORDS)}
    vocab |= {f"w{i}": i for i in range(len(vocab), VOCAB)}
    assert vocab["<image>"] == IMAGE_TOKEN and len(vocab) == VOCAB
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=4, chat_template=TEMPLATE,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1)


def samples(n: int = 6) -> list[dict]:
    g = torch.Generator().manual_seed(0)
    colors = ["red", "green", "blue"]
    out = []
    for i in range(n):
        pixels = torch.randint(0, 256, (32, 32, 3), generator=g, dtype=torch.uint8).numpy()
        question = "what color is the square?" if i % 2 else "is there a circle?"
        answer = colors[i % 3] if i % 2 else "yes"
        kind = ("exist", "color")[i % 2]
        out.append(dict(image=Image.fromarray(pixels), question=question, answer=answer, kind=kind))
    return out


def save_tiny_set(root, n: int) -> list[dict]:
    """The tiny model and processor saved to ``root/tiny``, and ``n`` samples as ``root/set.jsonl``
    beside their images (``{i}.png``); returns the JSONL records."""
    tiny_llava().save_pretrained(root / "tiny")
    tiny_processor().save_pretrained(root / "tiny")
    records = []
    for i, sample in enumerate(samples(n)):
        sample["image"].save(root / f"{i}.png")
        records.append({"image": f"{i}.png", "question": sample["question"], "answer": sample["answer"]})
    (root / "set.jsonl").write_text("\n".join(map(json.dumps, records)))
    return records
