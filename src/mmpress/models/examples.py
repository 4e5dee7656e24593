"""Random models and prompts of a family's shape, for tests ("tiny") and cost benchmarks ("real").

Compute cost does not depend on the weights, so a random model of the real shape times the same
as the trained one. Every family's "real" CPU shape shares one language model, a Qwen2 of 12 x 896
(the peer baseline's, shared/MEASURED.md), so figures compare like for like; its tower keeps the
released model's resolution and token count. A family file's ``build`` / ``prompts`` use these.
"""

from __future__ import annotations

import torch

PAD = 0


def lm_shape(size: str) -> dict:
    """The language model and text of a "real" (12 x 896) or "tiny" (2 x 48) shape."""
    if size == "real":
        return dict(lm_layers=12, lm_hidden=896, lm_intermediate=4864, lm_heads=14, lm_kv_heads=2, vocab=32000,
                    text_tokens=33)
    if size == "tiny":
        return dict(lm_layers=2, lm_hidden=48, lm_intermediate=96, lm_heads=4, lm_kv_heads=2, vocab=64, text_tokens=12)
    raise ValueError(f"unknown model size {size!r}: 'tiny' (tests) or 'real' (cost benchmarks)")


def text_config(shape: dict, **extra) -> dict:
    """Keyword arguments of a decoder LM config of ``shape`` (:func:`lm_shape`'s keys)."""
    return dict(vocab_size=shape["vocab"], hidden_size=shape["lm_hidden"], intermediate_size=shape["lm_intermediate"],
                num_hidden_layers=shape["lm_layers"], num_attention_heads=shape["lm_heads"],
                num_key_value_heads=shape["lm_kv_heads"], max_position_embeddings=32768, pad_token_id=PAD,
                bos_token_id=1, eos_token_id=2, **extra)


def qwen2_text(shape: dict):
    from transformers import Qwen2Config

    return Qwen2Config(**text_config(shape))


def text_around(media: list[list[int]], row: int, seed: int, text: int, vocab: int, low: int = 10) -> list[int]:
    """One prompt row: a few system tokens, the row's media (each a list of token ids, markers
    included), then a question; ``text`` tokens in all, fewer on later rows (ragged: 33, 29, 25,
    21, ...). Token ids in [low, vocab), drawn from (seed, row)."""
    length = max(4, text - 4 * (row % 4))
    g = torch.Generator().manual_seed(seed * 1009 + row)
    words = torch.randint(low, vocab, (length,), generator=g).tolist()
    return words[:3] + [t for tokens in media for t in tokens] + words[3:]


def left_pad(rows: list[list[int]]) -> dict[str, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of rows left-padded to the longest."""
    width = max(map(len, rows))
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row):], mask[i, width - len(row):] = torch.tensor(row), 1
    return {"input_ids": ids, "attention_mask": mask}


def pixel_tensor(shape: tuple[int, ...], seed: int, row: int, index: int) -> torch.Tensor:
    """Random pixels of one medium: a function of (seed, its shape, its row, its index in the row)."""
    g = torch.Generator().manual_seed(((seed * 1009 + row) * 1009 + index) * 1009 + sum(shape))
    return torch.randn(shape, generator=g)
